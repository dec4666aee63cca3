"""Lazy, streaming access to HF safetensors checkpoints (no mmap, no whole-file reads).

A `SafetensorsFile` parses only the header (8-byte length + JSON) and validates it against the
file size; `read()` then fetches one tensor, or a range of its rows, with a positioned read
into a fresh buffer. Memory held is exactly what the caller keeps. An `HFCheckpoint` is one HF
model directory: its ``config.json`` and its weight map (``model.safetensors.index.json`` or a
single ``model.safetensors``); a shard is opened only when a tensor it holds is asked for, so
shards listed in the index but never needed are never touched.
"""
from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from typing import Optional

import torch

from splitllama.errors import UsageError

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
DTYPES: dict[str, torch.dtype] = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16,
                                  "F64": torch.float64, "I64": torch.int64, "I32": torch.int32,
                                  "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_MAX_HEADER = 100 * 1024 * 1024


class ConversionError(UsageError):
    """A problem with the inputs of a conversion; the message names file, tensor or field."""


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int  # absolute byte offset of the data in the file
    nbytes: int


class SafetensorsFile:
    """Header of one safetensors file plus positioned reads of its tensors."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.bytes_read = 0
        if not os.path.isfile(path):
            raise ConversionError(f"{path}: file does not exist")
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise ConversionError(f"{path}: truncated safetensors file ({size} bytes, no header)")
            (hlen,) = struct.unpack("<Q", head)
            if hlen > min(_MAX_HEADER, size - 8):
                raise ConversionError(f"{path}: corrupt safetensors header (header length {hlen}, "
                                      f"file size {size})")
            try:
                header = json.loads(f.read(hlen))
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                raise ConversionError(f"{path}: corrupt safetensors header ({e})") from None
        if not isinstance(header, dict):
            raise ConversionError(f"{path}: corrupt safetensors header (not a JSON object)")
        base = 8 + hlen
        self.tensors: dict[str, TensorInfo] = {}
        for name, meta in header.items():
            if name == "__metadata__":
                continue
            try:
                dtype = DTYPES[meta["dtype"]]
                shape = tuple(int(s) for s in meta["shape"])
                begin, end = (int(x) for x in meta["data_offsets"])
            except (KeyError, TypeError, ValueError):
                raise ConversionError(f"{path}: corrupt safetensors header entry for {name}: {meta}") from None
            if begin < 0 or end < begin or any(s < 0 for s in shape):
                raise ConversionError(f"{path}: corrupt safetensors header entry for {name}: offsets "
                                      f"[{begin}, {end}] / shape {list(shape)} (need 0 <= begin <= end, sizes >= 0)")
            numel = 1
            for s in shape:
                numel *= s
            if end - begin != numel * dtype.itemsize:
                raise ConversionError(f"{path}: tensor {name} has {end - begin} data bytes, expected "
                                      f"{numel * dtype.itemsize} for {DTYPE_NAMES[dtype]} {list(shape)}")
            if base + end > size:
                raise ConversionError(f"{path}: truncated safetensors file: tensor {name} ends at byte "
                                      f"{base + end}, file has {size} bytes")
            self.tensors[name] = TensorInfo(name, dtype, shape, base + begin, end - begin)
        spans = sorted((t.start, t.start + t.nbytes, t.name) for t in self.tensors.values() if t.nbytes)
        for (_, end_a, a), (start_b, _, b) in zip(spans, spans[1:]):
            if start_b < end_a:  # two tensors sharing bytes: a crafted or corrupt file
                raise ConversionError(f"{path}: corrupt safetensors header: tensors {a} and {b} overlap "
                                      f"(bytes {start_b}..{end_a})")

    def read(self, name: str, rows: Optional[tuple[int, int]] = None,
             out: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Tensor `name` (or rows [r0, r1) of it), read into `out` (a contiguous tensor of
        exactly that many bytes) or into a fresh buffer."""
        info = self.tensors[name]
        shape, start, nbytes = info.shape, info.start, info.nbytes
        if rows is not None:
            r0, r1 = rows
            row_bytes = nbytes // shape[0] if shape[0] else 0
            shape, start, nbytes = (r1 - r0, *shape[1:]), start + r0 * row_bytes, (r1 - r0) * row_bytes
        buf = torch.empty(nbytes, dtype=torch.uint8) if out is None else out.reshape(-1).view(torch.uint8)
        if buf.numel() != nbytes:
            raise ValueError(f"{name}: output buffer has {buf.numel()} bytes, need {nbytes}")
        with open(self.path, "rb", buffering=0) as f:
            _fadvise(f, start, nbytes, "POSIX_FADV_SEQUENTIAL")
            f.seek(start)
            view, got = memoryview(buf.numpy()), 0
            while got < nbytes:
                n = f.readinto(view[got:])
                if not n:
                    raise ConversionError(f"{self.path}: truncated while reading {name} "
                                          f"({got} of {nbytes} bytes)")
                got += n
            _fadvise(f, start, nbytes, "POSIX_FADV_DONTNEED")  # read once: keep the page cache free
        self.bytes_read += nbytes
        return buf.view(info.dtype).reshape(shape)


def _fadvise(f, offset: int, nbytes: int, advice: str) -> None:
    if hasattr(os, advice):
        os.posix_fadvise(f.fileno(), offset, nbytes, getattr(os, advice))


class HFCheckpoint:
    """One HF model directory (config.json + sharded or single safetensors)."""

    def __init__(self, path: str, what: str = "model") -> None:
        self.path, self.what = path, what
        if not os.path.isdir(path):
            raise ConversionError(f"{what}: {path} is not a directory")
        cfg_file = os.path.join(path, "config.json")
        if not os.path.isfile(cfg_file):
            raise ConversionError(f"{what}: {cfg_file} does not exist")
        try:
            with open(cfg_file) as f:
                self.config: dict = json.load(f)
        except json.JSONDecodeError as e:
            raise ConversionError(f"{what}: {cfg_file} is not valid JSON ({e})") from None
        self._files: dict[str, SafetensorsFile] = {}
        index = os.path.join(path, INDEX_FILE)
        if os.path.isfile(index):
            try:
                with open(index) as f:
                    self.weight_map: dict[str, str] = dict(json.load(f)["weight_map"])
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise ConversionError(f"{what}: {index} has no valid weight_map ({e})") from None
            for name, fname in self.weight_map.items():  # never opened outside the model directory
                if (not isinstance(fname, str) or not fname or os.path.isabs(fname) or fname != os.path.basename(fname)
                        or fname in (".", "..")):
                    raise ConversionError(f"{what}: {index} maps {name} to {fname!r}, which is not a file "
                                          f"name inside {path} (paths and ../ are refused)")
        elif os.path.isfile(os.path.join(path, SINGLE_FILE)):
            self.weight_map = {n: SINGLE_FILE for n in self._file(SINGLE_FILE).tensors}
        else:
            found = sorted(os.listdir(path))
            raise ConversionError(f"{what}: {path} has neither {INDEX_FILE} nor {SINGLE_FILE} "
                                  f"(found {found[:8]}); only safetensors checkpoints are supported")

    def _file(self, fname: str) -> SafetensorsFile:
        if fname not in self._files:
            self._files[fname] = SafetensorsFile(os.path.join(self.path, fname))
        return self._files[fname]

    def has(self, name: str) -> bool:
        return name in self.weight_map

    def info(self, name: str) -> TensorInfo:
        """Header entry of `name`; opens (only) the shard that the weight map names."""
        if name not in self.weight_map:
            raise ConversionError(f"{self.what}: missing tensor {name} (not in the weight map of {self.path})")
        f = self._file(self.weight_map[name])
        if name not in f.tensors:
            raise ConversionError(f"{self.what}: missing tensor {name}: the index places it in {f.path}, "
                                  f"whose header does not hold it")
        return f.tensors[name]

    def read(self, name: str, rows: Optional[tuple[int, int]] = None,
             out: Optional[torch.Tensor] = None) -> torch.Tensor:
        self.info(name)
        return self._file(self.weight_map[name]).read(name, rows, out)

    def nbytes(self, name: str, rows: Optional[tuple[int, int]] = None) -> int:
        info = self.info(name)
        return info.nbytes if rows is None else (rows[1] - rows[0]) * (info.nbytes // info.shape[0])

    def location(self, name: str) -> tuple[str, int]:
        """(file name, byte offset): a sort key that makes reads sequential."""
        return self.weight_map[name], self.info(name).start

    def bytes_read(self) -> dict[str, int]:
        """Bytes read so far per opened file (absolute path)."""
        return {f.path: f.bytes_read for f in self._files.values()}

    def declared_dtype(self) -> Optional[torch.dtype]:
        name = self.config.get("dtype") or self.config.get("torch_dtype")
        return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}.get(str(name))
