"""Deterministic, resumable micro-batch iteration (Megatron's MegatronPretrainingSampler).

Global sample indices are consumed in order starting at ``consumed_samples``. Each block of
``micro_batch_size * dp_size`` consecutive indices is one micro-batch step across data-parallel
ranks; rank ``r`` takes the contiguous slice ``[r * mbs, (r + 1) * mbs)`` of it, i.e. global
index ``i`` (counted from 0) belongs to rank ``(i // mbs) % dp_size``. The dataset itself is
already shuffled (GPTDataset's shuffle index), so the order is fixed by the seed, and resuming
from a consumed-sample count continues exactly where an uninterrupted run would be.
"""
from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, default_collate


class PretrainingSampler:
    """Batch sampler yielding this rank's micro-batches of dataset indices.

    Args:
        total_samples: dataset length.
        consumed_samples: global samples already used (all dp ranks together).
        micro_batch_size: samples per micro-batch per rank.
        dp_rank / dp_size: this rank's data-parallel coordinates.
        cyclic: wrap around (index ``i % total_samples``) instead of stopping at the end.
    """

    def __init__(
        self,
        total_samples: int,
        consumed_samples: int,
        micro_batch_size: int,
        dp_rank: int,
        dp_size: int,
        cyclic: bool = False,
    ) -> None:
        if micro_batch_size < 1 or dp_size < 1 or not 0 <= dp_rank < dp_size:
            raise ValueError(
                f"bad sampler shape: micro_batch_size={micro_batch_size}, "
                f"dp_rank={dp_rank}, dp_size={dp_size}"
            )
        if total_samples < 1:
            raise ValueError("cannot iterate over an empty dataset")
        if consumed_samples < 0 or (not cyclic and consumed_samples >= total_samples):
            raise ValueError(
                f"consumed_samples={consumed_samples} is outside the dataset (length "
                f"{total_samples}); the run has used up its data"
            )
        self.total_samples = total_samples
        self.consumed_samples = consumed_samples
        self.micro_batch_size = micro_batch_size
        self.dp_rank = dp_rank
        self.dp_size = dp_size
        self.cyclic = cyclic

    def __len__(self) -> int:
        """Micro-batches this rank will yield (a very large number when cyclic)."""
        if self.cyclic:
            return 2**62
        return (self.total_samples - self.consumed_samples) // (self.micro_batch_size * self.dp_size)

    def __iter__(self) -> Iterator[list[int]]:
        step = self.micro_batch_size * self.dp_size
        block = self.consumed_samples  # first global index of the current dp block
        while self.cyclic or block + step <= self.total_samples:  # drop a last partial block
            first = block + self.dp_rank * self.micro_batch_size
            yield [(first + j) % self.total_samples for j in range(self.micro_batch_size)]
            block += step


def collate(samples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """Stack a list of sample dicts into a dict of batched tensors."""
    return default_collate(samples)


def build_data_iterator(
    dataset: Dataset,
    micro_batch_size: int,
    start_sample: int,
    dp_rank: int,
    dp_size: int,
    *,
    num_workers: int = 0,
    cyclic: bool = False,
) -> Iterator[dict[str, torch.Tensor]]:
    """Iterator over this rank's micro-batches (dicts of [micro_batch_size, ...] tensors).

    Args:
        dataset: a map-style dataset (from :func:`build_datasets`).
        micro_batch_size: samples per micro-batch on this rank.
        start_sample: global samples consumed so far (resume point; 0 for a fresh run).
        dp_rank / dp_size: data-parallel rank and world size.
        num_workers: DataLoader worker processes (order is unaffected).
        cyclic: wrap around at the end (for validation iterators that outlive the split).
    """
    sampler = PretrainingSampler(
        len(dataset), start_sample, micro_batch_size, dp_rank, dp_size, cyclic=cyclic
    )
    loader = DataLoader(
        dataset,
        batch_sampler=sampler,
        num_workers=num_workers,
        collate_fn=collate,
        persistent_workers=num_workers > 0,
    )
    return iter(loader)
