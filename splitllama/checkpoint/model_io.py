"""The model part of a torch_dist checkpoint: the one definition of which keys it holds,
used by training saves/loads and by the HF converter alike."""
from __future__ import annotations

import torch
from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing.validation import StrictHandling

# Per-layer keys (hetereogenous_dist_checkpoint) so checkpoints move between N/M/PP plans.
SHARDED_METADATA = {"non_homogeneous_layers": True,
                    "distrib_optim_sharding_type": "fully_reshardable"}


def model_sharded_state_dict(model: torch.nn.Module) -> dict:
    """`model.sharded_state_dict()` without the ``_extra_state`` entries (empty for the local
    spec; TE's fp8 scaling metadata, which is runtime state, not weights)."""
    sd = model.sharded_state_dict(metadata=dict(SHARDED_METADATA))
    return {k: v for k, v in sd.items() if not k.endswith("_extra_state")}


def load_model_weights(model: torch.nn.Module, ckpt_dir: str) -> None:
    """Load the weights of one live model stage from a torch_dist checkpoint directory
    (any TP/PP it was saved with). Every parameter must be found."""
    sharded = model_sharded_state_dict(model)
    loaded = dist_checkpointing.load({"model": sharded}, ckpt_dir,
                                     strict=StrictHandling.ASSUME_OK_UNEXPECTED)
    missing, unexpected = model.load_state_dict(loaded["model"], strict=False)
    missing = [k for k in missing if not k.endswith("_extra_state")]
    if missing or unexpected:
        raise KeyError(f"{ckpt_dir}: checkpoint does not match the model: missing {missing[:5]}, "
                       f"unexpected {unexpected[:5]}")
