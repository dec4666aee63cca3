"""A small tokenizer abstraction: null (ids as text), sentencepiece, HF directory, LLaMA-3 tiktoken.

Every tokenizer exposes ``vocab_size``, ``eod`` (== ``eos``, appended after each document),
``bos`` (or None), ``tokenize(text) -> list[int]`` (never adds special tokens) and
``detokenize(ids) -> str``. ``unique_identifiers`` lets Megatron's dataset cache key on it.
The heavy libraries are imported lazily, so this module is cheap to import in worker processes.
"""
from __future__ import annotations

import hashlib
import os
from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

# LLaMA-3 (Meta's tokenizer.py) split pattern and special tokens; they follow the BPE ranks.
LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
LLAMA3_NUM_SPECIAL_TOKENS = 256
_LLAMA3_NAMED = [
    "<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
    "<|reserved_special_token_1|>", "<|finetune_right_pad_id|>", "<|step_id|>",
    "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>", "<|python_tag|>",
]
LLAMA3_SPECIAL_TOKENS = _LLAMA3_NAMED + [
    f"<|reserved_special_token_{2 + i}|>"
    for i in range(LLAMA3_NUM_SPECIAL_TOKENS - len(_LLAMA3_NAMED))
]


class Tokenizer(ABC):
    """Common interface (also what Megatron's GPTDataset reads: vocab_size, eod)."""

    vocab_size: int
    eod: int
    bos: int | None

    def __init__(self, **identifiers: Any) -> None:
        self.unique_identifiers: OrderedDict[str, Any] = OrderedDict([("class", type(self).__name__)])
        self.unique_identifiers.update({k: str(v) for k, v in identifiers.items()})

    @property
    def eos(self) -> int:
        """End-of-sequence id; the same token as ``eod``."""
        return self.eod

    @abstractmethod
    def tokenize(self, text: str) -> list[int]:
        """Text to ids, without BOS/EOS."""

    @abstractmethod
    def detokenize(self, ids: Sequence[int]) -> str:
        """Ids back to text."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}(vocab_size={self.vocab_size}, eod={self.eod}, bos={self.bos})"


class NullTokenizer(Tokenizer):
    """Text is whitespace-separated integer ids (for tests); EOD is ``vocab_size - 1``."""

    def __init__(self, vocab_size: int) -> None:
        if vocab_size < 2:
            raise ValueError(f"null tokenizer needs vocab_size >= 2 (got {vocab_size})")
        super().__init__(vocab_size=vocab_size)
        self.vocab_size = vocab_size
        self.eod = vocab_size - 1
        self.bos = None

    def tokenize(self, text: str) -> list[int]:
        try:
            ids = [int(tok) for tok in text.split()]
        except ValueError as err:
            raise ValueError(f"null tokenizer expects whitespace-separated integers: {err}") from None
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise ValueError(f"null tokenizer: id {bad[0]} outside [0, {self.vocab_size})")
        return ids

    def detokenize(self, ids: Sequence[int]) -> str:
        return " ".join(str(int(i)) for i in ids)


class SentencePieceTokenizer(Tokenizer):
    """A sentencepiece ``.model`` file; EOD is the model's ``</s>`` (eos_id)."""

    def __init__(self, model_path: str) -> None:
        import sentencepiece

        _require_file(model_path, "sentencepiece")
        super().__init__(path=os.path.abspath(model_path), sha256=_sha256(model_path))
        try:
            self._sp = sentencepiece.SentencePieceProcessor(model_file=model_path)
        except (RuntimeError, OSError) as e:  # "Internal: could not parse ModelProto ..."
            raise ValueError(f"{model_path}: not a sentencepiece model ({' '.join(str(e).split())})") from None
        self.vocab_size = int(self._sp.vocab_size())
        eos = int(self._sp.eos_id())
        if eos < 0:
            raise ValueError(f"sentencepiece model {model_path} defines no eos (</s>) token")
        self.eod = eos
        self.bos = int(self._sp.bos_id()) if self._sp.bos_id() >= 0 else None

    def tokenize(self, text: str) -> list[int]:
        return list(self._sp.encode(text))

    def detokenize(self, ids: Sequence[int]) -> str:
        return self._sp.decode([int(i) for i in ids])


# End-of-text tokens looked for when a bare tokenizer.json comes without a tokenizer_config.json
_EOS_CANDIDATES = ("<|end_of_text|>", "</s>", "<|endoftext|>", "<eos>")


class HuggingFaceTokenizer(Tokenizer):
    """A local HF tokenizer: a directory (tokenizer.json, tokenizer_config.json, ...) or a
    ``tokenizer.json`` file, loaded with local files only. A file's special tokens come from
    a ``tokenizer_config.json`` next to it, else eos is the first known end-of-text token."""

    def __init__(self, path: str) -> None:
        from transformers import AutoTokenizer, PreTrainedTokenizerFast

        if os.path.isdir(path):
            self._tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
        elif os.path.isfile(path):
            folder = os.path.dirname(os.path.abspath(path))
            if (os.path.basename(path) == "tokenizer.json"
                    and os.path.isfile(os.path.join(folder, "tokenizer_config.json"))):
                self._tok = AutoTokenizer.from_pretrained(folder, local_files_only=True)
            else:
                self._tok = PreTrainedTokenizerFast(tokenizer_file=path)
                if self._tok.eos_token_id is None:
                    vocab = self._tok.get_vocab()
                    found = next((t for t in _EOS_CANDIDATES if t in vocab), None)
                    if found is not None:
                        self._tok.eos_token = found
        else:
            raise FileNotFoundError(f"huggingface tokenizer not found: {path} (expected a directory "
                                    f"or a tokenizer.json file)")
        super().__init__(path=os.path.abspath(path))
        self.vocab_size = len(self._tok)
        eos = self._tok.eos_token_id
        if eos is None:
            raise ValueError(f"huggingface tokenizer {path} defines no eos token (none of "
                             f"{list(_EOS_CANDIDATES)} is in its vocabulary)")
        self.eod = int(eos)
        self.bos = None if self._tok.bos_token_id is None else int(self._tok.bos_token_id)

    @property
    def hf_tokenizer(self):
        """The underlying transformers tokenizer (what an HF export saves)."""
        return self._tok

    def tokenize(self, text: str) -> list[int]:
        return list(self._tok.encode(text, add_special_tokens=False))

    def detokenize(self, ids: Sequence[int]) -> str:
        return self._tok.decode([int(i) for i in ids])


class TiktokenTokenizer(Tokenizer):
    """LLaMA-3 ``tokenizer.model``: tiktoken BPE ranks + LLaMA-3 pattern + 256 special tokens.

    With the real file (128000 ranks) ``<|begin_of_text|>`` = 128000 and ``<|end_of_text|>`` =
    128001 (= eod), vocab_size = 128256. Special-token text inside documents is encoded as plain
    text, never as the special id.
    """

    def __init__(self, model_path: str) -> None:
        import tiktoken
        from tiktoken.load import load_tiktoken_bpe

        _require_file(model_path, "tiktoken")
        digest = _sha256(model_path)
        super().__init__(path=os.path.abspath(model_path), sha256=digest)
        # expected_hash keeps tiktoken's /tmp cache (keyed by path) from serving a stale file.
        ranks = load_tiktoken_bpe(model_path, expected_hash=digest)
        base = len(ranks)
        if sorted(ranks.values()) != list(range(base)):
            raise ValueError(f"tiktoken file {model_path}: ranks are not exactly 0..{base - 1}")
        special = {tok: base + i for i, tok in enumerate(LLAMA3_SPECIAL_TOKENS)}
        self._enc = tiktoken.Encoding(
            name=os.path.basename(model_path), pat_str=LLAMA3_PATTERN,
            mergeable_ranks=ranks, special_tokens=special,
        )
        self.vocab_size = base + LLAMA3_NUM_SPECIAL_TOKENS
        self.bos = special["<|begin_of_text|>"]
        self.eod = special["<|end_of_text|>"]

    def tokenize(self, text: str) -> list[int]:
        return self._enc.encode(text, allowed_special=set(), disallowed_special=())

    def detokenize(self, ids: Sequence[int]) -> str:
        return self._enc.decode([int(i) for i in ids])


def make_tokenizer(
    tokenizer_type: str, tokenizer_model: str | None = None, vocab_size: int | None = None
) -> Tokenizer:
    """Build a tokenizer from plain (picklable) arguments, e.g. inside a worker process."""
    if tokenizer_type == "null":
        if vocab_size is None:
            raise ValueError("the null tokenizer needs vocab_size")
        return NullTokenizer(vocab_size)
    if not tokenizer_model:
        raise ValueError(f"tokenizer_type={tokenizer_type!r} needs tokenizer_model (a path)")
    if tokenizer_type == "sentencepiece":
        return SentencePieceTokenizer(tokenizer_model)
    if tokenizer_type == "huggingface":
        return HuggingFaceTokenizer(tokenizer_model)
    if tokenizer_type == "tiktoken":
        return TiktokenTokenizer(tokenizer_model)
    raise ValueError(
        f"unknown tokenizer_type {tokenizer_type!r}; expected null|sentencepiece|huggingface|tiktoken"
    )


def build_tokenizer(cfg: Any) -> Tokenizer:
    """Build the tokenizer a :class:`~splitllama.config.data.DataConfig` names."""
    return make_tokenizer(cfg.tokenizer_type, cfg.tokenizer_model, cfg.vocab_size)


def check_vocab(tokenizer: Tokenizer, model_vocab_size: int) -> None:
    """Raise ValueError when the tokenizer can emit ids the model's embedding cannot hold."""
    if tokenizer.vocab_size > model_vocab_size:
        raise ValueError(
            f"tokenizer vocab size {tokenizer.vocab_size} exceeds the model's vocab size "
            f"{model_vocab_size} ({tokenizer!r}); use a matching tokenizer or a larger model "
            f"vocab_size (ids >= {model_vocab_size} would index past the embedding)"
        )


def _require_file(path: str, kind: str) -> None:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{kind} tokenizer model file not found: {path}")


def _sha256(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()
