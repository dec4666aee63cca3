"""The torch_dist checkpoint schema of SplitLlamaModel (pure: no torch.distributed).

`SplitLlamaModel.sharded_state_dict()` stores, at any TP/PP:
- one ShardedTensor per weight under the key of `mapping.entries()` — except the norms, whose
  keys are the Transformer Engine names (``...linear_qkv.layer_norm_weight`` and
  ``...linear_fc1.layer_norm_weight``) so local- and TE-spec checkpoints share keys;
- global (TP=1) shapes; linear_fc1 = cat(gate, up) stored as two chunks, rows [0, F) (gate)
  and [F, 2F) (up) at TP=1 — Megatron's swiglu factory then reshards it to any TP;
- no ``_extra_state`` objects: `splitllama.checkpoint.model_io.model_sharded_state_dict` (what
  training saves and loads) leaves them out — they hold TE FP8 runtime state, not weights.
Checked against a real `dist_checkpointing.save` of the model in tests/distributed.
"""
from __future__ import annotations

from splitllama.config.model import ModelConfig
from splitllama.convert.mapping import FC1, QKV, TE_NORM_ALIASES, Entry, entries

_LOCAL_TO_TE = {local: te for te, local in TE_NORM_ALIASES.items()}


def ckpt_key(mcore_name: str) -> str:
    """Checkpoint key of a Megatron (local-spec) parameter name."""
    for local, te in _LOCAL_TO_TE.items():
        if mcore_name.endswith(local):
            return mcore_name[: -len(local)] + te
    return mcore_name


def hf_shapes(e: Entry, cfg: ModelConfig) -> list[tuple[int, ...]]:
    """Expected shape of each HF tensor of `e` (same order as `e.hf`)."""
    lo, up = cfg.lower, cfg.upper
    name = e.mcore
    if e.block is not None:
        b = e.block
        h, f, hd = b.hidden_size, b.intermediate_size, b.kv_channels
        if e.kind == QKV:
            return [(b.num_attention_heads * hd, h), (b.num_key_value_heads * hd, h),
                    (b.num_key_value_heads * hd, h)]
        if e.kind == FC1:
            return [(f, h), (f, h)]
        if name.endswith("linear_proj.weight"):
            return [(h, b.num_attention_heads * hd)]
        if name.endswith("linear_fc2.weight"):
            return [(h, f)]
        return [(h,)]  # norms
    fixed = {
        "embedding.word_embeddings.weight": (cfg.vocab_size, lo.hidden_size),
        "adapter.linear.weight": (up.hidden_size, lo.hidden_size),
        "adapter.linear_fc1.weight": (up.hidden_size, lo.hidden_size),
        "adapter.linear_fc2.weight": (up.hidden_size, up.hidden_size),
        "final_layernorm.weight": (up.hidden_size,),
        "output_layer.weight": (1 if cfg.head == "value" else cfg.vocab_size, up.hidden_size),
        "output_layer.bias": (1,),  # critic only
    }
    return [fixed[name]]


def ckpt_shape(e: Entry, cfg: ModelConfig) -> tuple[int, ...]:
    """Global (TP=1) shape of the checkpoint tensor of `e`."""
    parts = hf_shapes(e, cfg)
    if e.kind in (QKV, FC1):
        return (sum(p[0] for p in parts), parts[0][1])
    return parts[0]


def schema(cfg: ModelConfig) -> dict[str, tuple[Entry, tuple[int, ...]]]:
    """checkpoint key -> (mapping entry, global shape), in model order."""
    return {ckpt_key(e.mcore): (e, ckpt_shape(e, cfg)) for e in entries(cfg)}
