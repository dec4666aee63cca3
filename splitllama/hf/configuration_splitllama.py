"""Configuration of the HF (transformers) SplitLlama model.

The model is ``lower LLaMA embedding -> its first N layers -> adapter -> last M layers of an upper LLaMA ->
upper final norm -> upper lm_head``. The seed checkpoint schema names the lower model "8b" and the upper "70b";
those field names are kept (``path8b``, ``num_layers_8``, ...) so checkpoints interoperate.

This file is copied next to exported checkpoints (``trust_remote_code``) and must import nothing from
``splitllama``.
"""

from __future__ import annotations

import copy
import math
from typing import Any

from transformers import LlamaConfig, PretrainedConfig

# Keys of a ``LlamaConfig.to_dict()`` that describe where/when it was saved, not the architecture.
_VOLATILE_KEYS = ("_name_or_path", "transformers_version", "_commit_hash")


def tiny_llama_configs() -> tuple[dict[str, Any], dict[str, Any]]:
    """Two small LLaMA-3.1-style config.json dicts ``(lower, upper)`` for tests and defaults.

    Both use llama3 RoPE scaling with ``original_max_position_embeddings=64`` so that the scaling is exercised
    with short sequences. Lower: hidden 64, 4 layers; upper: hidden 128, 6 layers; head_dim 16, 2 KV heads.
    """
    common: dict[str, Any] = {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "vocab_size": 512,
        "hidden_act": "silu",
        "max_position_embeddings": 256,
        "rms_norm_eps": 1e-5,
        "rope_theta": 500000.0,
        "rope_scaling": {
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        },
        "tie_word_embeddings": False,
        "attention_bias": False,
        "mlp_bias": False,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "initializer_range": 0.02,
    }
    lower = dict(copy.deepcopy(common), hidden_size=64, intermediate_size=160, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=16, num_hidden_layers=4)
    upper = dict(copy.deepcopy(common), hidden_size=128, intermediate_size=320, num_attention_heads=8,
                 num_key_value_heads=2, head_dim=16, num_hidden_layers=6)
    return lower, upper


def llama_config_to_dict(config: LlamaConfig) -> dict[str, Any]:
    """A plain, JSON-able dict of a LlamaConfig (its config.json contents, without save metadata)."""
    out = config.to_dict()
    for key in _VOLATILE_KEYS:
        out.pop(key, None)
    return out


def _kv_heads(config: LlamaConfig) -> int:
    return int(config.num_key_value_heads or config.num_attention_heads)


def _head_dim(config: LlamaConfig) -> int:
    return int(getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads)


class CustomSplitLLamaConfig(PretrainedConfig):
    """Config of :class:`CustomSplitLLamaForCausalLM`.

    Args:
        path8b: path or hub id of the lower LLaMA (only used when ``config8b`` is absent).
        path70b: path or hub id of the upper LLaMA (only used when ``config70b`` is absent).
        num_layers_8: N, the number of leading lower layers kept.
        num_layers_70: M, the number of trailing upper layers kept.
        mlp: adapter form; False: one ``adapter`` Linear, True: Linear -> ReLU -> Linear.
        vocab_size: vocabulary size (defaults to the lower model's; both models must agree).
        rms_norm_eps: eps of the final norm (defaults to the upper model's).
        config8b / config70b: embedded LLaMA config dicts, so a saved directory is self-contained.
            When absent they are loaded from ``path8b``/``path70b``; when those are absent too, the tiny
            test configs of :func:`tiny_llama_configs` are used.

    ``num_hidden_layers`` is always ``num_layers_8 + num_layers_70``: it is the number of KV-cache layers
    (lower layers use cache indices 0..N-1, upper layers N..N+M-1).

    Top-level attributes for frameworks that read one LLaMA-like config (veRL, vLLM): derived from the two
    blocks, never read by this model (its layers use :meth:`lower_config` / :meth:`upper_config`):

    - ``hidden_size = gcd(lower, upper)``, ``num_attention_heads = gcd(...)``, ``num_key_value_heads = gcd(...)``.
      The gcd makes every divisibility check ``x % d == 0`` (heads % tp, kv_heads % tp, hidden % sp, ...) true
      exactly when it is true for both blocks. Checks between two attributes hold whenever they hold in both
      blocks: ``hidden_size % num_attention_heads == 0`` (a common divisor of the heads divides both hiddens) and
      ``num_attention_heads % num_key_value_heads == 0``. The one-sided test ``d % kv_heads == 0`` (KV-head
      replication when d > kv_heads) is weaker on the gcd than on the blocks; SplitLlama's own TP and vLLM-plugin
      checks are made per block.
    - ``max_position_embeddings = min(lower, upper)``: the longest sequence both blocks' RoPE were made for.
    - ``head_dim``: the blocks' head dim when they agree, otherwise absent (``None``).

    They are recomputed on every construction; a value stored in config.json (``save_pretrained`` writes them)
    must equal the derived one, otherwise loading fails naming the key (edit ``config8b``/``config70b``, the
    source of truth, not these).
    """

    DERIVED_KEYS = ("hidden_size", "num_attention_heads", "num_key_value_heads", "max_position_embeddings", "head_dim")

    model_type = "custom_split_llama"

    def __init__(
        self,
        path8b: str | None = None,
        path70b: str | None = None,
        num_layers_8: int = 2,
        num_layers_70: int = 3,
        mlp: bool = False,
        vocab_size: int | None = None,
        rms_norm_eps: float | None = None,
        config8b: dict[str, Any] | None = None,
        config70b: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        tiny_lower, tiny_upper = tiny_llama_configs()
        config8b = self._resolve_sub_config(config8b, path8b, tiny_lower)
        config70b = self._resolve_sub_config(config70b, path70b, tiny_upper)
        # from_dict mutates nested dicts (rope_scaling) in place, hence the deep copies.
        lower = LlamaConfig.from_dict(copy.deepcopy(config8b))
        upper = LlamaConfig.from_dict(copy.deepcopy(config70b))
        if not 0 < num_layers_8 <= lower.num_hidden_layers:
            raise ValueError(f"num_layers_8={num_layers_8} not in [1, {lower.num_hidden_layers}]")
        if not 0 < num_layers_70 <= upper.num_hidden_layers:
            raise ValueError(f"num_layers_70={num_layers_70} not in [1, {upper.num_hidden_layers}]")
        vocab_size = lower.vocab_size if vocab_size is None else int(vocab_size)
        if vocab_size != lower.vocab_size or vocab_size != upper.vocab_size:
            raise ValueError(
                f"vocab_size={vocab_size} but lower has {lower.vocab_size} and upper has {upper.vocab_size}"
            )
        self.path8b = path8b
        self.path70b = path70b
        self.num_layers_8 = int(num_layers_8)
        self.num_layers_70 = int(num_layers_70)
        self.mlp = bool(mlp)
        self.vocab_size = vocab_size
        self.rms_norm_eps = float(upper.rms_norm_eps if rms_norm_eps is None else rms_norm_eps)
        self.config8b = config8b
        self.config70b = config70b
        # Derived; ignore any stored value so N/M edits stay consistent.
        kwargs.pop("num_hidden_layers", None)
        self.num_hidden_layers = self.num_layers_8 + self.num_layers_70
        for key, value in self.derived_attributes(lower, upper).items():
            stored = kwargs.pop(key, None)
            if stored is not None and stored != value:
                raise ValueError(
                    f"{key}={stored!r} but the two blocks give {value!r} (a derived attribute: see "
                    f"CustomSplitLLamaConfig; edit config8b/config70b instead)"
                )
            setattr(self, key, value)
        self.use_cache = kwargs.pop("use_cache", True)
        self.tie_word_embeddings = kwargs.pop("tie_word_embeddings", False)
        self.initializer_range = kwargs.pop("initializer_range", getattr(upper, "initializer_range", 0.02))
        for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
            setattr(self, key, kwargs.pop(key, getattr(lower, key, None)))
        kwargs.setdefault("architectures", ["CustomSplitLLamaForCausalLM"])
        super().__init__(**kwargs)

    @staticmethod
    def derived_attributes(lower: LlamaConfig, upper: LlamaConfig) -> dict[str, int | None]:
        """The top-level LLaMA-like attributes of two blocks (rule in the class docstring)."""
        return {
            "hidden_size": math.gcd(lower.hidden_size, upper.hidden_size),
            "num_attention_heads": math.gcd(lower.num_attention_heads, upper.num_attention_heads),
            "num_key_value_heads": math.gcd(_kv_heads(lower), _kv_heads(upper)),
            "max_position_embeddings": min(lower.max_position_embeddings, upper.max_position_embeddings),
            "head_dim": _head_dim(lower) if _head_dim(lower) == _head_dim(upper) else None,
        }

    @staticmethod
    def _resolve_sub_config(
        given: dict[str, Any] | LlamaConfig | None, path: str | None, default: dict[str, Any]
    ) -> dict[str, Any]:
        """The embedded dict if given, else the config at ``path``, else ``default``."""
        if isinstance(given, LlamaConfig):
            return llama_config_to_dict(given)
        if given is not None:
            return copy.deepcopy(dict(given))
        if path:
            return llama_config_to_dict(LlamaConfig.from_pretrained(path))
        return default

    def _llama_config(self, sub: dict[str, Any]) -> LlamaConfig:
        cfg = LlamaConfig.from_dict(copy.deepcopy(sub))
        cfg._attn_implementation = self._attn_implementation
        return cfg

    def lower_config(self) -> LlamaConfig:
        """A fresh LlamaConfig of the lower ("8b") model, with this config's attention implementation."""
        return self._llama_config(self.config8b)

    def upper_config(self) -> LlamaConfig:
        """A fresh LlamaConfig of the upper ("70b") model, with this config's attention implementation."""
        return self._llama_config(self.config70b)

    @property
    def hidden_size_lower(self) -> int:
        """Hidden size of the lower block (input width of the adapter)."""
        return int(self.config8b["hidden_size"])

    @property
    def hidden_size_upper(self) -> int:
        """Hidden size of the upper block (output width of the adapter, width of norm and lm_head)."""
        return int(self.config70b["hidden_size"])

    @property
    def upper_first_layer(self) -> int:
        """Index, in the upper source model, of the first kept layer (``L70 - M``)."""
        return int(self.config70b["num_hidden_layers"]) - self.num_layers_70


__all__ = ["CustomSplitLLamaConfig", "tiny_llama_configs", "llama_config_to_dict"]
