"""HF <-> Megatron-Core weight mapping for SplitLlama: one table of mapping objects (pure: no
torch.distributed), in the manner of Megatron-Bridge's ``param_mapping.py``.

`mappings(cfg)` lists every Megatron tensor of the full model (TP=1) in model order as one
object owning its names (HF source key(s) -> Megatron key), the expected HF shapes (hence the
global Megatron shape), `merge` (HF -> Megatron layout), `split` (Megatron -> HF) and the TP
slicing (`shard` / `unshard`). The streaming importer (`import_hf.py`), the exporter
(`export_hf.py`), the critic converter (`critic.py`, through `keys.schema`), the live-model
loader (`live.py`) and the tests all use this table; nothing else knows a tensor's layout.

Names on the Megatron side are this project's module names at TP=1 (``SplitLlamaModel``
state-dict names; the TE spec's fused norm names are accepted as aliases). Names on the HF
side are the seed's split layout (``model.layers_first.{i}``, ``model.layers_last.{j}``...);
`source_name()` maps those to the two original LLaMA checkpoints for import.

Layouts (Megatron-Core's, as its own checkpoint converters write them; docs/design.md §3):
- `QKV` (linear_qkv): per KV group, that group's query heads, then its k, then its v. A TP
  rank holds a plain dim-0 chunk, i.e. whole groups (needs groups % tp == 0).
- `GatedFC1` (linear_fc1): cat(gate, up); a TP rank holds cat(gate.chunk(tp)[r], up.chunk(tp)[r]).
- `Copy` with `tp_axis` 1 (row-parallel: o_proj, down_proj, the adapter's row linears) holds
  dim-1 chunks, `tp_axis` 0 (column / vocab parallel: embedding, lm_head, adapter_linear_1)
  dim-0 chunks, `tp_axis` None (norms, the critic's value head ``score``) is replicated.
"""
from __future__ import annotations

import re
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar, Optional, Sequence

import torch

from splitllama.config.model import LlamaBlockConfig, ModelConfig

Shape = tuple[int, ...]
TE_NORM_ALIASES = {
    "self_attention.linear_qkv.layer_norm_weight": "input_layernorm.weight",
    "mlp.linear_fc1.layer_norm_weight": "pre_mlp_layernorm.weight",
}


@dataclass(frozen=True)
class Mapping(ABC):
    """One Megatron tensor (`mcore`) made of the HF tensors `hf` whose shapes are `hf_shapes`."""

    mcore: str
    hf: tuple[str, ...]
    hf_shapes: tuple[Shape, ...]
    tp_axis: ClassVar[Optional[int]] = None  # 0: column / vocab parallel, 1: row parallel, None: replicated
    # Row offset of each HF tensor in the Megatron tensor when `merge` only stacks them along
    # dim 0 (the importer then streams each one in row blocks); None when `merge` interleaves.
    row_offsets: ClassVar[Optional[tuple[int, ...]]] = None

    @property
    def shape(self) -> Shape:
        """Global (TP=1) shape of the Megatron tensor."""
        first = self.hf_shapes[0]
        return first if len(self.hf_shapes) == 1 else (sum(s[0] for s in self.hf_shapes), *first[1:])

    @abstractmethod
    def merge(self, hf: Sequence[torch.Tensor], out: Optional[torch.Tensor] = None) -> torch.Tensor:
        """HF tensors (in `self.hf` order) -> the Megatron tensor (written into `out`, of
        `self.shape`, when given)."""

    @abstractmethod
    def split(self, t: torch.Tensor) -> list[torch.Tensor]:
        """The Megatron tensor -> its HF tensors (in `self.hf` order; may be views of `t`)."""

    def shard(self, full: torch.Tensor, tp: int, rank: int) -> torch.Tensor:
        """The slice of the full Megatron tensor that TP rank `rank` of `tp` holds."""
        if tp == 1 or self.tp_axis is None:
            return full
        return full.chunk(tp, dim=self.tp_axis)[rank].clone()

    def unshard(self, shards: Sequence[torch.Tensor]) -> torch.Tensor:
        """Inverse of `shard`: the full tensor from every rank's slice (in rank order)."""
        if len(shards) == 1 or self.tp_axis is None:
            return shards[0]
        return torch.cat(list(shards), dim=self.tp_axis)

    def shard_views(self, full: torch.Tensor, tp: int, rank: int) -> list[torch.Tensor]:
        """Views of `full` where TP rank `rank`'s slice lives: ``torch.cat(views, tp_axis)``
        equals `shard(full, tp, rank)` (the live-model stream gathers shards in place)."""
        if tp == 1 or self.tp_axis is None:
            return [full]
        return [full.chunk(tp, dim=self.tp_axis)[rank]]


@dataclass(frozen=True)
class Copy(Mapping):
    """One HF tensor copied unchanged; replicated on every TP rank."""

    row_offsets: ClassVar[Optional[tuple[int, ...]]] = (0,)

    def merge(self, hf: Sequence[torch.Tensor], out: Optional[torch.Tensor] = None) -> torch.Tensor:
        (t,) = hf
        return t if out is None else out.copy_(t)

    def split(self, t: torch.Tensor) -> list[torch.Tensor]:
        return [t]


@dataclass(frozen=True)
class ColumnParallel(Copy):
    """One HF tensor copied unchanged; TP ranks hold dim-0 chunks (output features / vocab)."""

    tp_axis: ClassVar[Optional[int]] = 0


@dataclass(frozen=True)
class RowParallel(Copy):
    """One HF tensor copied unchanged; TP ranks hold dim-1 chunks (input features)."""

    tp_axis: ClassVar[Optional[int]] = 1


@dataclass(frozen=True)
class GatedFC1(Mapping):
    """gate_proj, up_proj -> linear_fc1 = cat(gate, up); rank r holds cat(gate_r, up_r)."""

    tp_axis: ClassVar[Optional[int]] = 0

    @property
    def row_offsets(self) -> tuple[int, ...]:  # gate rows [0, F), up rows [F, 2F)
        return (0, self.hf_shapes[0][0])

    def merge(self, hf: Sequence[torch.Tensor], out: Optional[torch.Tensor] = None) -> torch.Tensor:
        return torch.cat(list(hf), dim=0, out=out) if out is not None else torch.cat(list(hf), dim=0)

    def split(self, t: torch.Tensor) -> list[torch.Tensor]:
        return list(t.chunk(2, dim=0))  # row views

    def shard(self, full: torch.Tensor, tp: int, rank: int) -> torch.Tensor:
        if tp == 1:
            return full
        gate, up = full.chunk(2, dim=0)
        return torch.cat([gate.chunk(tp, dim=0)[rank], up.chunk(tp, dim=0)[rank]], dim=0)

    def unshard(self, shards: Sequence[torch.Tensor]) -> torch.Tensor:
        if len(shards) == 1:
            return shards[0]
        halves = [s.chunk(2, dim=0) for s in shards]
        return torch.cat([torch.cat([h[0] for h in halves]), torch.cat([h[1] for h in halves])])

    def shard_views(self, full: torch.Tensor, tp: int, rank: int) -> list[torch.Tensor]:
        if tp == 1:
            return [full]
        gate, up = full.chunk(2, dim=0)
        return [gate.chunk(tp, dim=0)[rank], up.chunk(tp, dim=0)[rank]]


@dataclass(frozen=True)
class QKV(Mapping):
    """q_proj, k_proj, v_proj -> linear_qkv, grouped per KV group: [q heads of group g, k_g, v_g]."""

    groups: int = 1  # number of KV groups (num_key_value_heads)
    tp_axis: ClassVar[Optional[int]] = 0

    def _dims(self) -> tuple[int, int, int]:
        """(query heads per group x head_dim, head_dim, hidden)."""
        (q_rows, h), (kv_rows, _), _ = self.hf_shapes
        return q_rows // self.groups, kv_rows // self.groups, h

    def merge(self, hf: Sequence[torch.Tensor], out: Optional[torch.Tensor] = None) -> torch.Tensor:
        q, k, v = hf
        ng, (qg, hd, h) = self.groups, self._dims()
        parts = [q.reshape(ng, qg, h), k.reshape(ng, hd, h), v.reshape(ng, hd, h)]
        if out is None:
            return torch.cat(parts, dim=1).reshape(-1, h)
        torch.cat(parts, dim=1, out=out.view(ng, qg + 2 * hd, h))
        return out

    def split(self, t: torch.Tensor) -> list[torch.Tensor]:
        ng, (qg, hd, h) = self.groups, self._dims()
        g = t.reshape(ng, qg + 2 * hd, h)
        return [g[:, :qg].reshape(-1, h), g[:, qg:qg + hd].reshape(-1, h), g[:, qg + hd:].reshape(-1, h)]

    def shard(self, full: torch.Tensor, tp: int, rank: int) -> torch.Tensor:
        if tp > 1 and self.groups % tp:
            raise ValueError(f"{self.mcore}: {self.groups} KV groups not divisible by TP {tp}")
        return super().shard(full, tp, rank)

    def shard_views(self, full: torch.Tensor, tp: int, rank: int) -> list[torch.Tensor]:
        if tp > 1 and self.groups % tp:
            raise ValueError(f"{self.mcore}: {self.groups} KV groups not divisible by TP {tp}")
        return super().shard_views(full, tp, rank)


# ---- the table --------------------------------------------------------------------------------
def _layer(b: str, B: str, i: int, blk: LlamaBlockConfig) -> list[Mapping]:
    mc, hf = f"{b}.layers.{i}.", f"model.{B}.{i}."
    h, f, hd = blk.hidden_size, blk.intermediate_size, blk.kv_channels
    q, kv = blk.num_attention_heads * hd, blk.num_key_value_heads * hd
    return [
        QKV(mc + "self_attention.linear_qkv.weight", tuple(f"{hf}self_attn.{p}_proj.weight" for p in "qkv"),
            ((q, h), (kv, h), (kv, h)), groups=blk.num_key_value_heads),
        RowParallel(mc + "self_attention.linear_proj.weight", (hf + "self_attn.o_proj.weight",), ((h, q),)),
        GatedFC1(mc + "mlp.linear_fc1.weight", (hf + "mlp.gate_proj.weight", hf + "mlp.up_proj.weight"),
                 ((f, h), (f, h))),
        RowParallel(mc + "mlp.linear_fc2.weight", (hf + "mlp.down_proj.weight",), ((h, f),)),
        Copy(mc + "input_layernorm.weight", (hf + "input_layernorm.weight",), ((h,),)),
        Copy(mc + "pre_mlp_layernorm.weight", (hf + "post_attention_layernorm.weight",), ((h,),)),
    ]


def _adapter(cfg: ModelConfig) -> list[Mapping]:
    lo, up = cfg.lower.hidden_size, cfg.upper.hidden_size
    if not cfg.mlp:
        return [RowParallel("adapter.linear.weight", ("model.adapter.weight",), ((up, lo),))]
    return [ColumnParallel("adapter.linear_fc1.weight", ("model.adapter_linear_1.weight",), ((up, lo),)),
            RowParallel("adapter.linear_fc2.weight", ("model.adapter_linear_2.weight",), ((up, up),))]


def _head(cfg: ModelConfig) -> list[Mapping]:
    h = cfg.upper.hidden_size
    if cfg.head == "value":  # the critic's value head, replicated on every TP rank; HF names of
        # CustomSplitLLamaForTokenClassification (transformers' *ForTokenClassification ``score``)
        return [Copy("output_layer.weight", ("score.weight",), ((1, h),)),
                Copy("output_layer.bias", ("score.bias",), ((1,),))]
    return [ColumnParallel("output_layer.weight", ("lm_head.weight",), ((cfg.vocab_size, h),))]


def mappings(cfg: ModelConfig) -> list[Mapping]:
    """Every Megatron tensor of the full model (TP=1) with its HF names, in model order."""
    out: list[Mapping] = [ColumnParallel("embedding.word_embeddings.weight", ("model.embed_tokens.weight",),
                                         ((cfg.vocab_size, cfg.lower.hidden_size),))]
    for i in range(cfg.num_layers_lower):
        out += _layer("lower", "layers_first", i, cfg.lower)
    out += _adapter(cfg)
    for i in range(cfg.num_layers_upper):
        out += _layer("upper", "layers_last", i, cfg.upper)
    out.append(Copy("final_layernorm.weight", ("model.norm.weight",), ((cfg.upper.hidden_size,),)))
    return out + _head(cfg)


def canonical_mcore_name(name: str) -> str:
    """Map TE fused-norm names to the local spec's names."""
    for te, local in TE_NORM_ALIASES.items():
        if name.endswith(te):
            return name[: -len(te)] + local
    return name


# ---- whole state dicts in memory (thin loops over the table) ----------------------------------
def hf_to_mcore(hf: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """HF split-model state dict -> full (TP=1) Megatron state dict."""
    out = {}
    for m in mappings(cfg):
        missing = [n for n in m.hf if n not in hf]
        if missing:
            raise KeyError(f"HF state dict lacks {missing} (needed for {m.mcore})")
        out[m.mcore] = m.merge([hf[n] for n in m.hf])
    return out


def mcore_to_hf(mc: dict[str, torch.Tensor], cfg: ModelConfig, partial: bool = False) -> dict[str, torch.Tensor]:
    """Full (TP=1) Megatron state dict (local or TE names) -> HF split-model state dict (a copied
    tensor is `mc`'s own; a split one owns its memory). `partial`: convert the tensors present
    (one pipeline stage's)."""
    mc = {canonical_mcore_name(k): v for k, v in mc.items() if not k.endswith("_extra_state")}
    out = {}
    for m in mappings(cfg):
        if m.mcore not in mc:
            if partial:
                continue
            raise KeyError(f"Megatron state dict lacks {m.mcore}")
        t = mc[m.mcore]
        out.update(zip(m.hf, (p if p is t else p.clone() for p in m.split(t))))
    return out


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
