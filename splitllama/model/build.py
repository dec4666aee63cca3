"""Build this rank's SplitLlama stage from the typed configs (after parallel init)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from megatron.core import parallel_state

from splitllama.config.model import ModelConfig
from splitllama.config.parallel import ParallelConfig
from splitllama.model.attention import describe_kernel, resolve_backend
from splitllama.model.megatron_config import Numerics, block_config
from splitllama.model.model import SplitLlamaModel
from splitllama.model.spec import resolve_impl
from splitllama.pipeline.layout import PipelineLayout
from splitllama.platform.device import device as local_device


@dataclass
class BuiltModel:
    model: SplitLlamaModel
    layout: PipelineLayout
    impl: str
    attention_backend: str = "local"
    block_configs: tuple = ()  # (lower, upper) TransformerConfigs


def build_model(model_cfg: ModelConfig, parallel: ParallelConfig, numerics: Numerics,
                layout: Optional[PipelineLayout] = None, stage: Optional[int] = None) -> BuiltModel:
    """The stage of the model this rank owns, for callers without a `RunPlan` (tests,
    benchmarks): validates the model and the layout first. `layout` is required when PP > 1."""
    pp = parallel.pipeline_model_parallel_size
    model_cfg.validate(parallel.tensor_model_parallel_size)
    if layout is None:
        if pp > 1:
            raise ValueError("pipeline_model_parallel_size > 1 needs a pipeline layout")
        layout = PipelineLayout.single_stage(model_cfg.num_layers_lower, model_cfg.num_layers_upper)
    layout.validate(model_cfg.num_layers_lower, model_cfg.num_layers_upper, pp)
    return build_stage(model_cfg, parallel, numerics, layout, stage)


def build_stage(model_cfg: ModelConfig, parallel: ParallelConfig, numerics: Numerics,
                layout: PipelineLayout, stage: Optional[int] = None, impl: Optional[str] = None,
                backend: Optional[str] = None) -> BuiltModel:
    """The stage of the model this rank owns, from settings already validated (a `RunPlan`'s
    job sections, layout, layer implementation `impl` and attention `backend`; see
    `splitllama.preflight.resolve`). Without a plan (None) they are resolved from `model_cfg`."""
    pp = parallel.pipeline_model_parallel_size
    if stage is None:
        stage = parallel_state.get_pipeline_model_parallel_rank() if pp > 1 else 0
    impl = impl or resolve_impl(model_cfg.transformer_impl)
    backend = backend or resolve_backend(model_cfg.attention_backend, impl)
    lower = block_config(model_cfg, "lower", parallel, layout, numerics)
    upper = block_config(model_cfg, "upper", parallel, layout, numerics)
    model = SplitLlamaModel(model_cfg, lower, upper, layout, stage, impl, backend)
    return BuiltModel(model, layout, impl, backend, (lower, upper))


def attention_summary(built: BuiltModel, tp: int) -> str:
    """The one start-up line naming the attention backend and (sdpa) the kernel it runs."""
    if built.attention_backend != "sdpa":
        note = " (Megatron DotProductAttention: materialises [b, h, s, s] scores)" \
            if built.attention_backend == "local" else ""
        return f"attention: {built.attention_backend}{note}"
    dev = local_device()
    lower, upper = built.block_configs
    return (f"attention: sdpa | lower block kernel {describe_kernel(lower, dev, tp)} | "
            f"upper block kernel {describe_kernel(upper, dev, tp)}")
