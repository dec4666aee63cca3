"""Build this rank's SplitLlama stage from the typed configs (after parallel init)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from megatron.core import parallel_state

from splitllama.config.model import ModelConfig
from splitllama.config.parallel import ParallelConfig
from splitllama.model.attention import resolve_backend
from splitllama.model.megatron_config import Numerics, block_config
from splitllama.model.model import SplitLlamaModel
from splitllama.model.spec import resolve_impl
from splitllama.pipeline.layout import PipelineLayout


def single_stage_layout(model: ModelConfig) -> PipelineLayout:
    return PipelineLayout.parse(f"L{model.num_layers_lower},A,U{model.num_layers_upper}")


@dataclass
class BuiltModel:
    model: SplitLlamaModel
    layout: PipelineLayout
    impl: str
    attention_backend: str = "local"


def build_model(model_cfg: ModelConfig, parallel: ParallelConfig, numerics: Numerics,
                layout: Optional[PipelineLayout] = None, stage: Optional[int] = None) -> BuiltModel:
    """The stage of the model this rank owns. `layout` is required when PP > 1."""
    pp = parallel.pipeline_model_parallel_size
    model_cfg.validate(parallel.tensor_model_parallel_size)
    if layout is None:
        if pp > 1:
            raise ValueError("pipeline_model_parallel_size > 1 needs a pipeline layout")
        layout = single_stage_layout(model_cfg)
    layout.validate(model_cfg.num_layers_lower, model_cfg.num_layers_upper, pp)
    if stage is None:
        stage = parallel_state.get_pipeline_model_parallel_rank() if pp > 1 else 0
    impl = resolve_impl(model_cfg.transformer_impl)
    backend = resolve_backend(model_cfg.attention_backend, impl)
    numerics.transformer_engine = impl == "transformer_engine"
    lower = block_config(model_cfg, "lower", parallel, layout, numerics)
    upper = block_config(model_cfg, "upper", parallel, layout, numerics)
    model = SplitLlamaModel(model_cfg, lower, upper, layout, stage, impl, backend)
    return BuiltModel(model, layout, impl, backend)
