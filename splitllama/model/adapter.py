"""The adapter between the lower (narrow) and upper (wide) block, tensor-parallel.

mlp=true : ColumnParallel(h_lo -> h_up) -> ReLU -> RowParallel(h_up -> h_up), the usual
           Megatron MLP pattern (SP: all-gather sequence in, reduce-scatter sequence out).
mlp=false: ONE RowParallel(h_lo -> h_up). Chosen deliberately over ColumnParallel because a
           row-parallel linear *ends* in exactly the layout the upper block's residual stream
           needs — all-reduce (no SP) or reduce-scatter along the sequence (SP) — through
           Megatron's own reduction, so no extra re-layout is needed. Each rank holds the
           [h_up, h_lo/tp] slice of the weight. Its input (replicated, or sequence-sharded
           under SP) is first made hidden-sharded: under SP an all-gather along the sequence
           (whose backward is a plain split, since the following hidden-scatter's backward
           already hands every rank the full gradient) and then a local hidden split.
           Communication per step: non-SP one all-reduce of s*b*h_up; SP an all-gather of
           s*b*h_lo plus a reduce-scatter of s*b*h_up — the same as a Megatron MLP exit.
"""
from __future__ import annotations

import torch
from megatron.core import tensor_parallel
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.module import MegatronModule


class Adapter(MegatronModule):
    def __init__(self, config: TransformerConfig, in_features: int, out_features: int, mlp: bool) -> None:
        super().__init__(config=config)
        self.mlp = mlp
        self.sequence_parallel = config.sequence_parallel
        if mlp:
            self.linear_fc1 = tensor_parallel.ColumnParallelLinear(
                in_features, out_features, config=config, init_method=config.init_method,
                bias=False, gather_output=False, skip_bias_add=True)
            self.linear_fc2 = tensor_parallel.RowParallelLinear(
                out_features, out_features, config=config,
                init_method=config.output_layer_init_method, bias=False,
                input_is_parallel=True, skip_bias_add=True)
        else:
            self.linear = tensor_parallel.RowParallelLinear(
                in_features, out_features, config=config,
                init_method=config.output_layer_init_method, bias=False,
                input_is_parallel=True, skip_bias_add=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[s(/tp under SP), b, h_lo] -> [s(/tp under SP), b, h_up]"""
        if self.mlp:
            h, _ = self.linear_fc1(x)
            out, _ = self.linear_fc2(torch.relu(h))
            return out
        if self.sequence_parallel:
            x = tensor_parallel.gather_from_sequence_parallel_region(x, tensor_parallel_output_grad=False)
        x = tensor_parallel.scatter_to_tensor_model_parallel_region(x)
        out, _ = self.linear(x)
        return out
