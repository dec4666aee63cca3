"""Train/valid/test datasets from megatron.core.datasets (no megatron/training code).

``build_datasets`` wraps ``BlendedMegatronDatasetBuilder`` + ``GPTDatasetConfig``: real data
(one prefix or a weighted blend) gives ``GPTDataset``/``BlendedDataset``; ``mock`` gives
Megatron's ``MockGPTDataset`` or, with ``mock_pattern``, our ``LearnableMockDataset``. Samples
are dicts of tensors: tokens, labels, loss_mask, position_ids (and attention_mask only when
``reset_attention_mask`` is on; otherwise attention builds its own causal mask). Blended
samples also carry ``dataset_id``.

Rank convention (``is_built_on_rank``): every rank builds the datasets. Call
``build_datasets`` on all ranks: when torch.distributed is initialised Megatron builds on rank 0
first (writing the index cache), barriers, then the other ranks load the cache. Without a cache
every rank computes the same indices from the same seed, so the data is deterministic anyway.
"""
from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any
from unittest import mock

import numpy
import torch
from torch.utils.data import Dataset

from splitllama.data.config import DataConfig, parse_blend
from splitllama.data.helpers import ensure_helpers
from splitllama.data.tokenizers import Tokenizer

SPLIT_NAMES = ("train", "valid", "test")


def is_built_on_rank() -> bool:
    """Every rank builds (and holds) the datasets; see the module docstring."""
    return True


def build_datasets(
    cfg: DataConfig,
    *,
    seq_length: int | None = None,
    global_batch_size: int,
    train_samples: int,
    eval_samples: int,
    test_samples: int,
    seed: int,
    tokenizer: Tokenizer,
) -> tuple[Dataset | None, Dataset | None, Dataset | None]:
    """Build (train, valid, test); a split whose ``cfg.split`` weight is 0 comes back None.

    Args:
        cfg: the data config (validated here).
        seq_length: tokens per sample fed to the model (default ``cfg.seq_length``); each sample
            reads ``seq_length + 1`` tokens so that labels are the inputs shifted by one.
        global_batch_size: samples per optimizer step (the train split must hold at least one).
        train_samples / eval_samples / test_samples: samples each split must provide; Megatron
            repeats (reshuffled) epochs until it has them.
        seed: the train config's seed; it fixes document and sample shuffling.
        tokenizer: from :func:`splitllama.data.tokenizers.build_tokenizer`; its EOD drives the
            reset/eod-mask options and its vocab_size the mock data.

    Raises:
        ValueError: bad config, a missing or empty prefix, a prefix with fewer than
            ``seq_length + 1`` tokens, or a split holding no documents of a prefix.
    """
    from megatron.core.datasets.blended_megatron_dataset_builder import (
        BlendedMegatronDatasetBuilder,
    )
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig, MockGPTDataset

    cfg.validate()
    seq = cfg.seq_length if seq_length is None else seq_length
    if seq < 1 or global_batch_size < 1:
        raise ValueError(f"seq_length ({seq}) and global_batch_size ({global_batch_size}) must be >= 1")
    if min(train_samples, eval_samples, test_samples) < 0:
        raise ValueError("train/eval/test sample counts must be >= 0")
    if cfg.packed_sequences:
        return build_packed_datasets(cfg, seq, [train_samples, eval_samples, test_samples], seed,
                                     tokenizer)
    ensure_helpers(os.path.join(cfg.cache_dir, "helpers") if cfg.cache_dir else None)

    blend: tuple[list[str], list[float] | None] | None = None
    cls: Any
    if cfg.mock:
        from splitllama.data.mock import LearnableMockDataset

        cls = LearnableMockDataset if cfg.mock_pattern else MockGPTDataset
    else:
        prefixes, weights = parse_blend(cfg.data_path)
        for prefix in prefixes:
            check_prefix(prefix, seq, cfg.split)
        blend = (prefixes, weights)
        cls = GPTDataset
    config = GPTDatasetConfig(
        random_seed=seed,
        sequence_length=seq,
        blend=blend,
        split=cfg.split,
        path_to_cache=None if cfg.mock else cfg.cache_dir,
        tokenizer=tokenizer,
        reset_position_ids=cfg.reset_position_ids,
        reset_attention_mask=cfg.reset_attention_mask,
        eod_mask_loss=cfg.eod_mask_loss,
        create_attention_mask=cfg.reset_attention_mask,
    )
    sizes = [train_samples, eval_samples, test_samples]
    builder = BlendedMegatronDatasetBuilder(cls, sizes, is_built_on_rank, config)
    with _rank_zero_without_process_group():
        train, valid, test = builder.build()
    if train is not None and train_samples > 0 and len(train) < global_batch_size:
        raise ValueError(
            f"the train split has {len(train)} samples, fewer than one global batch "
            f"({global_batch_size})"
        )
    return train, valid, test


def build_packed_datasets(cfg: DataConfig, seq: int, sizes: list[int], seed: int,
                          tokenizer: Tokenizer) -> tuple[Dataset | None, ...]:
    """(train, valid, test) of :class:`PackedDocumentDataset` over the split's documents."""
    from megatron.core.datasets.blended_megatron_dataset_config import (
        convert_split_vector_to_split_matrix,
        parse_and_normalize_split,
    )

    from splitllama.data.packing import PackedDocumentDataset

    if cfg.mock:
        from splitllama.data.mock import PatternLowLevelDataset

        source: Any = PatternLowLevelDataset(tokenizer.vocab_size, tokenizer.eod, seed, seq)
    else:
        from megatron.core.datasets.indexed_dataset import IndexedDataset

        prefix = parse_blend(cfg.data_path)[0][0]
        check_prefix(prefix, 1, cfg.split)
        source = IndexedDataset(prefix)
    n_docs = len(source.sequence_lengths)
    matrix = convert_split_vector_to_split_matrix(parse_and_normalize_split(cfg.split))
    out: list[Dataset | None] = []
    for i, (bounds, n) in enumerate(zip(matrix, sizes)):
        if bounds is None or n == 0:
            out.append(None)
            continue
        docs = numpy.arange(int(round(bounds[0] * n_docs)), int(round(bounds[1] * n_docs)))
        eod = tokenizer.eod if cfg.eod_mask_loss else None
        out.append(PackedDocumentDataset(source, docs, seq, n, seed + i, eod=eod))
    return tuple(out)


@contextlib.contextmanager
def _rank_zero_without_process_group() -> Iterator[None]:
    """megatron-core 0.16.1's BlendedDataset calls ``torch.distributed.get_rank()`` when it writes
    its index cache, even with no process group (single-process runs with ``cache_dir`` set
    crash). Only while no process group exists, answer rank 0 for the duration of the build."""
    if torch.distributed.is_initialized():
        yield
        return
    with mock.patch.object(torch.distributed, "get_rank", lambda group=None: 0):
        yield


def check_prefix(prefix: str, seq_length: int, split: str) -> None:
    """Raise ValueError unless ``prefix`` exists, holds one sample and every split gets documents.

    Megatron would otherwise fail obscurely (or loop forever computing epochs) on such data.
    """
    from megatron.core.datasets.blended_megatron_dataset_config import (
        convert_split_vector_to_split_matrix,
        parse_and_normalize_split,
    )
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    if not IndexedDataset.exists(prefix):
        raise ValueError(
            f"dataset prefix {prefix!r}: {prefix}.bin/.idx not found (a prefix names the files "
            f"without extension, e.g. out/corpus_text_document)"
        )
    indexed = IndexedDataset(prefix)  # keep it alive while copying: it unmaps on deletion
    lengths = numpy.array(indexed.sequence_lengths, dtype=numpy.int64)
    del indexed
    n_docs, n_tokens = len(lengths), int(lengths.sum())
    if n_docs == 0 or n_tokens == 0:
        raise ValueError(f"dataset prefix {prefix!r} is empty ({n_docs} documents, {n_tokens} tokens)")
    if n_tokens < seq_length + 1:
        raise ValueError(
            f"dataset prefix {prefix!r} holds {n_tokens} tokens, fewer than one sample needs "
            f"(seq_length + 1 = {seq_length + 1})"
        )
    matrix = convert_split_vector_to_split_matrix(parse_and_normalize_split(split))
    for name, bounds in zip(SPLIT_NAMES, matrix):
        if bounds is None:
            continue
        beg, end = int(round(bounds[0] * n_docs)), int(round(bounds[1] * n_docs))
        if int(lengths[beg:end].sum()) == 0:
            raise ValueError(
                f"dataset prefix {prefix!r}: split {split!r} gives the {name} split documents "
                f"[{beg}, {end}) of {n_docs}, which hold no tokens; use more documents or a "
                f"split giving {name} weight 0 (e.g. '98,2,0')"
            )
