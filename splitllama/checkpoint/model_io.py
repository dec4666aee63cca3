"""The model part of a torch_dist checkpoint: the one definition of which keys it holds,
used by training saves/loads and by the HF converter alike."""
from __future__ import annotations

from typing import Union

import torch
from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing.validation import StrictHandling

from splitllama.checkpoint import dirs

# Per-layer keys (hetereogenous_dist_checkpoint) so checkpoints move between N/M/PP plans.
SHARDED_METADATA = {"non_homogeneous_layers": True,
                    "distrib_optim_sharding_type": "fully_reshardable"}


def model_sharded_state_dict(model: torch.nn.Module) -> dict:
    """`model.sharded_state_dict()` without the ``_extra_state`` entries (empty for the local
    spec; TE's fp8 scaling metadata, which is runtime state, not weights)."""
    sd = model.sharded_state_dict(metadata=dict(SHARDED_METADATA))
    return {k: v for k, v in sd.items() if not k.endswith("_extra_state")}


def load_model_weights(model: torch.nn.Module, ckpt_dir: str,
                       strict: Union[StrictHandling, str] = StrictHandling.RAISE_UNEXPECTED) -> str:
    """Fill one live model stage's parameters from a torch_dist checkpoint (a root or an iter_
    directory; converted by `import-hf` or saved by training — optimizer keys are simply not
    requested). Collective: every rank calls it; data is resharded to this rank's TP/PP slice.

    Every tensor the model requests must be in the checkpoint with the same global shape
    (Megatron raises naming the key otherwise). `strict=RAISE_ALL` also fails when the
    checkpoint holds keys no rank requested (exactness check for converted checkpoints).
    Returns the resolved checkpoint directory.
    """
    path = dirs.resolve(ckpt_dir)
    strict = StrictHandling(strict) if isinstance(strict, str) else strict
    request = model_sharded_state_dict(model)
    loaded = dist_checkpointing.load({"model": request}, path, strict=strict)
    state = loaded[0] if isinstance(loaded, tuple) else loaded
    result = model.load_state_dict({k: v for k, v in state["model"].items() if k in request}, strict=False)
    missing = [k for k in result.missing_keys if not k.endswith("_extra_state")]
    if missing or result.unexpected_keys:
        raise RuntimeError(f"{path}: weights did not cover the model: missing {missing}, "
                           f"unexpected {list(result.unexpected_keys)}")
    return path
