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

import os
import struct
from typing import Any

import numpy
from torch.utils.data import Dataset

from splitllama.config.data import DataConfig, parse_blend
from splitllama.data.helpers import ensure_helpers
from splitllama.data.tokenizers import Tokenizer
from splitllama.platform.compat.datasets import rank_zero_without_process_group

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
    value_targets: bool = False,
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
        value_targets: critic data (``model.head=value``): samples also carry per-token
            ``value_targets`` and the loss mask marks the tokens that have one
            (:class:`splitllama.data.value_dataset.ValueGPTDataset`); needs real data.

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
    if value_targets and cfg.mock:
        raise ValueError("model.head=value trains on value targets from the data: set data.mock=false "
                         "and data.data_path to a corpus preprocessed with tools/preprocess_data.py "
                         "--values-key")
    if cfg.mock:
        from splitllama.data.mock import LearnableMockDataset

        cls = LearnableMockDataset if cfg.mock_pattern else MockGPTDataset
    else:
        prefixes, weights = parse_blend(cfg.data_path)
        for prefix in prefixes:
            check_prefix(prefix, seq, cfg.split)
            check_token_ids(prefix, tokenizer.vocab_size, f"data.tokenizer_type={cfg.tokenizer_type!r}")
        blend = (prefixes, weights)
        cls = GPTDataset
        if value_targets:
            from splitllama.data.value_dataset import ValueGPTDataset, check_values_prefix

            for prefix in prefixes:
                check_values_prefix(prefix)
            cls = ValueGPTDataset
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
    with rank_zero_without_process_group():
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


_IDX_HEADER = 34  # magic 9 + version 8 + dtype code 1 + sequence count 8 + document count 8


def check_index_sizes(prefix: str) -> None:
    """Raise ValueError when ``prefix``.idx / .bin are shorter than their header says (a copy
    that stopped early); Megatron would fail with "buffer is smaller than requested size"."""
    idx, bin_ = f"{prefix}.idx", f"{prefix}.bin"
    size = os.path.getsize(idx)
    with open(idx, "rb") as f:
        head = f.read(_IDX_HEADER)
    if len(head) < _IDX_HEADER or not head.startswith(b"MMIDIDX"):
        raise ValueError(f"{idx}: not a Megatron index file, or truncated ({size} bytes)")
    code = head[17]
    seqs, docs = struct.unpack("<QQ", head[18:34])
    need = _IDX_HEADER + 12 * seqs + 8 * docs
    if size < need:
        raise ValueError(f"{idx} is truncated: {size} bytes, its header ({seqs} sequences, {docs} "
                         f"documents) needs {need}")
    if seqs:
        lengths = numpy.fromfile(idx, dtype=numpy.int32, count=seqs, offset=_IDX_HEADER)
        pointers = numpy.fromfile(idx, dtype=numpy.int64, count=seqs, offset=_IDX_HEADER + 4 * seqs)
        itemsize = {1: 1, 2: 1, 3: 2, 4: 4, 5: 8, 6: 8, 7: 8, 8: 2}.get(code, 1)
        end = int(pointers[-1]) + int(lengths[-1]) * itemsize
        if os.path.getsize(bin_) < end:
            raise ValueError(f"{bin_} is truncated: {os.path.getsize(bin_)} bytes, {idx} needs {end}")


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
    check_index_sizes(prefix)
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
    for i, (name, bounds) in enumerate(zip(SPLIT_NAMES, matrix)):
        if bounds is None:
            continue
        beg, end = int(round(bounds[0] * n_docs)), int(round(bounds[1] * n_docs))
        if int(lengths[beg:end].sum()) == 0:
            raise ValueError(
                f"dataset prefix {prefix!r}: split {split!r} gives the {name} split documents "
                f"[{beg}, {end}) of {n_docs}, which hold no tokens; use more documents or "
                f"{_split_fix(split, i, n_docs)}"
            )


def _split_fix(split: str, empty: int, n_docs: int) -> str:
    """A data.split that gives split number ``empty`` weight 0, or (valid/test) one document."""
    weights = [p.strip() for p in split.split(",")] + ["0"] * (3 - len(split.split(",")))
    zero = ",".join("0" if j == empty else w for j, w in enumerate(weights))
    if empty == 0 or n_docs < 2:
        return f"a split giving the {SPLIT_NAMES[empty]} split weight 0 (data.split={zero})"
    one = ",".join(str(n_docs - 1) if j == 0 else "1" if j == empty else "0" for j in range(3))
    return (f"data.split={zero} (no {SPLIT_NAMES[empty]} split) or data.split={one} (one "
            f"{SPLIT_NAMES[empty]} document)")


SCAN_TOKENS = 1 << 26
"""check_token_ids reads at most this many tokens of each prefix (64M: about 0.1 s)."""


def check_token_ids(prefix: str, vocab_size: int, what: str = "the tokenizer",
                    max_tokens: int = SCAN_TOKENS) -> None:
    """Raise ValueError when the first ``max_tokens`` tokens of ``prefix`` hold an id
    ``>= vocab_size`` (data tokenized with a larger vocabulary than the run's; the embedding
    lookup would fail with an IndexError). The training step checks every batch as well."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    indexed = IndexedDataset(prefix)
    dtype = indexed.index.dtype
    del indexed
    data = numpy.memmap(prefix + ".bin", dtype=dtype, mode="r")
    end = min(len(data), max_tokens)
    for start in range(0, end, 1 << 22):
        chunk = data[start:min(start + (1 << 22), end)]
        top = int(chunk.max()) if len(chunk) else 0
        if top >= vocab_size:
            pos = start + int(numpy.argmax(chunk >= vocab_size))
            raise ValueError(
                f"dataset prefix {prefix!r} holds token id {int(data[pos])} (token {pos} of the "
                f".bin) but {what} has vocab_size {vocab_size}: the data was tokenized with a "
                f"larger vocabulary; set data.tokenizer_type/tokenizer_model to that tokenizer and "
                f"use a model whose vocab_size is > {top}"
            )
    del data
