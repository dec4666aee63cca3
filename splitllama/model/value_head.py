"""The critic's value head: ``Linear(h_upper -> 1, bias=True)`` in place of the LM head.

As in veRL's Megatron critic (``LinearForLastLayer``) the head is a plain linear, NOT
tensor-parallel: a one-column output cannot be split over TP ranks, so every rank holds the
whole weight [1, h] and bias [1] and computes the values of the tokens it holds.

- Without sequence parallelism every TP rank sees the full sequence (the final norm's output
  is replicated), computes the same values and the same weight/bias gradients.
- Under sequence parallelism a rank holds s/tp tokens: the values are gathered along the
  sequence (``gather_from_sequence_parallel_region``; its backward hands each rank the
  gradient of its own tokens), and the weight/bias gradients are partial sums over the local
  tokens. Both parameters are tagged ``sequence_parallel`` so Megatron's
  ``finalize_model_grads`` all-reduces them across TP, like the RMSNorm weights. (veRL tags
  the weight only; an untagged bias gets a per-rank, wrong gradient — the parity test shows
  it.) Values are computed in float32, like the LM loss.
"""
from __future__ import annotations

import torch
from megatron.core import tensor_parallel
from megatron.core.transformer import TransformerConfig


class ValueHead(torch.nn.Linear):
    def __init__(self, config: TransformerConfig, hidden_size: int) -> None:
        super().__init__(hidden_size, 1, bias=True, dtype=config.params_dtype)
        self.sequence_parallel = bool(config.sequence_parallel)
        with torch.no_grad():  # from-scratch init: normal(0, init_method_std), bias 0
            config.init_method(self.weight)
            self.bias.zero_()
        for p in (self.weight, self.bias):
            setattr(p, "sequence_parallel", self.sequence_parallel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[s(/tp under SP), b, h] -> values [b, s] (float32)."""
        v = torch.nn.functional.linear(x, self.weight, self.bias).float()
        if self.sequence_parallel:
            v = tensor_parallel.gather_from_sequence_parallel_region(v, tensor_parallel_output_grad=False)
        return v.squeeze(-1).transpose(0, 1).contiguous()

