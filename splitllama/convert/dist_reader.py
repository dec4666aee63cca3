"""Read single tensors of a torch_dist (DCP) checkpoint in one process, one at a time.

Uses only the DCP ``.metadata`` (key -> global shape, dtype, chunks -> file byte ranges): a
tensor is assembled from its stored chunks, each read with a positioned read and
deserialised, so memory is the full tensor plus one chunk — whatever TP/PP wrote it.
"""
from __future__ import annotations

import io
import os
import pickle
from typing import Iterator, Optional

import torch
from torch.distributed.checkpoint.metadata import BytesStorageMetadata, Metadata, TensorStorageMetadata

from splitllama.checkpoint import layout
from splitllama.convert.sources import ConversionError

DCP_METADATA = ".metadata"


class DistCheckpoint:
    """A complete torch_dist checkpoint directory (a root with `latest`, or an iter_ dir)."""

    def __init__(self, path: str) -> None:
        try:
            self.path = layout.resolve(path)
        except (FileNotFoundError, ValueError) as e:
            raise ConversionError(str(e)) from None
        md_file = os.path.join(self.path, DCP_METADATA)
        if not os.path.isfile(md_file):
            raise ConversionError(f"{self.path}: no {DCP_METADATA}; not a torch_dist checkpoint")
        with open(md_file, "rb") as f:
            self.metadata: Metadata = pickle.load(f)
        self._chunks: dict[str, list] = {}
        for idx, info in self.metadata.storage_data.items():
            self._chunks.setdefault(idx.fqn, []).append((idx.offset, info))
        self.model_config: Optional[dict] = layout.read_json(self.path, layout.MODEL_CONFIG)

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

    def _read_bytes(self, info) -> bytes:
        with open(os.path.join(self.path, info.relative_path), "rb") as f:
            f.seek(info.offset)
            data = f.read(info.length)
        if len(data) != info.length:
            raise ConversionError(f"{self.path}/{info.relative_path}: truncated (wanted {info.length} "
                                  f"bytes at {info.offset}, got {len(data)})")
        return data

    def read(self, key: str) -> torch.Tensor:
        """The full (global) tensor `key`."""
        md = self.tensor_meta(key)
        out = torch.empty(tuple(md.size), dtype=md.properties.dtype)
        covered = 0
        for chunk in md.chunks:
            info = self._storage(key, chunk.offsets)
            part = torch.load(io.BytesIO(self._read_bytes(info)), weights_only=True)
            view = out
            for dim, (o, s) in enumerate(zip(chunk.offsets, chunk.sizes)):
                view = view.narrow(dim, o, s)
            view.copy_(part.reshape(tuple(chunk.sizes)))
            covered += chunk.sizes.numel()
            del part
        if covered != out.numel():
            raise ConversionError(f"{self.path}: chunks of {key} cover {covered} of {out.numel()} elements")
        return out

    def read_object(self, key: str) -> object:
        for _, info in self._chunks.get(key, []):
            return torch.load(io.BytesIO(self._read_bytes(info)), weights_only=False)
        raise ConversionError(f"{self.path}: checkpoint has no object {key}")

    def _storage(self, key: str, offsets: torch.Size):
        for off, info in self._chunks.get(key, []):
            if off is not None and tuple(off) == tuple(offsets):
                return info
        raise ConversionError(f"{self.path}: no stored data for chunk {tuple(offsets)} of {key}")
