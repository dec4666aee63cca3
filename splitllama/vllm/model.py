"""Native vLLM model of a SplitLlama HF export (``CustomSplitLLamaForCausalLM``), built from vLLM's own layers.

``VocabParallelEmbedding (lower width) -> N x LlamaDecoderLayer(lower config) -> adapter -> M x
LlamaDecoderLayer(upper config) -> RMSNorm -> ParallelLMHead``. Each block's decoder layers get their own
LlamaConfig (hidden size, heads, KV heads, head_dim, RoPE) through ``LlamaDecoderLayer(..., config=block_cfg)``.

Layer numbering: vLLM binds each attention layer to its KV cache by the single integer in the layer's module
name, so both blocks live in ONE list ``model.layers.{g}``: lower layer i is ``g = i``, upper layer j is
``g = N + j`` (the same cache indices as the HF model). :func:`vllm_weight_name` maps the export's
``layers_first.{i}`` / ``layers_last.{j}`` names onto it; the safetensors are read as exported.

Tensor parallel: attention and MLP as in vLLM's LLaMA (column/row parallel); the adapter like Megatron's:
``mlp=false`` is one RowParallelLinear (input split locally, output all-reduced), ``mlp=true`` is
ColumnParallelLinear -> ReLU -> RowParallelLinear. :mod:`splitllama.vllm.fit` says which TP sizes fit.

Pipeline parallel: vLLM's ``make_layers`` splits the N+M layers; the stage holding lower layer N-1 applies the
adapter; :meth:`SplitLlamaModel.make_empty_intermediate_tensors` gives each stage the width of the boundary it
receives (lower width before the adapter, upper width after it).
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from itertools import islice

import torch
from torch import nn
from transformers import LlamaConfig
from vllm.config import VllmConfig
from vllm.distributed import get_pp_group, get_tensor_model_parallel_world_size
from vllm.model_executor.layers.layernorm import RMSNorm
from vllm.model_executor.layers.linear import ColumnParallelLinear, RowParallelLinear
from vllm.model_executor.layers.logits_processor import LogitsProcessor
from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead, VocabParallelEmbedding
from vllm.model_executor.model_loader.weight_utils import default_weight_loader
from vllm.model_executor.models.interfaces import SupportsPP
from vllm.model_executor.models.llama import LlamaDecoderLayer
from vllm.model_executor.models.utils import PPMissingLayer, extract_layer_index, make_layers, maybe_prefix
from vllm.sequence import IntermediateTensors

from .fit import check_tensor_parallel
from .weights import STACKED_PARAMS, UnknownWeightError, export_shapes, vllm_weight_name


def block_configs(hf_config) -> tuple[LlamaConfig, LlamaConfig]:
    """Fresh ``(lower, upper)`` LlamaConfigs from the export's embedded ``config8b`` / ``config70b`` dicts."""
    return (LlamaConfig.from_dict(copy.deepcopy(hf_config.config8b)),
            LlamaConfig.from_dict(copy.deepcopy(hf_config.config70b)))


class SplitLlamaModel(nn.Module):
    """Embedding, the N+M decoder layers in one list, the adapter and the final norm (this stage's part)."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        super().__init__()
        config = vllm_config.model_config.hf_config
        quant_config = vllm_config.quant_config
        self.config = config
        self.lower_config, self.upper_config = block_configs(config)
        check_tensor_parallel(config, get_tensor_model_parallel_world_size())
        self.num_lower = int(config.num_layers_8)
        self.num_layers = self.num_lower + int(config.num_layers_70)
        self.h_lower, self.h_upper = self.lower_config.hidden_size, self.upper_config.hidden_size
        pp = get_pp_group()

        if pp.is_first_rank:
            self.embed_tokens = VocabParallelEmbedding(config.vocab_size, self.h_lower, quant_config=quant_config,
                                                       prefix=f"{prefix}.embed_tokens")
        else:
            self.embed_tokens = PPMissingLayer()

        def layer(prefix: str) -> LlamaDecoderLayer:
            block = self.lower_config if extract_layer_index(prefix) < self.num_lower else self.upper_config
            return LlamaDecoderLayer(vllm_config=vllm_config, prefix=prefix, config=block)

        self.start_layer, self.end_layer, self.layers = make_layers(self.num_layers, layer, prefix=f"{prefix}.layers")
        self.mlp = bool(config.mlp)
        if self.start_layer < self.num_lower <= self.end_layer:  # this stage holds lower layer N-1
            self._build_adapter(quant_config, prefix)
        self.norm = RMSNorm(self.h_upper, eps=config.rms_norm_eps) if pp.is_last_rank else PPMissingLayer()

    def _build_adapter(self, quant_config, prefix: str) -> None:
        """The export's adapter modules (same names), tensor parallel as described in the module docstring."""
        if self.mlp:
            self.adapter_linear_1 = ColumnParallelLinear(self.h_lower, self.h_upper, bias=False, gather_output=False,
                                                         quant_config=quant_config,
                                                         prefix=f"{prefix}.adapter_linear_1")
            self.adapter_linear_2 = RowParallelLinear(self.h_upper, self.h_upper, bias=False,
                                                      input_is_parallel=True, quant_config=quant_config,
                                                      prefix=f"{prefix}.adapter_linear_2")
        else:
            self.adapter = RowParallelLinear(self.h_lower, self.h_upper, bias=False, input_is_parallel=False,
                                             quant_config=quant_config, prefix=f"{prefix}.adapter")

    def apply_adapter(self, x: torch.Tensor) -> torch.Tensor:
        """Lower residual stream (width h_lower) -> upper one (width h_upper)."""
        if self.mlp:
            x, _ = self.adapter_linear_1(x)
            x, _ = self.adapter_linear_2(torch.relu(x))
        else:
            x, _ = self.adapter(x)
        return x

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens(input_ids)

    def make_empty_intermediate_tensors(self, batch_size: int, dtype: torch.dtype,
                                        device: torch.device) -> IntermediateTensors:
        """Receive buffers of this stage: the width of the residual stream after layer ``start_layer - 1``."""
        width = self.h_lower if self.start_layer < self.num_lower else self.h_upper
        return IntermediateTensors({key: torch.zeros((batch_size, width), dtype=dtype, device=device)
                                    for key in ("hidden_states", "residual")})

    def forward(self, input_ids: torch.Tensor | None, positions: torch.Tensor,
                intermediate_tensors: IntermediateTensors | None,
                inputs_embeds: torch.Tensor | None = None) -> torch.Tensor | IntermediateTensors:
        if get_pp_group().is_first_rank:
            hidden_states = inputs_embeds if inputs_embeds is not None else self.embed_input_ids(input_ids)
            residual = None
        else:
            assert intermediate_tensors is not None
            hidden_states, residual = intermediate_tensors["hidden_states"], intermediate_tensors["residual"]
        for idx, layer in enumerate(islice(self.layers, self.start_layer, self.end_layer), start=self.start_layer):
            hidden_states, residual = layer(positions, hidden_states, residual)
            if idx == self.num_lower - 1:
                # vLLM's layers carry (delta, residual); the residual stream itself is their sum.
                stream = hidden_states if residual is None else hidden_states + residual
                hidden_states = self.apply_adapter(stream)
                # Zero residual (not None) keeps the (hidden_states, residual) pair uniform across stages;
                # the next layer's fused add-norm then sees exactly the adapter output.
                residual = torch.zeros_like(hidden_states)
        if not get_pp_group().is_last_rank:
            return IntermediateTensors({"hidden_states": hidden_states, "residual": residual})
        hidden_states, _ = self.norm(hidden_states, residual)
        return hidden_states


class SplitLlamaForCausalLM(nn.Module, SupportsPP):
    """vLLM model for the ``CustomSplitLLamaForCausalLM`` architecture of SplitLlama HF exports."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        super().__init__()
        config = vllm_config.model_config.hf_config
        if getattr(config, "tie_word_embeddings", False):
            raise ValueError("SplitLlama exports have an untied lm_head (upper model's); config says tied")
        self.config = config
        self.model = SplitLlamaModel(vllm_config=vllm_config, prefix=maybe_prefix(prefix, "model"))
        if get_pp_group().is_last_rank:
            self.lm_head = ParallelLMHead(config.vocab_size, self.model.h_upper, quant_config=vllm_config.quant_config,
                                          prefix=maybe_prefix(prefix, "lm_head"))
            self.logits_processor = LogitsProcessor(config.vocab_size)
        else:
            self.lm_head = PPMissingLayer()
        self.make_empty_intermediate_tensors = self.model.make_empty_intermediate_tensors

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.embed_input_ids(input_ids)

    def forward(self, input_ids: torch.Tensor | None, positions: torch.Tensor,
                intermediate_tensors: IntermediateTensors | None = None,
                inputs_embeds: torch.Tensor | None = None) -> torch.Tensor | IntermediateTensors:
        return self.model(input_ids, positions, intermediate_tensors, inputs_embeds)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor | None:
        return self.logits_processor(self.lm_head, hidden_states)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Load export tensors (HF names) into this stage's parameters; returns the parameter names filled.

        Strict: a name that is not one of the export's (:func:`export_shapes`) raises :class:`UnknownWeightError`
        naming it, before anything of this call is loaded; tensors of other pipeline stages' layers are skipped.
        vLLM calls this at start-up (its loader then raises on parameters left unfilled) and from
        ``reload_weights``; a rollout weight sync goes through :mod:`splitllama.vllm.sync`, never through a direct
        call on the running engine (vLLM-CPU has replaced the linear weights by prepacked ones by then).
        """
        weights = list(weights)
        expected = export_shapes(self.config)
        unknown = sorted(name for name, _ in weights if name not in expected)
        if unknown:
            raise UnknownWeightError(f"{len(unknown)} tensor name(s) not in a SplitLlama export of this config: "
                                     + ", ".join(unknown[:8]) + (" ..." if len(unknown) > 8 else ""))
        params = dict(self.named_parameters())
        loaded: set[str] = set()
        for hf_name, tensor in weights:
            name = vllm_weight_name(hf_name, self.model.num_lower)
            for hf_part, fused, shard in STACKED_PARAMS:
                if hf_part in name:
                    name = name.replace(hf_part, fused)
                    if name in params:  # absent: a layer of another pipeline stage
                        params[name].weight_loader(params[name], tensor, shard)
                        loaded.add(name)
                    break
            else:
                if name in params:  # absent: another pipeline stage's tensor
                    param = params[name]
                    getattr(param, "weight_loader", default_weight_loader)(param, tensor)
                    loaded.add(name)
        return loaded  # vLLM's loader reports parameters the checkpoint did not fill
