"""Private torch / Megatron-Core APIs the model stage calls (checked before use):

- ``RotaryEmbedding._apply_scaling`` (megatron-core 0.16.1): the LLaMA-3.1 ``llama3`` frequency
  scaling with the block's own factors (Megatron's public ``rope_scaling`` flag fixes them at
  the LLaMA-3.1 values); `llama3_scaled_inv_freq` calls it.
- ``torch._fused_sdp_choice`` (torch 2.13.0; present since 2.5): the kernel SDPA's dispatcher
  picks for given inputs, for the start-up line and the attention tests; `sdp_kernel_choice`.
"""
from __future__ import annotations

import torch
from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding

from splitllama.platform import patching
from splitllama.platform.patching import Requirement

REQUIRES = (
    Requirement("megatron.core.models.common.embeddings.rotary_pos_embedding.RotaryEmbedding._apply_scaling",
                "megatron-core 0.16.1", "llama3 rope scaling with the block's own factors (model/rope.py)"),
    Requirement("torch._fused_sdp_choice", "torch 2.13.0",
                "the SDPA kernel the dispatcher picks, named at start-up (model/attention.py)"),
)

patching.check(REQUIRES)


def llama3_scaled_inv_freq(rope: RotaryEmbedding, inv_freq: torch.Tensor, *, factor: float,
                           low_freq_factor: float, high_freq_factor: float,
                           original_max_position_embeddings: int) -> torch.Tensor:
    """`inv_freq` with the llama3 scaling of these factors (Megatron's implementation)."""
    return rope._apply_scaling(inv_freq, factor=factor, low_freq_factor=low_freq_factor,
                               high_freq_factor=high_freq_factor,
                               original_max_position_embeddings=original_max_position_embeddings)


def sdp_kernel_choice(q, k, v, mask, causal: bool, gqa: bool) -> int:
    """The `SDPBackend` value SDPA's dispatcher picks for these inputs (dropout 0)."""
    return int(torch._fused_sdp_choice(q, k, v, mask, 0.0, causal, scale=None, enable_gqa=gqa))
