"""The torch_dist checkpoint schema of SplitLlamaModel (pure: no torch.distributed).

`SplitLlamaModel.sharded_state_dict()` stores, at any TP/PP:
- one ShardedTensor per weight under the key of `mapping.mappings()` — except the norms, whose
  keys are the Transformer Engine names (``...linear_qkv.layer_norm_weight`` and
  ``...linear_fc1.layer_norm_weight``) so local- and TE-spec checkpoints share keys;
- global (TP=1) shapes (`Mapping.shape`); linear_fc1 = cat(gate, up) stored as two chunks, rows
  [0, F) (gate) and [F, 2F) (up) at TP=1 — Megatron's swiglu factory then reshards it to any TP;
- no ``_extra_state`` objects: `splitllama.checkpoint.model_io.model_sharded_state_dict` (what
  training saves and loads) leaves them out — they hold TE FP8 runtime state, not weights.
Checked against a real `dist_checkpointing.save` of the model in tests/distributed.
"""
from __future__ import annotations

from splitllama.config.model import ModelConfig
from splitllama.convert.mapping import TE_NORM_ALIASES, Mapping, mappings

_LOCAL_TO_TE = {local: te for te, local in TE_NORM_ALIASES.items()}


def ckpt_key(mcore_name: str) -> str:
    """Checkpoint key of a Megatron (local-spec) parameter name."""
    for local, te in _LOCAL_TO_TE.items():
        if mcore_name.endswith(local):
            return mcore_name[: -len(local)] + te
    return mcore_name


def schema(cfg: ModelConfig) -> dict[str, Mapping]:
    """checkpoint key -> mapping (its `shape` is the stored global shape), in model order."""
    return {ckpt_key(m.mcore): m for m in mappings(cfg)}
