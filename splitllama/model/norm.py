"""RMSNorm usable under sequence parallelism on the local (non-TE) spec."""
from __future__ import annotations

import torch
from megatron.core.transformer import TransformerConfig


class RMSNorm(torch.nn.Module):
    """y = x / rms(x) * w, computed in float32 like LLaMA.

    Megatron's `WrappedTorchNorm` refuses sequence parallelism; under SP the weight here is
    tagged ``sequence_parallel`` so its gradient (a sum over the local sequence shard) is
    all-reduced across the TP group by Megatron's `finalize_model_grads`.
    """

    def __init__(self, config: TransformerConfig, hidden_size: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = torch.nn.Parameter(torch.ones(hidden_size, dtype=config.params_dtype))
        setattr(self.weight, "sequence_parallel", bool(config.sequence_parallel))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(dtype)
