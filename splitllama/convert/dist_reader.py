"""Read single tensors of a torch_dist (DCP) checkpoint in one process, one at a time.

Uses only the DCP ``.metadata`` (key -> global shape, dtype, chunks -> file byte ranges): a
tensor is assembled from its stored chunks, each read with a positioned read and
deserialised, so memory is the full tensor plus one chunk — whatever TP/PP wrote it.
"""
from __future__ import annotations

import io
import os
from typing import Iterator, Optional

import torch
from torch.distributed.checkpoint.metadata import BytesStorageMetadata, Metadata, TensorStorageMetadata

from splitllama.checkpoint import dirs
from splitllama.checkpoint.dcp_metadata import file_problems, raise_if_damaged, read_metadata
from splitllama.convert.sources import ConversionError


class DistCheckpoint:
    """A complete torch_dist checkpoint directory (a root with `latest`, or an iter_ dir)."""

    def __init__(self, path: str) -> None:
        try:
            self.path = dirs.resolve(path)
        except (FileNotFoundError, ValueError) as e:
            raise ConversionError(str(e)) from None
        self.metadata: Metadata = read_metadata(self.path)  # restricted: never runs planted code
        self._chunks: dict[str, list] = {}
        for idx, info in self.metadata.storage_data.items():
            self._chunks.setdefault(idx.fqn, []).append((idx.offset, info))
        self.model_config: Optional[dict] = dirs.read_json(self.path, dirs.MODEL_CONFIG)

    def problems(self) -> list[str]:
        """Data files the metadata names that are missing or too short ([] when all are fine)."""
        return file_problems(self.path, self.metadata)

    def verify(self) -> None:
        raise_if_damaged(self.path, self.metadata)

    def tensor_keys(self) -> Iterator[str]:
        for k, md in self.metadata.state_dict_metadata.items():
            if isinstance(md, TensorStorageMetadata):
                yield k

    def object_keys(self) -> Iterator[str]:
        for k, md in self.metadata.state_dict_metadata.items():
            if isinstance(md, BytesStorageMetadata):
                yield k

    def __contains__(self, key: str) -> bool:
        return key in self.metadata.state_dict_metadata

    def tensor_meta(self, key: str) -> TensorStorageMetadata:
        md = self.metadata.state_dict_metadata.get(key)
        if not isinstance(md, TensorStorageMetadata):
            raise ConversionError(f"{self.path}: checkpoint has no tensor {key}")
        return md

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self.tensor_meta(key).size)

    def dtype(self, key: str) -> torch.dtype:
        return self.tensor_meta(key).properties.dtype

    def nbytes(self, key: str) -> int:
        md = self.tensor_meta(key)
        return md.size.numel() * md.properties.dtype.itemsize

    def _load_record(self, info) -> object:
        """torch.load of one stored item, read straight from its byte range of the file."""
        path = os.path.join(self.path, info.relative_path)
        if os.path.getsize(path) < info.offset + info.length:
            raise ConversionError(f"{path}: truncated (item at {info.offset}+{info.length} bytes)")
        with open(path, "rb", buffering=0) as f:
            return torch.load(_Window(f, info.offset, info.length), weights_only=True)

    def read(self, key: str) -> torch.Tensor:
        """The full (global) tensor `key`."""
        md = self.tensor_meta(key)
        shape = tuple(md.size)
        if len(md.chunks) == 1 and tuple(md.chunks[0].sizes) == shape:  # one chunk: no assembly
            return self._load_record(self._storage(key, md.chunks[0].offsets)).reshape(shape)
        out = torch.empty(shape, dtype=md.properties.dtype)
        covered = 0
        for chunk in md.chunks:
            part = self._load_record(self._storage(key, chunk.offsets))
            view = out
            for dim, (o, s) in enumerate(zip(chunk.offsets, chunk.sizes)):
                view = view.narrow(dim, o, s)
            view.copy_(part.reshape(tuple(chunk.sizes)))
            covered += chunk.sizes.numel()
            del part
        if covered != out.numel():
            raise ConversionError(f"{self.path}: chunks of {key} cover {covered} of {out.numel()} elements")
        return out

    def _storage(self, key: str, offsets: torch.Size):
        for off, info in self._chunks.get(key, []):
            if off is not None and tuple(off) == tuple(offsets):
                return info
        raise ConversionError(f"{self.path}: no stored data for chunk {tuple(offsets)} of {key}")


class _Window(io.RawIOBase):
    """The byte range [offset, offset + length) of an open file, as a seekable stream."""

    def __init__(self, f, offset: int, length: int) -> None:
        super().__init__()
        self.f, self.start, self.length, self.pos = f, offset, length, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def seek(self, pos: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self.pos, io.SEEK_END: self.length}[whence]
        self.pos = max(0, min(self.length, base + pos))
        return self.pos

    def readinto(self, b) -> int:
        n = min(len(b), self.length - self.pos)
        if n <= 0:
            return 0
        self.f.seek(self.start + self.pos)
        got = self.f.readinto(memoryview(b)[:n])
        self.pos += got
        return got
