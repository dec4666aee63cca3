"""Critic data: GPTDataset samples plus per-token value targets.

A corpus preprocessed with ``--values-key`` has, next to its token dataset ``PREFIX``, a float32
dataset ``PREFIX_values`` with the same documents and lengths: one target per token, NaN where
there is none (see ``splitllama.data.preprocess``). `ValueGPTDataset` is Megatron's GPTDataset
(same document / sample / shuffle indices, so the same token samples) whose samples also carry

- ``value_targets`` [s] float32: the target of each input token (0 where there is none),
- ``loss_mask`` [s]: 1 where a token has a target, else 0 (replacing the LM loss mask; padding
  has no target; with ``data.eod_mask_loss`` EOD tokens never count).

The targets are read from exactly the (document, offset, length) spans GPTDataset reads its
tokens from: the token dataset is wrapped for the duration of each query to record them.
"""
from __future__ import annotations

import numpy
import torch
from megatron.core.datasets.gpt_dataset import GPTDataset
from megatron.core.datasets.indexed_dataset import IndexedDataset

from splitllama.data.preprocess import values_prefix
from splitllama.platform.compat.datasets import QUERY_SAMPLE  # noqa: F401 - importing checks the override below


def check_values_prefix(prefix: str) -> None:
    """ValueError unless ``prefix``'s value targets exist and match its documents."""
    vp = values_prefix(prefix)
    if not IndexedDataset.exists(vp):
        raise ValueError(
            f"model.head=value needs value targets: {vp}.bin/.idx not found next to the tokens "
            f"{prefix}.bin/.idx (preprocess the corpus with tools/preprocess_data.py --values-key)")
    tokens, values = IndexedDataset(prefix), IndexedDataset(vp)
    t_len = numpy.array(tokens.sequence_lengths, dtype=numpy.int64)
    v_len = numpy.array(values.sequence_lengths, dtype=numpy.int64)
    v_dtype = values.index.dtype
    del tokens, values
    if v_dtype != numpy.float32:
        raise ValueError(f"{vp}.idx: value targets have dtype {numpy.dtype(v_dtype).name}, expected float32")
    if len(t_len) != len(v_len) or not numpy.array_equal(t_len, v_len):
        first = next((i for i in range(min(len(t_len), len(v_len))) if t_len[i] != v_len[i]), min(len(t_len), len(v_len)))
        raise ValueError(f"{vp}: {len(v_len)} documents do not match the {len(t_len)} of {prefix} "
                         f"(first difference at document {first}); preprocess both in one run")


class _RecordingDataset:
    """Forwards ``get`` to the token dataset and records each (document, offset, length)."""

    def __init__(self, inner, spans: list) -> None:
        self.inner, self.spans = inner, spans

    def get(self, idx, offset: int = 0, length=None):
        self.spans.append((int(idx), int(offset), None if length is None else int(length)))
        return self.inner.get(idx, offset=offset, length=length)


class ValueGPTDataset(GPTDataset):
    """GPTDataset whose samples add ``value_targets`` and mask the loss to tokens with one."""

    def __init__(self, indexed_dataset, dataset_path, indexed_indices, num_samples, index_split, config) -> None:
        self.values = IndexedDataset(values_prefix(dataset_path))
        self._last_values = None
        super().__init__(indexed_dataset, dataset_path, indexed_indices, num_samples, index_split, config)

    def _query_document_sample_shuffle_indices(self, idx: int):  # private: `QUERY_SAMPLE`
        spans: list = []
        tokens = self.dataset
        self.dataset = _RecordingDataset(tokens, spans)
        try:
            text, document_ids = super()._query_document_sample_shuffle_indices(idx)
        finally:
            self.dataset = tokens
        parts = [self.values.get(d, offset=o, length=n) for d, o, n in spans]
        pad = len(text) - sum(len(p) for p in parts)  # GPTDataset's padding: no targets
        self._last_values = numpy.concatenate(parts + [numpy.full(pad, numpy.nan, numpy.float32)])
        return text, document_ids

    def __getitem__(self, idx):
        sample = super().__getitem__(idx)
        values = torch.from_numpy(numpy.array(self._last_values, dtype=numpy.float32))
        if self.config.add_extra_token_to_sequence:
            values = values[:-1]
        has = torch.isfinite(values)
        if self.config.eod_mask_loss:  # honoured as for the LM: no loss at EOD tokens
            has &= sample["tokens"] != self.config.tokenizer.eod
        sample["value_targets"] = torch.where(has, values, torch.zeros_like(values))
        sample["loss_mask"] = has.float() if idx is not None else torch.zeros_like(values)
        return sample
