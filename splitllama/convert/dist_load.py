"""Load model weights (only) from a torch_dist checkpoint into this rank's live model stage.

Works for checkpoints written by `import-hf` and by training (which add optimizer / RNG /
... keys: those are simply not requested). Collective: every rank of the job calls it.
"""
from __future__ import annotations

import os
import pickle
from typing import Union

import torch
from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing.mapping import ShardedObject
from megatron.core.dist_checkpointing.validation import StrictHandling

from splitllama.checkpoint import layout


def checkpoint_keys(ckpt_dir: str) -> set[str]:
    """Every DCP key (ShardedTensor keys, ShardedObject unique keys) the checkpoint holds."""
    with open(os.path.join(ckpt_dir, ".metadata"), "rb") as f:
        return set(pickle.load(f).state_dict_metadata)


def load_model_weights(model: torch.nn.Module, ckpt_dir: str,
                       strict: Union[StrictHandling, str] = StrictHandling.RAISE_UNEXPECTED) -> str:
    """Fill `model`'s parameters from `ckpt_dir` (a checkpoint root or an iter_ directory).

    Every tensor the model requests must be in the checkpoint with the same global shape
    (Megatron raises naming the key otherwise); the data is resharded to this rank's TP/PP
    slice. `_extra_state` objects the checkpoint does not hold (converted checkpoints carry no
    FP8 / TE metadata, e.g. TE's core_attention extra state) keep the model's current value.
    `strict=RAISE_ALL` additionally fails when the checkpoint holds keys no rank requested.
    Returns the resolved checkpoint directory.
    """
    path = layout.resolve(ckpt_dir)
    strict = StrictHandling(strict) if isinstance(strict, str) else strict
    have = checkpoint_keys(path)
    request = {k: v for k, v in model.sharded_state_dict().items()
               if not (isinstance(v, ShardedObject) and v.unique_key not in have)}
    skipped = set(model.state_dict()) - set(request)
    loaded = dist_checkpointing.load({"model": request}, path, strict=strict)
    state = loaded[0] if isinstance(loaded, tuple) else loaded
    weights = {k: v for k, v in state["model"].items() if k in request}
    result = model.load_state_dict(weights, strict=False)
    missing = [k for k in result.missing_keys if k not in skipped or not k.endswith("_extra_state")]
    if missing or result.unexpected_keys:
        raise RuntimeError(f"{path}: weights did not cover the model: missing {missing}, "
                           f"unexpected {list(result.unexpected_keys)}")
    return path
