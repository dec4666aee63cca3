"""The tokenizer of an HF export: which one, checked against the model, written beside the weights.

Serving and RL frameworks load the tokenizer from the model directory (``vllm serve DIR``,
``LLM(model=DIR)``, veRL's ``HFModelConfig``), so an export should carry one:

- ``export-hf --tokenizer PATH`` (a ``tokenizer.json`` file or an HF tokenizer directory) wins;
- else the checkpoint's training job (``job_config.yaml`` saved in every checkpoint) names it:
  ``data.tokenizer_type=huggingface`` with ``data.tokenizer_model`` (a relative path is taken from
  the current directory, as the training run took it);
- else (token ids, ``sentencepiece`` / ``tiktoken`` files that transformers cannot load as they
  are, a converted checkpoint without a job) the export has no tokenizer, and the summary says so.

The tokenizer must fit the model's vocabulary (no id the embedding cannot hold). A tokenizer
without a pad token gets its eos token as pad (what veRL and transformers' ``generate`` do
anyway); bos / eos / pad ids go into ``generation_config.json``.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import yaml

from splitllama.checkpoint import dirs
from splitllama.convert.sources import ConversionError


@dataclass(frozen=True)
class TokenizerChoice:
    """Where the export's tokenizer comes from: ``path`` (None: no tokenizer) and why, in words."""
    path: Optional[str]
    why: str


@dataclass(frozen=True)
class SpecialIds:
    bos: Optional[int]
    eos: int
    pad: int
    pad_is_eos: bool


def _job_data_section(ckpt_dir: str) -> Optional[dict]:
    """The ``data`` section of the checkpoint's saved job, or None when it saved none."""
    path = os.path.join(ckpt_dir, dirs.JOB_CONFIG)
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            job = yaml.safe_load(f)
    except (OSError, yaml.YAMLError) as e:
        raise ConversionError(f"{path}: unreadable job config ({e})") from None
    data = job.get("data") if isinstance(job, dict) else None
    return data if isinstance(data, dict) else None


def choose(flag: Optional[str], ckpt_dir: str) -> TokenizerChoice:
    """The tokenizer an export of checkpoint directory `ckpt_dir` carries (see the module doc)."""
    if flag is not None:
        if not os.path.exists(flag):
            raise ConversionError(f"--tokenizer {flag}: no such file or directory (give a tokenizer.json "
                                  f"file or an HF tokenizer directory)")
        return TokenizerChoice(flag, "--tokenizer")
    data = _job_data_section(ckpt_dir)
    if data is None:
        return TokenizerChoice(None, f"the checkpoint saved no training job ({dirs.JOB_CONFIG}); "
                                     f"pass --tokenizer PATH to include one")
    kind, model = data.get("tokenizer_type"), data.get("tokenizer_model")
    if kind != "huggingface" or not isinstance(model, str) or not model:
        return TokenizerChoice(None, f"the run trained with data.tokenizer_type={kind}, not an HF tokenizer; "
                                     f"pass --tokenizer PATH to include one")
    if not os.path.exists(model):
        raise ConversionError(f"{os.path.join(ckpt_dir, dirs.JOB_CONFIG)}: data.tokenizer_model {model} does not "
                              f"exist (from {os.getcwd()}); pass --tokenizer PATH")
    return TokenizerChoice(model, f"data.tokenizer_model of the checkpoint's job")


@dataclass(frozen=True)
class LoadedTokenizer:
    hf_tokenizer: object  # a transformers tokenizer
    ids: SpecialIds


def load(choice: TokenizerChoice, vocab_size: int) -> Optional[LoadedTokenizer]:
    """Load the chosen tokenizer (None: the export has none), before anything is written; refuse
    one that can emit ids >= `vocab_size`. A tokenizer without a pad token gets eos as pad."""
    if choice.path is None:
        return None
    from splitllama.data.tokenizers import HuggingFaceTokenizer, check_vocab

    try:
        tok = HuggingFaceTokenizer(choice.path)
        check_vocab(tok, vocab_size)
    except (OSError, ValueError) as e:
        raise ConversionError(f"tokenizer {choice.path} ({choice.why}): {e}") from None
    hf_tok = tok.hf_tokenizer
    pad_is_eos = hf_tok.pad_token_id is None
    if pad_is_eos:
        hf_tok.pad_token = hf_tok.eos_token
    return LoadedTokenizer(hf_tok, SpecialIds(bos=tok.bos, eos=tok.eod, pad=int(hf_tok.pad_token_id),
                                              pad_is_eos=pad_is_eos))


def write(loaded: LoadedTokenizer, out: Path) -> None:
    """tokenizer.json, tokenizer_config.json, ... into the export directory `out`."""
    loaded.hf_tokenizer.save_pretrained(str(out))


def describe(choice: TokenizerChoice, loaded: Optional[LoadedTokenizer]) -> str:
    """One summary line for the converter's output."""
    if loaded is None:
        return f"tokenizer: none ({choice.why})"
    ids = loaded.ids
    pad = f"pad {ids.pad}" + (" (= eos: the tokenizer has no pad token)" if ids.pad_is_eos else "")
    return f"tokenizer: {choice.path} ({choice.why}); bos {ids.bos}, eos {ids.eos}, {pad}"
