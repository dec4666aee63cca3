"""Model configuration: two LLaMA configs (lower / upper) and how they are stitched.

`LlamaBlockConfig` mirrors the fields of a HF LLaMA ``config.json`` that matter here.
`ModelConfig` says which layers of each are used (first N of the lower, last M of the
upper) and whether the adapter is one linear or a two-layer MLP. Presets for LLaMA-3 /
3.1 8B and 70B and a tiny CPU pair live here; they are the one source of these numbers.
"""
from __future__ import annotations

import json
import os
from dataclasses import MISSING, asdict, dataclass, field, fields, replace
from typing import Any, Optional

from splitllama.config.validate import check_mapping

SUPPORTED_ROPE_TYPES = ("default", "llama3")
HEADS = ("lm", "value")
ATTENTION_BACKENDS = ("auto", "sdpa", "local", "transformer_engine")  # values of model.attention_backend
# HF architecture of each head in the seed schema (the value model loads with
# AutoModelForTokenClassification, num_labels=1, as veRL's critics do)
SEED_ARCHITECTURES = {"lm": "CustomSplitLLamaForCausalLM", "value": "CustomSplitLLamaForTokenClassification"}


@dataclass(frozen=True)
class LlamaBlockConfig:
    """Shape and numerics of one source LLaMA model (only what SplitLlama uses)."""

    hidden_size: int = field(metadata={"ge": 1})
    """Width of the residual stream."""
    intermediate_size: int = field(metadata={"ge": 1})
    """Width of the SwiGLU MLP."""
    num_attention_heads: int = field(metadata={"ge": 1})
    """Query heads."""
    num_key_value_heads: int = field(metadata={"ge": 1})
    """Key/value heads (grouped-query attention)."""
    num_hidden_layers: int = field(metadata={"ge": 1})
    """Layers of the source model (SplitLlama uses some of them)."""
    vocab_size: int = field(default=128256, metadata={"ge": 2})
    """Token ids 0..vocab_size-1 (both models must agree)."""
    head_dim: Optional[int] = field(default=None, metadata={"ge": 1})
    """Channels per head; null: hidden_size // num_attention_heads."""
    rms_norm_eps: float = field(default=1e-5, metadata={"gt": 0})
    """RMSNorm epsilon."""
    rope_theta: float = field(default=500000.0, metadata={"gt": 0})
    """RoPE base."""
    rope_scaling: Optional[dict] = None
    """HF rope_scaling, e.g. {rope_type: llama3, factor: 8, ...}; null: plain RoPE."""
    max_position_embeddings: int = field(default=8192, metadata={"ge": 1})
    """Longest sequence the model's positions support."""
    tie_word_embeddings: bool = False
    """Share the embedding with the LM head (LLaMA-3: false)."""
    model_type: str = "llama"
    """HF model_type; only llama is supported."""

    def __post_init__(self) -> None:
        if self.head_dim is None:  # normalise so equal shapes compare equal
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_attention_heads)

    @property
    def kv_channels(self) -> int:
        return self.head_dim

    @property
    def rope_type(self) -> str:
        if not self.rope_scaling:
            return "default"
        return str(self.rope_scaling.get("rope_type", self.rope_scaling.get("type", "default")))

    @classmethod
    def from_hf_dict(cls, d: dict, source: str = "<dict>") -> "LlamaBlockConfig":
        """Build from a HF ``config.json`` dict (transformers 4.x or 5.x field names)."""
        missing = [k for k in ("hidden_size", "intermediate_size", "num_attention_heads",
                               "num_hidden_layers", "vocab_size") if k not in d]
        if missing:
            raise ValueError(f"{source}: not a LLaMA-style config, missing fields {missing}")
        rope = d.get("rope_parameters")  # transformers 5 folds theta + scaling into one dict
        rope_theta = d.get("rope_theta", (rope or {}).get("rope_theta", 10000.0))
        scaling = d.get("rope_scaling")
        if scaling is None and rope and rope.get("rope_type", "default") != "default":
            scaling = {k: v for k, v in rope.items() if k != "rope_theta"}
        return cls(
            hidden_size=int(d["hidden_size"]),
            intermediate_size=int(d["intermediate_size"]),
            num_attention_heads=int(d["num_attention_heads"]),
            num_key_value_heads=int(d.get("num_key_value_heads") or d["num_attention_heads"]),
            num_hidden_layers=int(d["num_hidden_layers"]),
            vocab_size=int(d["vocab_size"]),
            head_dim=d.get("head_dim") or None,
            rms_norm_eps=float(d.get("rms_norm_eps", 1e-5)),
            rope_theta=float(rope_theta),
            rope_scaling=dict(scaling) if scaling else None,
            max_position_embeddings=int(d.get("max_position_embeddings", 8192)),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            model_type=str(d.get("model_type", "llama")),
        )

    @classmethod
    def from_hf_dir(cls, path: str) -> "LlamaBlockConfig":
        cfg_file = os.path.join(path, "config.json") if os.path.isdir(path) else path
        if not os.path.exists(cfg_file):
            raise FileNotFoundError(f"no HF config at {cfg_file}")
        with open(cfg_file) as f:
            return cls.from_hf_dict(json.load(f), source=cfg_file)

    def to_hf_dict(self) -> dict:
        """A transformers ``LlamaConfig``-compatible dict."""
        d = {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "num_hidden_layers": self.num_hidden_layers,
            "vocab_size": self.vocab_size,
            "head_dim": self.kv_channels,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": dict(self.rope_scaling) if self.rope_scaling else None,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "hidden_act": "silu",
            "attention_bias": False,
            "mlp_bias": False,
            "bos_token_id": 128000 if self.vocab_size == 128256 else 1,
            "eos_token_id": 128001 if self.vocab_size == 128256 else 2,
        }
        return d


_LLAMA31_SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                    "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}

PRESETS: dict[str, LlamaBlockConfig] = {
    "llama3_8b": LlamaBlockConfig(4096, 14336, 32, 8, 32),
    "llama3_70b": LlamaBlockConfig(8192, 28672, 64, 8, 80),
    "llama31_8b": LlamaBlockConfig(4096, 14336, 32, 8, 32, rope_scaling=_LLAMA31_SCALING,
                                   max_position_embeddings=131072),
    "llama31_70b": LlamaBlockConfig(8192, 28672, 64, 8, 80, rope_scaling=_LLAMA31_SCALING,
                                    max_position_embeddings=131072),
    # Tiny CPU pair: different widths, GQA with >1 group and >1 head per group, llama3 scaling
    # with a short original context so short test sequences exercise every frequency band.
    "tiny_lower": LlamaBlockConfig(64, 160, 4, 2, 4, vocab_size=512, max_position_embeddings=256,
                                   rope_scaling={**_LLAMA31_SCALING, "original_max_position_embeddings": 64}),
    "tiny_upper": LlamaBlockConfig(128, 320, 8, 2, 6, vocab_size=512, max_position_embeddings=256,
                                   rope_scaling={**_LLAMA31_SCALING, "original_max_position_embeddings": 64}),
}


def resolve_block(value: Any, what: str) -> LlamaBlockConfig:
    """A block config from a preset name, a HF config dir/file, a dict, or an instance."""
    if isinstance(value, LlamaBlockConfig):
        return value
    if isinstance(value, dict):
        if "preset" in value:
            rest = {k: v for k, v in value.items() if k != "preset"}
            check_mapping(LlamaBlockConfig, rest, f"model.{what}")
            return replace(resolve_block(value["preset"], what), **rest)
        if "model_type" in value or "architectures" in value:  # a HF config.json's dict
            return LlamaBlockConfig.from_hf_dict(value, source=f"model.{what}")
        check_mapping(LlamaBlockConfig, value, f"model.{what}")
        required = [f.name for f in fields(LlamaBlockConfig)
                    if f.default is MISSING and f.default_factory is MISSING and f.name not in value]
        if required:
            raise ValueError(f"model.{what}: missing key{'s' if len(required) > 1 else ''} {', '.join(required)} "
                             f"(or give a preset: {{preset: NAME, key: value}})")
        return LlamaBlockConfig(**value)
    if isinstance(value, str):
        if value in PRESETS:
            return PRESETS[value]
        if os.path.exists(value):
            return LlamaBlockConfig.from_hf_dir(value)
        raise ValueError(f"model.{what}: '{value}' is neither a preset {sorted(PRESETS)} "
                         f"nor an existing HF config path")
    raise ValueError(f"model.{what}: expected a preset name {sorted(PRESETS)}, a HF config path or a mapping, "
                     f"got {value!r}")


@dataclass
class ModelConfig:
    """The stitched model: first `num_layers_lower` of `lower`, adapter, last `num_layers_upper` of `upper`."""

    lower: Any = "tiny_lower"
    """Lower model (embedding + first layers): a preset (llama3_8b, llama31_8b, tiny_lower, ...), a HF config dir/file, or a mapping (below)."""
    upper: Any = "tiny_upper"
    """Upper model (last layers + final norm + LM head): a preset (llama3_70b, llama31_70b, tiny_upper, ...), a HF config path or a mapping."""
    num_layers_lower: int = field(default=2, metadata={"ge": 1})
    """N: the first N layers of the lower model."""
    num_layers_upper: int = field(default=3, metadata={"ge": 1})
    """M: the last M layers of the upper model."""
    mlp: bool = False
    """Adapter: false = one linear lower->upper width; true = linear, ReLU, linear."""
    path_lower: Optional[str] = None
    """Where the HF lower model lives (the seed's path8b; recorded in exports)."""
    path_upper: Optional[str] = None
    """Where the HF upper model lives (the seed's path70b)."""
    transformer_impl: str = field(default="auto", metadata={"choices": ("auto", "local", "transformer_engine")})
    """Layer implementation: auto (Transformer Engine when installed), local or transformer_engine."""
    attention_backend: str = field(default="auto", metadata={"choices": ATTENTION_BACKENDS})
    """Core attention: ``auto`` (Transformer Engine's with the TE layer spec, else ``sdpa``),
    ``sdpa`` (torch scaled_dot_product_attention: flash-class kernels, no [s, s] scores; causal,
    document masks and variable-length packed sequences), ``local`` (Megatron-Core's
    DotProductAttention: materialises [b, h, s, s] scores; takes document masks, not packed
    sequences) or ``transformer_engine`` (needs ``transformer_impl=transformer_engine``)."""
    init_method_std: float = field(default=0.02, metadata={"gt": 0})
    """Std of the normal initialisation of weights not loaded from a checkpoint."""
    freeze: str = "none"
    """Which parameters train: none (all train), all (none train), all_but_adapter (adapter-only warmup), or all_but:<name substrings> (adapter plus matching parameters)."""
    head: str = field(default="lm", metadata={"choices": HEADS})
    """What follows the final norm. ``lm``: the upper model's LM head (vocab-parallel logits,
    cross-entropy on next tokens). ``value``: a critic — one ``Linear(h_upper -> 1, bias=True)``,
    replicated on every TP rank (veRL's Megatron critic head), trained with a masked per-token
    MSE on value targets from the data (``data.mock=false`` and a corpus preprocessed with
    ``tools/preprocess_data.py --values-key``). Make a critic checkpoint with
    ``tools/convert_checkpoint.py import-hf --head value`` or ``lm-to-critic``."""

    def __post_init__(self) -> None:
        self.lower = resolve_block(self.lower, "lower")
        self.upper = resolve_block(self.upper, "upper")

    @property
    def vocab_size(self) -> int:
        return self.lower.vocab_size

    @property
    def rms_norm_eps(self) -> float:
        return self.upper.rms_norm_eps

    @property
    def upper_first_layer(self) -> int:
        """HF index of the first upper layer used (L70 - M)."""
        return self.upper.num_hidden_layers - self.num_layers_upper

    def check_values(self) -> None:
        """Relations of the fields without a parallel layout (layer ranges, vocabularies, heads)."""
        self.validate(1)

    def validate(self, tensor_model_parallel_size: int = 1) -> None:
        """Raise one ValueError naming the first problem found."""
        if self.head not in HEADS:
            raise ValueError(f"model.head must be {' | '.join(HEADS)}, got '{self.head}'")
        if self.transformer_impl not in ("auto", "local", "transformer_engine"):
            raise ValueError(f"model.transformer_impl must be auto|local|transformer_engine, "
                             f"got '{self.transformer_impl}'")
        if self.attention_backend not in ATTENTION_BACKENDS:
            raise ValueError(f"model.attention_backend must be {'|'.join(ATTENTION_BACKENDS)}, "
                             f"got '{self.attention_backend}'")
        for name, n, blk in (("num_layers_lower", self.num_layers_lower, self.lower),
                             ("num_layers_upper", self.num_layers_upper, self.upper)):
            if not 1 <= n <= blk.num_hidden_layers:
                raise ValueError(f"model.{name}={n} out of range: the source model has "
                                 f"{blk.num_hidden_layers} layers (need 1..{blk.num_hidden_layers})")
        if self.lower.vocab_size != self.upper.vocab_size:
            raise ValueError(f"vocab sizes differ: lower {self.lower.vocab_size} vs upper "
                             f"{self.upper.vocab_size}; the two models must share a tokenizer")
        tp = tensor_model_parallel_size
        for which, blk in (("lower", self.lower), ("upper", self.upper)):
            if blk.model_type not in ("llama",):
                raise ValueError(f"model.{which}: model_type '{blk.model_type}' is not LLaMA")
            if blk.rope_type not in SUPPORTED_ROPE_TYPES:
                raise ValueError(f"model.{which}: unsupported rope type '{blk.rope_type}' "
                                 f"(supported: {', '.join(SUPPORTED_ROPE_TYPES)})")
            if blk.hidden_size % blk.num_attention_heads:
                raise ValueError(f"model.{which}: hidden_size {blk.hidden_size} not divisible by "
                                 f"num_attention_heads {blk.num_attention_heads}")
            if blk.num_attention_heads % blk.num_key_value_heads:
                raise ValueError(f"model.{which}: num_attention_heads {blk.num_attention_heads} not "
                                 f"divisible by num_key_value_heads {blk.num_key_value_heads}")
            for what, val in (("num_attention_heads", blk.num_attention_heads),
                              ("num_key_value_heads", blk.num_key_value_heads),
                              ("intermediate_size", blk.intermediate_size),
                              ("vocab_size", blk.vocab_size)):
                if val % tp:
                    raise ValueError(f"tensor_model_parallel_size {tp} does not divide "
                                     f"model.{which}.{what}={val}")

    @property
    def num_pipeline_units(self) -> int:
        """Lower layers + adapter + upper layers: the most pipeline stages this model can fill."""
        return self.num_layers_lower + 1 + self.num_layers_upper

    def check_pipeline_size(self, pp: int) -> None:
        if pp > self.num_pipeline_units:
            raise ValueError(
                f"parallel.pipeline_model_parallel_size {pp} is more than the {self.num_pipeline_units} "
                f"pipeline units of this model ({self.num_layers_lower} lower layers + adapter + "
                f"{self.num_layers_upper} upper layers; every stage needs one): use 1..{self.num_pipeline_units}")

    def check_seq_length(self, seq_length: int) -> None:
        """Refuse sequences longer than a block's `max_position_embeddings`. With llama3 RoPE
        scaling that number already is the scaled context (131072 for LLaMA-3.1), so no
        position beyond it was ever trained: refused rather than warned about."""
        for which, blk in (("lower", self.lower), ("upper", self.upper)):
            if seq_length > blk.max_position_embeddings:
                raise ValueError(
                    f"data.seq_length {seq_length} is longer than model.{which}.max_position_embeddings "
                    f"{blk.max_position_embeddings} (rope_type {blk.rope_type}); use a shorter "
                    f"data.seq_length or a model with a longer context")

    def differences(self, other: "ModelConfig", keys: tuple[str, ...]) -> list[str]:
        """'model.lower.intermediate_size: config 160, checkpoint 176' for each differing field
        of `keys` (block configs field by field); `self` is the config, `other` the checkpoint."""
        out = []
        for key in keys:
            mine, theirs = getattr(self, key), getattr(other, key)
            if isinstance(mine, LlamaBlockConfig) and isinstance(theirs, LlamaBlockConfig):
                for f in fields(LlamaBlockConfig):
                    a, b = getattr(mine, f.name), getattr(theirs, f.name)
                    if a != b:
                        out.append(f"model.{key}.{f.name}: config {a!r}, checkpoint {b!r}")
            elif mine != theirs:
                out.append(f"model.{key}: config {mine!r}, checkpoint {theirs!r}")
        return out

    # ---- seed (CustomSplitLLamaForCausalLM) JSON schema -------------------------------------
    def to_seed_dict(self) -> dict:
        d = {
            "architectures": [SEED_ARCHITECTURES[self.head]],
            "model_type": "custom_split_llama",
            "path8b": self.path_lower,
            "path70b": self.path_upper,
            "num_layers_8": self.num_layers_lower,
            "num_layers_70": self.num_layers_upper,
            "mlp": self.mlp,
            "vocab_size": self.vocab_size,
            "rms_norm_eps": self.rms_norm_eps,
            "config8b": self.lower.to_hf_dict(),
            "config70b": self.upper.to_hf_dict(),
        }
        if self.head == "value":
            d["num_labels"] = 1
        return d

    @classmethod
    def from_seed_dict(cls, d: dict, source: str = "<dict>") -> "ModelConfig":
        archs = d.get("architectures") or []
        heads = [h for h, a in SEED_ARCHITECTURES.items() if a in archs]
        if len(heads) != 1:
            raise ValueError(f"{source}: architectures {archs} is not "
                             + " or ".join(str([a]) for a in SEED_ARCHITECTURES.values()))
        if heads[0] == "value" and int(d.get("num_labels", 1)) != 1:
            raise ValueError(f"{source}: a SplitLlama critic has num_labels 1, found {d.get('num_labels')}")
        lower = d.get("config8b") or d.get("path8b")
        upper = d.get("config70b") or d.get("path70b")
        if lower is None or upper is None:
            raise ValueError(f"{source}: needs config8b/config70b or path8b/path70b")
        missing = [k for k in ("num_layers_8", "num_layers_70") if k not in d]
        if missing:
            raise ValueError(f"{source}: missing field{'s' if len(missing) > 1 else ''} "
                             f"{', '.join(missing)} (layers taken from the 8B / 70B model)")
        return cls(lower=lower, upper=upper, num_layers_lower=int(d["num_layers_8"]),
                   num_layers_upper=int(d["num_layers_70"]), mlp=bool(d.get("mlp", False)),
                   path_lower=d.get("path8b"), path_upper=d.get("path70b"), head=heads[0])

    def to_dict(self) -> dict:
        d = asdict(self)
        d["lower"], d["upper"] = asdict(self.lower), asdict(self.upper)
        return d
