"""Move full (TP=1, global-numbered) Megatron weights into / out of one live model stage.

Stage-local module names number layers from 0 on every stage; `global_name` adds the
stage's offset per block from the pipeline layout so names match the mapping table.
"""
from __future__ import annotations

import re
from typing import Callable, Optional

import torch

from splitllama.config.model import ModelConfig
from splitllama.convert.mapping import Mapping, mappings
from splitllama.pipeline.layout import PipelineLayout

_LOCAL = re.compile(r"^(lower|upper)\.layers\.(\d+)\.(.*)$")
Shard = Callable[[Mapping, torch.Tensor, int, int], torch.Tensor]


def global_name(local: str, layout: PipelineLayout, stage: int) -> str:
    m = _LOCAL.match(local)
    if not m:
        return local
    block, idx, rest = m.groups()
    off = layout.lower_offset(stage) if block == "lower" else layout.upper_offset(stage)
    return f"{block}.layers.{int(idx) + off}.{rest}"


def load_full_weights(model: torch.nn.Module, full: dict[str, torch.Tensor], cfg: ModelConfig,
                      layout: PipelineLayout, stage: int, tp: int, tp_rank: int,
                      shard: Optional[Shard] = None) -> None:
    """Copy this stage's TP slice of every tensor in `full` into `model` (strict: every
    parameter must be covered and every shape must match). `shard` replaces `Mapping.shard`
    (the parity tests' deliberately wrong prototype slicing)."""
    by_name = {m.mcore: m for m in mappings(cfg)}
    params = dict(model.named_parameters())
    with torch.no_grad():
        for local, p in params.items():
            name = global_name(local, layout, stage)
            if name not in by_name or name not in full:
                raise KeyError(f"no weight for parameter {local} (global name {name})")
            m = by_name[name]
            t = shard(m, full[name], tp, tp_rank) if shard else m.shard(full[name], tp, tp_rank)
            if t.shape != p.shape:
                raise ValueError(f"{name}: TP slice has shape {tuple(t.shape)}, parameter has "
                                 f"{tuple(p.shape)}")
            p.copy_(t.to(p.dtype))
