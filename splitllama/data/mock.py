"""A learnable mock dataset: Megatron's MockGPTDataset machinery over a predictable token pattern.

Megatron's ``MockGPTDataset`` documents are ``1, 2, 3, ...`` (only the position matters) with
a fixed seed of 0. Here each document follows an affine recurrence
``t[i+1] = (a * t[i] + b) % P`` with ``(a, b)`` drawn from a few pairs fixed by the seed and
``P = min(256, vocab)``, and ends with EOD. A tiny model learns it quickly (the loss falls from
``ln(vocab)`` towards ~0 once it can tell the pair from the context), so it is a useful smoke
test for the training loop. Documents depend only on (seed, document index): every rank that
builds the dataset gets the same data, whatever order it reads it in.
"""
from __future__ import annotations

import numpy

from megatron.core.datasets.gpt_dataset import GPTDatasetConfig, MockGPTDataset

PATTERN_VOCAB = 256
"""Token ids used by the pattern are ``0 .. min(PATTERN_VOCAB, vocab) - 1`` (EOD excluded)."""
NUM_PAIRS = 4
NUM_DOCUMENTS = 100_000
_MAX_LOG2_LENGTH = 24


def pattern_pairs(seed: int, modulus: int, num_pairs: int = NUM_PAIRS) -> numpy.ndarray:
    """The ``(a, b)`` pairs of a seed, shape [num_pairs, 2].

    ``a = 1 (mod 4)`` and ``b`` odd: by Hull-Dobell each pair then visits all ids in one cycle
    when ``modulus`` is a power of two (the usual 256).
    """
    rng = numpy.random.default_rng([seed, 0x5EED])
    a = rng.integers(1, max(modulus // 4, 2), size=num_pairs) * 4 + 1
    b = rng.integers(0, max(modulus // 2, 1), size=num_pairs) * 2 + 1
    return numpy.stack([a % modulus, b % modulus], axis=1).astype(numpy.int64)


class PatternLowLevelDataset:
    """Low-level (document) dataset with the interface GPTDataset reads from IndexedDataset."""

    def __init__(self, vocab_size: int, eod: int, seed: int, sequence_length: int) -> None:
        modulus = min(PATTERN_VOCAB, vocab_size)
        if eod < modulus:
            modulus = eod
        if modulus < 2:
            raise ValueError(f"learnable mock needs at least 2 non-EOD token ids (vocab {vocab_size})")
        self.modulus = modulus
        self.eod = eod
        self.seed = seed
        self.pairs = pattern_pairs(seed, modulus)
        # powers[p][k] = the step map of pair p applied 2**k times (a table over 0..modulus-1)
        step = (self.pairs[:, :1] * numpy.arange(modulus) + self.pairs[:, 1:]) % modulus
        self._powers = [step]
        for _ in range(_MAX_LOG2_LENGTH - 1):
            prev = self._powers[-1]
            self._powers.append(numpy.take_along_axis(prev, prev, axis=1))
        rng = numpy.random.default_rng([seed, 0x1E7])
        high = max(4 * sequence_length, 16)
        self.sequence_lengths = rng.integers(
            low=8, high=high, size=NUM_DOCUMENTS, dtype=numpy.int32
        )

    def __len__(self) -> int:
        return NUM_DOCUMENTS

    def __getitem__(self, idx: int) -> numpy.ndarray:
        length = int(self.sequence_lengths[idx])
        rng = numpy.random.default_rng([self.seed, 0xD0C, int(idx)])
        pair = int(rng.integers(0, len(self.pairs)))
        steps = numpy.arange(length, dtype=numpy.int64)
        tokens = numpy.full(length, int(rng.integers(0, self.modulus)), dtype=numpy.int64)
        for k in range(int(length).bit_length()):  # tokens[i] = step^i(t0), by binary powers
            sel = ((steps >> k) & 1).astype(bool)
            tokens[sel] = self._powers[k][pair][tokens[sel]]
        tokens[length - 1] = self.eod
        return tokens

    def get(self, idx: int, offset: int = 0, length: int | None = None) -> numpy.ndarray:
        """Slice of document ``idx`` (the IndexedDataset.get signature GPTDataset uses)."""
        if length is None:
            length = int(self.sequence_lengths[idx]) - offset
        return self[idx][offset : offset + length]


class LearnableMockDataset(MockGPTDataset):
    """MockGPTDataset over :class:`PatternLowLevelDataset`; samples are GPTDataset dicts
    (tokens, labels, loss_mask, position_ids[, attention_mask])."""

    @staticmethod
    def build_low_level_dataset(  # type: ignore[override]
        dataset_path: str | None, config: GPTDatasetConfig
    ) -> PatternLowLevelDataset:
        return PatternLowLevelDataset(
            config.tokenizer.vocab_size, config.tokenizer.eod, config.random_seed,
            config.sequence_length,
        )
