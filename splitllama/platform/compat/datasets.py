"""Megatron-Core dataset internals SplitLlama relies on (megatron-core 0.16.1):

``GPTDataset._query_document_sample_shuffle_indices`` is overridden by the critic's
`data.value_dataset.ValueGPTDataset` (it records which document spans a sample reads, to read
the same spans of the value targets); `QUERY_SAMPLE` declares it and is checked on import.

``BlendedDataset`` calls ``torch.distributed.get_rank()`` when it writes its index cache, even
with no process group (single-process runs with ``data.cache_dir`` set would crash).
`rank_zero_without_process_group` answers rank 0 for the duration of a build, only while no
process group exists, and restores the original afterwards.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from splitllama.platform import patching
from splitllama.platform.patching import Patch, Requirement

GET_RANK = Patch("torch.distributed.get_rank", "torch 2.13.0",
                 "megatron-core 0.16.1's BlendedDataset asks for the rank without a process group",
                 make=lambda: (lambda group=None: 0))
QUERY_SAMPLE = Requirement("megatron.core.datasets.gpt_dataset.GPTDataset._query_document_sample_shuffle_indices",
                           "megatron-core 0.16.1", "overridden by ValueGPTDataset (the spans a sample reads)")
REQUIRES = (GET_RANK, QUERY_SAMPLE)

patching.check(REQUIRES)


@contextlib.contextmanager
def rank_zero_without_process_group() -> Iterator[None]:
    """Without a process group: ``torch.distributed.get_rank()`` is 0 inside the block."""
    if torch.distributed.is_initialized():
        yield
        return
    applied = patching.apply((GET_RANK,))
    try:
        yield
    finally:
        applied.restore()
