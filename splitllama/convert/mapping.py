"""HF <-> Megatron-Core weight mapping for SplitLlama, as one table (pure: no torch.distributed).

Names on the Megatron side are this project's module names at TP=1 (``SplitLlamaModel``
state-dict names; the TE spec's fused norm names are accepted as aliases). Names on the HF
side are the seed's split layout (``model.layers_first.{i}``, ``model.layers_last.{j}``...);
`source_name()` maps those to the two original LLaMA checkpoints for import.

Layouts (docs/design.md §3):
- linear_qkv: per KV group, that group's query heads, then its k, then its v. A TP rank
  holds a plain dim-0 chunk (needs groups % tp == 0).
- linear_fc1: cat(gate, up); a TP rank holds cat(gate.chunk(tp)[r], up.chunk(tp)[r]).
- row-parallel (o_proj, down_proj, adapter row linears): dim-1 chunks; column-parallel
  (embedding, lm_head, adapter_linear_1): dim-0 chunks; norms and the critic's value head
  (``score``) replicated.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Iterator, Optional

import torch

from splitllama.config.model import LlamaBlockConfig, ModelConfig

COPY, QKV, FC1 = "copy", "qkv", "fc1"
TE_NORM_ALIASES = {
    "self_attention.linear_qkv.layer_norm_weight": "input_layernorm.weight",
    "mlp.linear_fc1.layer_norm_weight": "pre_mlp_layernorm.weight",
}


@dataclass(frozen=True)
class Rule:
    mcore: str  # "{b}" = block attr (lower|upper), "{i}" = layer index within the block
    hf: tuple[str, ...]  # "{B}" = HF block list (layers_first|layers_last)
    kind: str = COPY
    tp_axis: Optional[int] = None  # 0: column / vocab parallel, 1: row parallel, None: replicated


LAYER_RULES = (
    Rule("{b}.layers.{i}.self_attention.linear_qkv.weight",
         tuple(f"model.{{B}}.{{i}}.self_attn.{p}_proj.weight" for p in "qkv"), QKV, 0),
    Rule("{b}.layers.{i}.self_attention.linear_proj.weight", ("model.{B}.{i}.self_attn.o_proj.weight",), COPY, 1),
    Rule("{b}.layers.{i}.mlp.linear_fc1.weight",
         ("model.{B}.{i}.mlp.gate_proj.weight", "model.{B}.{i}.mlp.up_proj.weight"), FC1, 0),
    Rule("{b}.layers.{i}.mlp.linear_fc2.weight", ("model.{B}.{i}.mlp.down_proj.weight",), COPY, 1),
    Rule("{b}.layers.{i}.input_layernorm.weight", ("model.{B}.{i}.input_layernorm.weight",)),
    Rule("{b}.layers.{i}.pre_mlp_layernorm.weight", ("model.{B}.{i}.post_attention_layernorm.weight",)),
)
GLOBAL_RULES = (
    Rule("embedding.word_embeddings.weight", ("model.embed_tokens.weight",), COPY, 0),
    Rule("final_layernorm.weight", ("model.norm.weight",)),
    Rule("output_layer.weight", ("lm_head.weight",), COPY, 0),
)
# The critic's value head (model.head=value): replicated on every TP rank; HF names of
# CustomSplitLLamaForTokenClassification (transformers' *ForTokenClassification ``score``).
VALUE_HEAD_RULES = (
    Rule("output_layer.weight", ("score.weight",)),
    Rule("output_layer.bias", ("score.bias",)),
)
ADAPTER_RULES = {
    False: (Rule("adapter.linear.weight", ("model.adapter.weight",), COPY, 1),),
    True: (Rule("adapter.linear_fc1.weight", ("model.adapter_linear_1.weight",), COPY, 0),
           Rule("adapter.linear_fc2.weight", ("model.adapter_linear_2.weight",), COPY, 1)),
}
_BLOCKS = {"lower": "layers_first", "upper": "layers_last"}


@dataclass(frozen=True)
class Entry:
    """One concrete Megatron tensor and the HF tensors it is made of."""

    mcore: str
    hf: tuple[str, ...]
    kind: str
    tp_axis: Optional[int]
    block: Optional[LlamaBlockConfig]  # source model shape (for qkv); None outside the blocks


def entries(cfg: ModelConfig) -> Iterator[Entry]:
    """Every Megatron tensor of the full model (TP=1) with its HF names, in model order."""
    yield Entry(**_fill(GLOBAL_RULES[0], {}), block=None)
    for b, n, blk in (("lower", cfg.num_layers_lower, cfg.lower), ("upper", cfg.num_layers_upper, cfg.upper)):
        if b == "upper":
            for rule in ADAPTER_RULES[cfg.mlp]:
                yield Entry(**_fill(rule, {}), block=None)
        for i in range(n):
            for rule in LAYER_RULES:
                yield Entry(**_fill(rule, {"b": b, "B": _BLOCKS[b], "i": i}), block=blk)
    head = VALUE_HEAD_RULES if cfg.head == "value" else GLOBAL_RULES[2:]
    for rule in (GLOBAL_RULES[1], *head):
        yield Entry(**_fill(rule, {}), block=None)


def _fill(rule: Rule, subs: dict) -> dict:
    return dict(mcore=rule.mcore.format(**subs), hf=tuple(h.format(**subs) for h in rule.hf),
                kind=rule.kind, tp_axis=rule.tp_axis)


def canonical_mcore_name(name: str) -> str:
    """Map TE fused-norm names to the local spec's names."""
    for te, local in TE_NORM_ALIASES.items():
        if name.endswith(te):
            return name[: -len(te)] + local
    return name


# ---- layout transforms --------------------------------------------------------------------
def merge_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, blk: LlamaBlockConfig) -> torch.Tensor:
    ng, hd, h = blk.num_key_value_heads, blk.kv_channels, q.shape[1]
    hpg = blk.num_attention_heads // ng
    return torch.cat([q.reshape(ng, hpg * hd, h), k.reshape(ng, hd, h), v.reshape(ng, hd, h)],
                     dim=1).reshape(-1, h)


def split_qkv(qkv: torch.Tensor, blk: LlamaBlockConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    ng, hd, h = blk.num_key_value_heads, blk.kv_channels, qkv.shape[1]
    hpg = blk.num_attention_heads // ng
    g = qkv.reshape(ng, hpg + 2, hd, h)
    return (g[:, :hpg].reshape(-1, h).clone(), g[:, hpg].reshape(-1, h).clone(),
            g[:, hpg + 1].reshape(-1, h).clone())


def to_mcore_tensor(e: Entry, hf_tensors: list[torch.Tensor]) -> torch.Tensor:
    if e.kind == QKV:
        return merge_qkv(*hf_tensors, e.block)
    if e.kind == FC1:
        return torch.cat(hf_tensors, dim=0)
    return hf_tensors[0]


def to_hf_tensors(e: Entry, t: torch.Tensor) -> list[torch.Tensor]:
    if e.kind == QKV:
        return list(split_qkv(t, e.block))
    if e.kind == FC1:
        return [c.clone() for c in t.chunk(2, dim=0)]
    return [t]


def hf_to_mcore(hf: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """HF split-model state dict -> full (TP=1) Megatron state dict."""
    out = {}
    for e in entries(cfg):
        missing = [n for n in e.hf if n not in hf]
        if missing:
            raise KeyError(f"HF state dict lacks {missing} (needed for {e.mcore})")
        out[e.mcore] = to_mcore_tensor(e, [hf[n] for n in e.hf])
    return out


def mcore_to_hf(mc: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Full (TP=1) Megatron state dict (local or TE names) -> HF split-model state dict."""
    mc = {canonical_mcore_name(k): v for k, v in mc.items() if not k.endswith("_extra_state")}
    out = {}
    for e in entries(cfg):
        if e.mcore not in mc:
            raise KeyError(f"Megatron state dict lacks {e.mcore}")
        out.update(zip(e.hf, to_hf_tensors(e, mc[e.mcore])))
    return out


# ---- tensor parallel slicing ----------------------------------------------------------------
def tp_shard(e: Entry, full: torch.Tensor, tp: int, rank: int) -> torch.Tensor:
    """The slice of a full Megatron tensor that TP rank `rank` of `tp` holds."""
    if tp == 1 or e.tp_axis is None:
        return full
    if e.kind == FC1:
        gate, up = full.chunk(2, dim=0)
        return torch.cat([gate.chunk(tp, dim=0)[rank], up.chunk(tp, dim=0)[rank]], dim=0)
    if e.kind == QKV and e.block.num_key_value_heads % tp:
        raise ValueError(f"{e.mcore}: {e.block.num_key_value_heads} KV groups not divisible by TP {tp}")
    return full.chunk(tp, dim=e.tp_axis)[rank].clone()


def tp_unshard(e: Entry, shards: list[torch.Tensor]) -> torch.Tensor:
    """Inverse of `tp_shard`: the full tensor from every rank's slice (in rank order)."""
    if len(shards) == 1 or e.tp_axis is None:
        return shards[0]
    if e.kind == FC1:
        halves = [s.chunk(2, dim=0) for s in shards]
        return torch.cat([torch.cat([h[0] for h in halves]), torch.cat([h[1] for h in halves])])
    return torch.cat(shards, dim=e.tp_axis)


def shard_state_dict(full: dict[str, torch.Tensor], cfg: ModelConfig, tp: int, rank: int,
                     shard: Callable[[Entry, torch.Tensor, int, int], torch.Tensor] = tp_shard
                     ) -> dict[str, torch.Tensor]:
    """Full Megatron state dict -> TP rank `rank`'s local state dict."""
    return {e.mcore: shard(e, full[e.mcore], tp, rank) for e in entries(cfg) if e.mcore in full}


# ---- source checkpoints (the two original LLaMA models) -----------------------------------
_LAYER_RE = re.compile(r"^model\.(layers_first|layers_last)\.(\d+)\.(.*)$")


def source_name(hf_split_name: str, cfg: ModelConfig) -> tuple[str, str]:
    """('lower'|'upper', name in that source LLaMA checkpoint) for a split-model HF name."""
    m = _LAYER_RE.match(hf_split_name)
    if m:
        which, idx, rest = m.groups()
        if which == "layers_first":
            return "lower", f"model.layers.{idx}.{rest}"
        return "upper", f"model.layers.{cfg.upper_first_layer + int(idx)}.{rest}"
    if hf_split_name == "model.embed_tokens.weight":
        return "lower", hf_split_name
    if hf_split_name in ("model.norm.weight", "lm_head.weight"):
        return "upper", hf_split_name
    raise KeyError(f"{hf_split_name} does not come from a source LLaMA model")
