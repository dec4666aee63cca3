"""Variable-length packing: whole short documents packed greedily into ``seq_length`` tokens.

With ``data.packed_sequences`` each training sample is a run of whole documents (first-fit
packing of a seeded shuffled order, `greedy_pack`) laid back to back, each document contributing its inputs ``doc[:-1]`` and labels
``doc[1:]`` (a document longer than ``seq_length + 1`` tokens is truncated). The unused tail is
one padding segment with loss mask 0, so every sample has exactly ``seq_length`` tokens: static
activation shapes, so the pipeline's fixed p2p shapes keep working.

A sample is a dict of tensors: ``tokens``, ``labels``, ``loss_mask``, ``position_ids`` (restart
at 0 in every document) and ``cu_seqlens`` (int32 document boundaries ``[0, l1, l1+l2, ...,
seq_length]`` padded with -1 to ``seq_length + 1`` entries so samples collate). The training
step turns ``cu_seqlens`` into Megatron's ``PackedSeqParams(qkv_format="thd")`` (micro-batch
size 1: the micro-batch *is* the pack); attention is then causal within each document and RoPE
restarts per document, in both blocks.
"""
from __future__ import annotations

from typing import Optional, Protocol, Sequence

import numpy
import torch
from torch.utils.data import Dataset


class DocumentSource(Protocol):
    """What packing reads: Megatron's IndexedDataset or the learnable mock's document set."""

    sequence_lengths: Sequence[int]

    def get(self, idx: int, offset: int = 0, length: Optional[int] = None) -> numpy.ndarray: ...


def greedy_pack(lengths: Sequence[int], capacity: int, window: int = 64) -> list[list[int]]:
    """Indices into `lengths` grouped into bins of total ≤ `capacity`: first fit, each item
    (in order) goes into the oldest of the last `window` open bins it fits in, else a new bin
    (the window bounds the work at O(n · window) for corpora of millions of documents). Items
    longer than `capacity` get a bin of their own (the caller truncates them). Bins come back
    in the order they were opened; items in a bin keep their order."""
    bins: list[list[int]] = []
    room: list[int] = []
    open_bins: list[int] = []  # indices into bins, oldest first
    for i, n in enumerate(lengths):
        n = min(int(n), capacity)
        target = next((b for b in open_bins if room[b] >= n), None)
        if target is None:
            bins.append([])
            room.append(capacity)
            target = len(bins) - 1
            open_bins.append(target)
            if len(open_bins) > window:
                open_bins.pop(0)
        bins[target].append(i)
        room[target] -= n
        if room[target] == 0:
            open_bins.remove(target)
    return bins


def pack_sample(docs: list[numpy.ndarray], seq_length: int, pad_id: int = 0,
                eod: Optional[int] = None) -> dict[str, torch.Tensor]:
    """One packed sample from whole documents (token arrays; each ≥ 2 tokens). With `eod`
    given, label positions holding it get loss mask 0 (``data.eod_mask_loss``)."""
    tokens = numpy.full(seq_length, pad_id, dtype=numpy.int64)
    labels = numpy.full(seq_length, pad_id, dtype=numpy.int64)
    loss_mask = numpy.zeros(seq_length, dtype=numpy.float32)
    position_ids = numpy.zeros(seq_length, dtype=numpy.int64)
    cu = [0]
    for doc in docs:
        doc = numpy.asarray(doc[: seq_length + 1 - cu[-1]], dtype=numpy.int64)
        n = len(doc) - 1
        if n < 1:
            continue
        s = cu[-1]
        tokens[s:s + n], labels[s:s + n] = doc[:-1], doc[1:]
        loss_mask[s:s + n] = 1.0
        if eod is not None:
            loss_mask[s:s + n][doc[1:] == eod] = 0.0
        position_ids[s:s + n] = numpy.arange(n)
        cu.append(s + n)
    if cu[-1] < seq_length:  # the padding segment: attends only to itself, no loss
        position_ids[cu[-1]:] = numpy.arange(seq_length - cu[-1])
        cu.append(seq_length)
    cu_padded = numpy.full(seq_length + 1, -1, dtype=numpy.int32)
    cu_padded[:len(cu)] = cu
    return {"tokens": torch.from_numpy(tokens), "labels": torch.from_numpy(labels),
            "loss_mask": torch.from_numpy(loss_mask), "position_ids": torch.from_numpy(position_ids),
            "cu_seqlens": torch.from_numpy(cu_padded)}


class PackedDocumentDataset(Dataset):
    """``num_samples`` packs of the documents `doc_ids` of `source` (epochs reshuffled by seed)."""

    def __init__(self, source: DocumentSource, doc_ids: numpy.ndarray, seq_length: int,
                 num_samples: int, seed: int, *, pad_id: int = 0, eod: Optional[int] = None) -> None:
        lengths = numpy.asarray(source.sequence_lengths, dtype=numpy.int64)
        doc_ids = numpy.asarray(doc_ids, dtype=numpy.int64)
        doc_ids = doc_ids[lengths[doc_ids] >= 2]
        if len(doc_ids) == 0:
            raise ValueError("data.packed_sequences: the split holds no document of >= 2 tokens")
        self.source, self.seq_length, self.pad_id, self.eod = source, seq_length, pad_id, eod
        self.packs: list[numpy.ndarray] = []
        epoch = 0
        while len(self.packs) < max(num_samples, 1):
            order = numpy.random.default_rng([seed, 0xBAC, epoch]).permutation(doc_ids)
            for b in greedy_pack(lengths[order] - 1, seq_length):
                self.packs.append(order[b])
            epoch += 1

    def __len__(self) -> int:
        return len(self.packs)

    def __getitem__(self, idx: int) -> dict[str, torch.Tensor]:
        docs = [numpy.asarray(self.source.get(int(d))) for d in self.packs[idx]]
        return pack_sample(docs, self.seq_length, self.pad_id, self.eod)


def packed_seq_params(cu_seqlens: torch.Tensor):
    """Megatron ``PackedSeqParams`` (THD) from one sample's -1-padded ``cu_seqlens``."""
    from megatron.core.packed_seq_params import PackedSeqParams

    if cu_seqlens.dim() == 2:
        if cu_seqlens.size(0) != 1:
            raise ValueError(f"packed sequences need train.micro_batch_size=1 (got "
                             f"{cu_seqlens.size(0)} packs in one micro-batch)")
        cu_seqlens = cu_seqlens[0]
    cu = cu_seqlens[cu_seqlens >= 0].to(torch.int32)
    max_len = int((cu[1:] - cu[:-1]).max())
    return PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu,
                           max_seqlen_q=max_len, max_seqlen_kv=max_len)
