"""Data section of the SplitLlama config: the one place its defaults live.

The random seed is deliberately absent: it belongs to the train config and is passed to
:func:`splitllama.data.datasets.build_datasets` explicitly.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Optional

TOKENIZER_TYPES = ("null", "sentencepiece", "huggingface", "tiktoken")


@dataclass
class DataConfig:
    """Training data: synthetic (mock) or tokenized files, sample length, tokenizer.

    (``Optional[...]`` rather than ``X | None``: the job-config loader unwraps typing.Union.)

    ``data_path`` follows Megatron: ``["prefix"]``, ``["prefix1", "prefix2"]`` (weighted by size)
    or ``["w1", "prefix1", "w2", "prefix2"]`` (explicit blend weights). A prefix names the
    ``PREFIX.bin``/``PREFIX.idx`` pair written by ``tools/preprocess_data.py`` (for example
    ``out/corpus_text_document``).
    """

    mock: bool = True
    """Use synthetic data instead of ``data_path``."""
    mock_pattern: bool = False
    """Kind of synthetic data when ``mock`` is on: a learnable affine token pattern
    (:class:`LearnableMockDataset`) instead of Megatron's ``MockGPTDataset`` (token ``i`` at
    position ``i``). Not read when ``mock`` is off."""
    data_path: list[str] = field(default_factory=list)
    """Megatron blend: [prefix], [prefix1, prefix2] (weighted by size) or [w1, prefix1, w2, prefix2]."""
    split: str = "969,30,1"
    """Train/valid/test weights over the documents of each prefix (Megatron ``--split``)."""
    seq_length: int = 128
    """Tokens per training sample."""
    tokenizer_type: str = "null"
    """null (ids as text; vocab_size ids), sentencepiece, huggingface or tiktoken."""
    tokenizer_model: Optional[str] = None
    """``.model`` file (sentencepiece, tiktoken), or a directory or ``tokenizer.json`` file (huggingface)."""
    vocab_size: Optional[int] = None
    """Vocabulary size of the ``null`` tokenizer (ids ``0..vocab_size-1``, EOD = vocab_size-1)."""
    num_workers: int = 0
    """torch DataLoader worker processes."""
    reset_position_ids: bool = False
    """RoPE positions restart after every EOD token (Megatron ``--reset-position-ids``); both
    blocks honour them."""
    reset_attention_mask: bool = False
    """Attention does not cross EOD tokens: causal within each document (Megatron
    ``--reset-attention-mask``); ``sdpa`` and ``local`` attention honour it."""
    eod_mask_loss: bool = False
    """No loss on EOD labels (Megatron ``--eod-mask-loss``)."""
    packed_sequences: bool = False
    """Samples are whole documents (of one ``data_path`` prefix, or the mock documents) packed
    greedily into ``seq_length`` tokens without padding between them: variable-length THD
    micro-batches with ``cu_seqlens``, attention and RoPE restarting per document, loss on real
    tokens only. Needs ``model.attention_backend=sdpa`` and ``train.micro_batch_size=1``."""
    cache_dir: Optional[str] = None
    """Megatron ``path_to_cache`` for the sample/shuffle indices; null: next to the data."""

    def validate(self) -> None:
        """Raise ValueError naming the first inconsistent field."""
        if self.tokenizer_type not in TOKENIZER_TYPES:
            raise ValueError(
                f"data.tokenizer_type={self.tokenizer_type!r}; expected one of {TOKENIZER_TYPES}"
            )
        if self.tokenizer_type == "null":
            if self.vocab_size is None or self.vocab_size < 2:
                raise ValueError(
                    f"data.vocab_size must be an integer >= 2 for the null tokenizer "
                    f"(got {self.vocab_size!r})"
                )
        elif not self.tokenizer_model:
            raise ValueError(
                f"data.tokenizer_model is required for tokenizer_type={self.tokenizer_type!r}"
            )
        if self.seq_length < 1:
            raise ValueError(f"data.seq_length must be >= 1 (got {self.seq_length})")
        if self.num_workers < 0:
            raise ValueError(f"data.num_workers must be >= 0 (got {self.num_workers})")
        if self.mock and self.data_path:
            raise ValueError(
                "data.data_path is set but data.mock=True; set data.mock=false to train on "
                "the files, or clear data.data_path"
            )
        if not self.mock:
            if not self.data_path:
                raise ValueError("data.data_path is empty and data.mock=False: nothing to train on")
            parse_blend(self.data_path)
        parse_split(self.split)
        if self.packed_sequences and not self.mock:
            prefixes = parse_blend(self.data_path)[0]
            if len(prefixes) != 1:
                raise ValueError(f"data.packed_sequences packs the documents of one prefix; "
                                 f"data.data_path names {len(prefixes)}")


def parse_blend(data_path: list[str]) -> tuple[list[str], list[float] | None]:
    """Split a Megatron ``data_path`` list into (prefixes, weights or None); ValueError if bad."""
    if not data_path:
        raise ValueError("data.data_path is empty")
    if len(data_path) % 2 == 1:
        return list(data_path), None
    weights: list[float] = []
    prefixes: list[str] = []
    for w, prefix in zip(data_path[0::2], data_path[1::2]):
        try:
            weight = float(w)
        except ValueError:
            raise ValueError(
                f"data.data_path={data_path!r}: an even-length list must alternate weight, "
                f"prefix (got {w!r} where a weight was expected); list a single prefix or "
                f"give every prefix a weight"
            ) from None
        if not weight > 0:
            raise ValueError(f"data.data_path: weight {w!r} for {prefix!r} must be > 0")
        weights.append(weight)
        prefixes.append(prefix)
    return prefixes, weights


def parse_split(split: str) -> list[float]:
    """Parse ``"969,30,1"`` into three normalised fractions; ValueError if malformed."""
    parts = [p.strip() for p in split.split(",")] if split else []
    if not 1 <= len(parts) <= 3 or not all(re.fullmatch(r"\d+(\.\d*)?|\.\d+", p) for p in parts):
        raise ValueError(
            f"data.split={split!r}: expected up to three non-negative numbers like '969,30,1'"
        )
    values = [float(p) for p in parts] + [0.0] * (3 - len(parts))
    total = sum(values)
    if total <= 0:
        raise ValueError(f"data.split={split!r}: the weights sum to zero")
    return [v / total for v in values]
