"""Layer specs: Transformer Engine when installed (or asked for), local PyTorch otherwise."""
from __future__ import annotations

import copy
import importlib.util

from megatron.core.models.gpt.gpt_layer_specs import (
    get_gpt_layer_local_spec,
    get_gpt_layer_with_transformer_engine_spec,
)
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.spec_utils import ModuleSpec

from splitllama.model.attention import SDPAttention
from splitllama.model.norm import RMSNorm


def have_transformer_engine() -> bool:
    return importlib.util.find_spec("transformer_engine") is not None


def resolve_impl(impl: str) -> str:
    """'auto' -> 'transformer_engine' when importable (and a GPU is in use), else 'local'."""
    if impl == "auto":
        import torch

        return "transformer_engine" if have_transformer_engine() and torch.cuda.is_available() else "local"
    if impl == "transformer_engine" and not have_transformer_engine():
        raise RuntimeError("model.transformer_impl=transformer_engine but transformer_engine is "
                           "not installed (pip install 'splitllama[gpu]')")
    return impl


def layer_spec(impl: str, attention_backend: str = "local") -> ModuleSpec:
    """The LLaMA decoder layer spec for `impl` ('local' | 'transformer_engine') with the core
    attention of `attention_backend` (resolved: 'sdpa' | 'local' | 'transformer_engine')."""
    if impl == "transformer_engine":
        spec = copy.deepcopy(get_gpt_layer_with_transformer_engine_spec())
    else:
        spec = copy.deepcopy(get_gpt_layer_local_spec(normalization="RMSNorm"))
        # Our RMSNorm supports sequence parallelism; Megatron's WrappedTorchNorm does not.
        spec.submodules.input_layernorm = RMSNorm
        spec.submodules.pre_mlp_layernorm = RMSNorm
    if attention_backend == "sdpa":
        spec.submodules.self_attention.submodules.core_attention = SDPAttention
    elif attention_backend == "local" and impl == "transformer_engine":
        spec.submodules.self_attention.submodules.core_attention = DotProductAttention
    return spec
