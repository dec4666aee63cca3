"""A bridge for veRL's Megatron engine (vanilla mbridge 0.15.1): SplitLlama registered for the
export's ``model_type`` (``custom_split_llama``).

veRL 0.9.1's Megatron engine builds every model through a bridge (``use_mbridge``; with
``vanilla_mbridge=True`` it calls ``mbridge.AutoBridge.from_config(hf_config)``, then
``bridge.config`` (a TransformerConfig), ``bridge.get_model(...)`` / the provider,
``bridge.load_weights(models, hf_dir)`` and ``bridge.export_weights(models)`` for the rollout).
mbridge's own ``LLMBridge`` builds a one-block GPTModel with the Transformer Engine spec; this
bridge overrides, on mbridge's base ``Bridge``:

- ``_build_config``: SplitLlama's `ModelConfig` from the export's config.json (seed schema), the
  two blocks' TransformerConfigs at mbridge's TP/PP (the upper block's is ``bridge.config``), the
  uniform pipeline layout (`PipelineLayout.uniform`);
- ``_model_provider``: `SplitLlamaModel` with the local spec and SDPA (no TE) for this pipeline
  stage; a critic export (``CustomSplitLLamaForTokenClassification``) builds SplitLlama's own value
  head (``model.head=value``), so veRL's ``make_value_model`` hook is not applied (it would replace
  the head by a one-block-sized layer);
- ``load_weights``: the export's safetensors through the mapping table of ``export-hf``
  (``convert/mapping.py``), one tensor at a time, sharded to this rank;
- ``export_weights``: `splitllama.convert.stream.stream_hf_weights` (full tensors, export names).

Imported only where mbridge is installed (importing this module registers the bridge).
"""
from __future__ import annotations

from typing import Callable, Generator, Optional

import torch
from mbridge.core.bridge import Bridge, register_model

from splitllama.config.model import ModelConfig
from splitllama.config.parallel import ParallelConfig
from splitllama.convert.live import global_name
from splitllama.convert.mapping import canonical_mcore_name, mappings
from splitllama.convert.stream import stream_hf_weights, unwrap
from splitllama.model.megatron_config import Numerics, block_config
from splitllama.pipeline.layout import PipelineLayout

MODEL_TYPE = "custom_split_llama"


def model_config_of_hf(hf_config) -> ModelConfig:
    """SplitLlama's ModelConfig from an export's (transformers) config object."""
    d = hf_config.to_dict() if hasattr(hf_config, "to_dict") else dict(hf_config)
    cfg = ModelConfig.from_seed_dict(d, source=f"{MODEL_TYPE} config")
    cfg.transformer_impl, cfg.attention_backend = "local", "sdpa"
    return cfg


@register_model(MODEL_TYPE)
class SplitLlamaBridge(Bridge):
    """mbridge Bridge for SplitLlama (see the module docstring)."""

    def _build_config(self):
        self.model_cfg = model_config_of_hf(self.hf_config)
        self.parallel = ParallelConfig(tensor_model_parallel_size=self.mpu.tp_size,
                                       pipeline_model_parallel_size=self.mpu.pp_size,
                                       sequence_parallel=False)
        if (self.mpu.vpp_size or 1) > 1:
            raise ValueError("SplitLlamaBridge: virtual pipeline stages are not supported by this bridge")
        self.model_cfg.validate(self.mpu.tp_size)
        self.layout = PipelineLayout.uniform(self.model_cfg.num_layers_lower, self.model_cfg.num_layers_upper,
                                             self.mpu.pp_size)
        numerics = Numerics(params_dtype=self.dtype, bf16=self.dtype == torch.bfloat16,
                            use_cpu_initialization=True)
        self.block_configs = (block_config(self.model_cfg, "lower", self.parallel, self.layout, numerics),
                              block_config(self.model_cfg, "upper", self.parallel, self.layout, numerics))
        return self.block_configs[1]

    def _model_provider(self, post_model_creation_callbacks: list[Callable] = (), **_):
        from splitllama.model.model import SplitLlamaModel

        def provider(pre_process: bool = True, post_process: bool = True, vp_stage: Optional[int] = None, **__):
            stage = self.mpu.pp_rank
            lower, upper = self.block_configs
            model = SplitLlamaModel(self.model_cfg, lower, upper, self.layout, stage, "local", "sdpa")
            assert model.pre_process == pre_process and model.post_process == post_process, (
                f"stage {stage}: Megatron asks pre/post {pre_process}/{post_process}, layout gives "
                f"{model.pre_process}/{model.post_process}")
            for cb in post_model_creation_callbacks:
                if getattr(cb, "__name__", "") == "make_value_model":
                    if self.model_cfg.head != "value":
                        raise ValueError("veRL asked for a value model but the export is not a SplitLlama critic "
                                         "(tools/convert_checkpoint.py lm-to-critic, then export-hf)")
                    continue  # SplitLlama's own value head is already there
                cb(model, pre_process, post_process, self.config, self.hf_config)
            return model

        return provider

    def load_weights(self, models: list[torch.nn.Module], weights_path: str, memory_efficient: bool = False) -> None:
        """Fill the live chunks from an HF export directory (strict: every parameter covered)."""
        from megatron.core import parallel_state as ps

        from splitllama.convert.sources import HFCheckpoint

        hf = HFCheckpoint(self._get_actual_hf_path(weights_path), "export")
        table = {m.mcore: m for m in mappings(self.model_cfg)}
        tp, rank = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()
        with torch.no_grad():
            for chunk in models:
                m_ = unwrap(chunk)
                for local, p in m_.named_parameters():
                    name = canonical_mcore_name(global_name(local, m_.layout, m_.stage))
                    if name not in table:
                        raise KeyError(f"{weights_path}: no export tensor for parameter {local} ({name})")
                    m = table[name]
                    t = m.shard(m.merge([hf.read(n) for n in m.hf]), tp, rank)
                    if t.shape != p.shape:
                        raise ValueError(f"{name}: export slice {tuple(t.shape)} vs parameter {tuple(p.shape)}")
                    p.copy_(t.to(p.dtype))

    def export_weights(self, models: list[torch.nn.Module]) -> Generator[tuple[str, torch.Tensor], None, None]:
        yield from stream_hf_weights(models, self.model_cfg)
