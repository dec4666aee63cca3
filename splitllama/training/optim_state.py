"""Optimizer state in torch_dist checkpoints when some ranks own no trainable parameter.

Megatron-Core's fully reshardable DistributedOptimizer state has two parts: sharded tensors
(per-parameter fp32 params and Adam moments) and a "common" part (param-group
hyperparameters and the step). dist_checkpointing writes common parts from global rank 0
only — so when rank 0 is a fully frozen pipeline stage (adapter-only warmup), the common
part that the training stages need is lost, and a frozen rank cannot even produce one with
the torch Adam fallback. Here only the sharded part goes through dist_checkpointing; the
common parts of all ranks are merged (param groups keyed by Megatron's group identity) and
stored as JSON next to the checkpoint, from which every rank with parameters restores.
"""
from __future__ import annotations

import copy

import torch
import torch.distributed as dist
from megatron.core.dist_checkpointing.dict_utils import extract_matching_values, merge
from megatron.core.dist_checkpointing.mapping import ShardedBase

GROUP_KEYS = ("wd_mult", "lr_mult", "is_expert_parallel", "is_decoupled_lr")


def has_params(optimizer) -> bool:
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = getattr(opt, "optimizer", None)
        if inner is not None and any(len(g["params"]) for g in inner.param_groups):
            return True
    return False


def split(opt_sd: dict) -> tuple[dict, dict]:
    """(sharded part, common part) of an optimizer sharded state dict."""
    return extract_matching_values(opt_sd, lambda x: isinstance(x, ShardedBase))


def _group_key(group: dict) -> tuple:
    return tuple(group.get(k, group.get(f"pre_{k}")) for k in GROUP_KEYS)


def _jsonable(x):
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, torch.Tensor):
        return x.item()
    return x


def gather_common(common: dict | None) -> dict | None:
    """Collective: merge every rank's common part (None on ranks without parameters)."""
    parts = [None] * dist.get_world_size()
    dist.all_gather_object(parts, None if common is None else _jsonable(common))
    parts = [p for p in parts if p is not None]
    if not parts:
        return None
    merged = copy.deepcopy(parts[0])
    groups, seen = [], set()
    for p in parts:
        for g in p.get("optimizer", {}).get("param_groups", []):
            if _group_key(g) not in seen:
                seen.add(_group_key(g))
                groups.append(g)
    merged.setdefault("optimizer", {})["param_groups"] = groups
    return merged


def restore(loaded_sharded: dict, common: dict) -> dict:
    """The full optimizer state dict for `load_state_dict` from its two parts."""
    return merge(loaded_sharded, copy.deepcopy(common))
