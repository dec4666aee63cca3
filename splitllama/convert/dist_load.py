"""Load model weights (only) from a torch_dist checkpoint into this rank's live model stage.

The request is `splitllama.checkpoint.model_io.model_sharded_state_dict` — the one definition
of a checkpoint's model keys, shared with training saves — so a converted checkpoint and a
trained one load the same way. Works for checkpoints written by `import-hf` and by training
(which add optimizer keys: those are simply not requested). Collective: every rank calls it.
"""
from __future__ import annotations

from typing import Union

import torch
from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing.validation import StrictHandling

from splitllama.checkpoint import layout
from splitllama.checkpoint.model_io import model_sharded_state_dict


def load_model_weights(model: torch.nn.Module, ckpt_dir: str,
                       strict: Union[StrictHandling, str] = StrictHandling.RAISE_UNEXPECTED) -> str:
    """Fill `model`'s parameters from `ckpt_dir` (a checkpoint root or an iter_ directory).

    Every tensor the model requests must be in the checkpoint with the same global shape
    (Megatron raises naming the key otherwise); the data is resharded to this rank's TP/PP
    slice. `strict=RAISE_ALL` also fails when the checkpoint holds keys no rank requested
    (exactness check for converted checkpoints; not for trained ones, which hold optimizer
    state). Returns the resolved checkpoint directory.
    """
    path = layout.resolve(ckpt_dir)
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
