"""Private torch.distributed.checkpoint API used by the streaming converter writer
(`convert/dist_writer.py`). Written for torch 2.13.0.

- ``filesystem._StorageInfo`` (relative file, offset, length) is the storage record that
  torch's FileSystemReader looks every item up by; our writer puts all items into one file
  itself, so it must build these records itself.
- ``FileSystemWriter.write_data(plan, planner)`` is overridden by that writer (one file,
  items in piece order, next item produced while this one is written); its signature and its
  contract (a Future of a list of WriteResult) are torch internals.
"""
from __future__ import annotations

from splitllama.platform import patching
from splitllama.platform.patching import Requirement

REQUIRES = (
    Requirement("torch.distributed.checkpoint.filesystem._StorageInfo", "torch 2.13.0",
                "the storage record of each written item (file, offset, length)"),
    Requirement("torch.distributed.checkpoint.filesystem.FileSystemWriter.write_data", "torch 2.13.0",
                "overridden by the converter's single-file streaming writer"),
)

patching.check(REQUIRES)

from torch.distributed.checkpoint.filesystem import _StorageInfo as StorageInfo  # noqa: E402

__all__ = ["REQUIRES", "StorageInfo"]
