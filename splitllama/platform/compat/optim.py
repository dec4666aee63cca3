"""Make Megatron-Core 0.16.1's DistributedOptimizer checkpoint with the plain torch Adam
fallback (no Transformer Engine / apex), including on ranks that have no optimizer state
yet (before the first step). Written for megatron-core 0.16.1 (torch 2.13); see
docs/design.md §8 (frozen parameters and the torch Adam fallback):

1. `state_dict()` reads `step` from the torch optimizer's per-parameter state and asserts
   when there is none. `ensure_state` creates it the way torch Adam would on its first step
   (zero moments, step 0), so training is unchanged.
2. Loading a fully reshardable checkpoint copies every per-parameter state tensor from the
   checkpoint but the checkpoint carries `step` per param group, not per tensor, so the
   copy raises KeyError 'step'. `tolerate_step` lets that copy keep the `step` that
   `load_state_dict` has just restored from the param group.
3. That restore puts ONE `step` tensor object into every parameter's state; torch Adam then
   increments it in place once per parameter per step, so from the second step after a
   resume the bias correction is wrong. `unshare_steps` gives each state its own copy.
"""
from __future__ import annotations

import torch
from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

from splitllama.platform import patching
from splitllama.platform.patching import Requirement

REQUIRES = (
    Requirement("megatron.core.optimizer.distrib_optimizer.DistributedOptimizer."
                "_set_main_param_and_optimizer_states", "megatron-core 0.16.1",
                "tolerate_step wraps it per optimizer instance (2. above); it also reads the "
                "instance's model_param_group_index_map"),
)


def _distributed(optimizer) -> list:
    return [o for o in getattr(optimizer, "chained_optimizers", [optimizer])
            if isinstance(o, DistributedOptimizer)]


def ensure_state(optimizer) -> None:
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = getattr(opt, "optimizer", None)
        if not isinstance(inner, torch.optim.Optimizer):
            continue
        for group in inner.param_groups:
            for p in group["params"]:
                st = inner.state[p]
                if "step" not in st:
                    st["step"] = torch.tensor(0.0)
                    st.setdefault("exp_avg", torch.zeros_like(p, memory_format=torch.preserve_format))
                    st.setdefault("exp_avg_sq", torch.zeros_like(p, memory_format=torch.preserve_format))


def tolerate_step(optimizer) -> None:
    patching.check(REQUIRES)
    for opt in _distributed(optimizer):
        original = opt._set_main_param_and_optimizer_states

        def set_states(model_param, tensors, _opt=opt, _orig=original):
            if "step" not in tensors:
                gi, go = _opt.model_param_group_index_map[model_param]
                state = _opt.optimizer.state[_opt.optimizer.param_groups[gi]["params"][go]]
                if "step" in state:
                    tensors = {**tensors, "step": state["step"]}
            return _orig(model_param, tensors)

        opt._set_main_param_and_optimizer_states = set_states


def unshare_steps(optimizer) -> None:
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = getattr(opt, "optimizer", None)
        if isinstance(inner, torch.optim.Optimizer):
            for st in inner.state.values():
                if isinstance(st.get("step"), torch.Tensor):
                    st["step"] = st["step"].clone()
