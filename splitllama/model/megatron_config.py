"""Derive one Megatron `TransformerConfig` per block (lower / upper) from the typed configs."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core.transformer import TransformerConfig

from splitllama.config.model import LlamaBlockConfig, ModelConfig
from splitllama.config.parallel import ParallelConfig
from splitllama.pipeline.layout import PipelineLayout


@dataclass
class Numerics:
    """Precision / recompute settings shared by both blocks."""

    params_dtype: torch.dtype = torch.float32
    bf16: bool = False
    use_cpu_initialization: bool = False
    recompute_granularity: Optional[str] = None  # None | "full" | "selective"
    recompute_method: Optional[str] = None  # "uniform" | "block" (full recompute)
    recompute_num_layers: Optional[int] = None


def block_config(model: ModelConfig, which: str, parallel: ParallelConfig,
                 layout: Optional[PipelineLayout], numerics: Numerics) -> TransformerConfig:
    """The TransformerConfig of the `which` ("lower"|"upper") block.

    Both blocks carry the real PP size; with PP > 1 a per-block
    `pipeline_model_parallel_layout` generated from the stage plan tells Megatron how many of
    this block's layers each stage builds, so layer numbers (and checkpoint keys) stay global.
    """
    blk: LlamaBlockConfig = model.lower if which == "lower" else model.upper
    num_layers = model.num_layers_lower if which == "lower" else model.num_layers_upper
    pp = parallel.pipeline_model_parallel_size
    recompute = numerics.recompute_granularity
    kwargs = {}
    if pp > 1:
        assert layout is not None, "PP > 1 needs a pipeline layout"
        kwargs["pipeline_model_parallel_layout"] = layout.megatron_layout(which)
    if recompute == "full":
        kwargs.update(recompute_granularity="full", recompute_method=numerics.recompute_method or "uniform",
                      recompute_num_layers=numerics.recompute_num_layers or 1)
    elif recompute == "selective":
        kwargs.update(recompute_granularity="selective")
    return TransformerConfig(
        num_layers=num_layers,
        hidden_size=blk.hidden_size,
        ffn_hidden_size=blk.intermediate_size,
        num_attention_heads=blk.num_attention_heads,
        num_query_groups=blk.num_key_value_heads,
        kv_channels=blk.kv_channels,
        normalization="RMSNorm",
        layernorm_epsilon=blk.rms_norm_eps,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        apply_rope_fusion=False,
        persist_layer_norm=False,
        gradient_accumulation_fusion=False,
        init_method_std=model.init_method_std,
        tensor_model_parallel_size=parallel.tensor_model_parallel_size,
        pipeline_model_parallel_size=pp,
        sequence_parallel=parallel.sequence_parallel,
        params_dtype=numerics.params_dtype,
        bf16=numerics.bf16,
        pipeline_dtype=numerics.params_dtype,
        use_cpu_initialization=numerics.use_cpu_initialization,
        batch_p2p_comm=False,
        hetereogenous_dist_checkpoint=True,  # per-layer checkpoint keys: N and M may change
        cuda_graph_scope=[],  # = the whole layer; core 0.16's default "full" is deprecated (warns)
        **kwargs,
    )
