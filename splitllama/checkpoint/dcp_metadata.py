"""Read a torch_dist checkpoint's ``.metadata`` without running planted code, and check that
every data file it names is there with the bytes it needs.

torch.distributed.checkpoint stores ``.metadata`` as a plain pickle (its own reader calls
``pickle.load``); unpickling an untrusted file can execute anything. `read_metadata` uses a
restricted unpickler that admits only the classes DCP metadata is made of (listed below,
checked against torch 2.13's and Megatron-Core 0.16's saves) and refuses anything else with
one clear error. Training runs it before handing a checkpoint to torch's reader.
"""
from __future__ import annotations

import os
import pickle

import torch

from splitllama.errors import UsageError

DCP_METADATA = ".metadata"

_DCP = "torch.distributed.checkpoint"
_ALLOWED = {
    f"{_DCP}.metadata": {"Metadata", "MetadataIndex", "ChunkStorageMetadata", "TensorProperties",
                         "TensorStorageMetadata", "BytesStorageMetadata", "StorageMeta",
                         "_MEM_FORMAT_ENCODING"},
    f"{_DCP}.planner": {"SavePlan", "WriteItem", "WriteItemType", "TensorWriteData",
                        "BytesIOWriteData"},
    f"{_DCP}.filesystem": {"_StorageInfo"},
    "torch.serialization": {"_get_layout"},  # looks a torch.layout up by name
    "torch": {"Size"},
    "collections": {"OrderedDict"},
    "pathlib": {"Path", "PosixPath", "PurePosixPath"},  # StorageMeta.checkpoint_id of a Path save
}


class CheckpointMetadataError(UsageError):
    """A ``.metadata`` that is not plain DCP metadata (corrupt, or holding foreign objects)."""


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, f, path: str) -> None:
        super().__init__(f)
        self.path = path

    def find_class(self, module: str, name: str):
        if name in _ALLOWED.get(module, ()):
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise CheckpointMetadataError(
            f"{self.path}: refusing to load {module}.{name}: not a class of torch_dist checkpoint "
            f"metadata (the file may be crafted to run code; it was not executed)")


def read_metadata(ckpt_dir: str):
    """The DCP `Metadata` of checkpoint directory `ckpt_dir` (restricted unpickling)."""
    path = os.path.join(ckpt_dir, DCP_METADATA)
    if not os.path.isfile(path):
        raise CheckpointMetadataError(f"{ckpt_dir}: no {DCP_METADATA}; not a torch_dist checkpoint")
    from torch.distributed.checkpoint.metadata import Metadata

    try:
        with open(path, "rb") as f:
            md = _RestrictedUnpickler(f, path).load()
    except CheckpointMetadataError:
        raise
    except Exception as e:  # noqa: BLE001 - any failure to parse is a corrupt file
        raise CheckpointMetadataError(f"{path}: corrupt checkpoint metadata "
                                      f"({type(e).__name__}: {e})") from None
    if not isinstance(md, Metadata) or not isinstance(getattr(md, "storage_data", None), dict):
        raise CheckpointMetadataError(f"{path}: corrupt checkpoint metadata (not a DCP Metadata)")
    return md


def file_problems(ckpt_dir: str, md) -> list[str]:
    """Each data file named by `md` that is missing, outside `ckpt_dir` or shorter than the
    bytes its items need ([] when the checkpoint's files are all there)."""
    need: dict[str, int] = {}
    for info in md.storage_data.values():
        rel = info.relative_path
        need[rel] = max(need.get(rel, 0), int(info.offset) + int(info.length))
    problems = []
    for rel, size in sorted(need.items()):
        if os.path.basename(rel) != rel or rel in ("", ".", ".."):
            problems.append(f"{rel}: not a file name inside the checkpoint directory")
            continue
        path = os.path.join(ckpt_dir, rel)
        if not os.path.isfile(path):
            problems.append(f"{rel} is missing")
        elif os.path.getsize(path) < size:
            problems.append(f"{rel} is truncated ({os.path.getsize(path)} bytes, the metadata needs {size})")
    return problems


def raise_if_damaged(ckpt_dir: str, md) -> None:
    """One UsageError naming the first damaged data file (and how many more)."""
    problems = file_problems(ckpt_dir, md)
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise UsageError(f"checkpoint {ckpt_dir} is damaged: {problems[0]}{more}")


def verify(ckpt_dir: str):
    """`read_metadata` + `raise_if_damaged`; returns the metadata."""
    md = read_metadata(ckpt_dir)
    raise_if_damaged(ckpt_dir, md)
    return md
