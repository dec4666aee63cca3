"""Per-block rotary embeddings (LLaMA-3 plain, and LLaMA-3.1 `llama3` frequency scaling)."""
from __future__ import annotations

from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding

from splitllama.config.model import LlamaBlockConfig
from splitllama.platform.compat.model import llama3_scaled_inv_freq


def build_rotary(blk: LlamaBlockConfig, use_cpu_initialization: bool) -> RotaryEmbedding:
    """Megatron's RotaryEmbedding with this block's theta and (all of) its llama3 scaling
    parameters — Megatron's own flag fixes low/high factors and the original length at the
    LLaMA-3.1 values, so the scaling is applied here with the block's own numbers."""
    rope = RotaryEmbedding(kv_channels=blk.kv_channels, rotary_percent=1.0,
                           rotary_base=blk.rope_theta, rope_scaling=False,
                           use_cpu_initialization=use_cpu_initialization)
    if blk.rope_type == "llama3":
        s = blk.rope_scaling
        rope.inv_freq = llama3_scaled_inv_freq(
            rope, rope.inv_freq, factor=float(s["factor"]),
            low_freq_factor=float(s.get("low_freq_factor", 1.0)),
            high_freq_factor=float(s.get("high_freq_factor", 4.0)),
            original_max_position_embeddings=int(s.get("original_max_position_embeddings", 8192)))
    return rope
