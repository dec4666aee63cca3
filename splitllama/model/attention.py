"""Core attention without Transformer Engine: torch's scaled_dot_product_attention (SDPA).

`SDPAttention` has the interface of Megatron-Core's ``DotProductAttention`` (the
``core_attention`` slot of a layer spec): it receives query [sq, b, np, hn] and key / value
[sk, b, ng, hn] (this TP rank's heads; under SP the sequence is already gathered), and returns
[sq, b, np * hn]. Three masking modes, chosen per call:

- no mask: causal (``is_causal=True``), the flash-class path;
- ``attention_mask`` (Megatron's convention: bool [b or 1, 1, sq, sk], True = masked out), e.g.
  GPTDataset's block-diagonal document mask with ``data.reset_attention_mask``;
- ``packed_seq_params`` with ``qkv_format='thd'`` (query [t, np, hn]; variable-length documents
  concatenated, boundaries in ``cu_seqlens_q``): causal attention inside each document, one
  SDPA call per document, so no [t, t] mask or score tensor and no cross-document work.

GQA uses ``enable_gqa=True`` (no repeated K/V in memory) where the kernel SDPA would pick
supports it, else K/V are expanded. On GPU the kernel preference is cuDNN, then flash, then
memory-efficient, then math (``sdpa_kernel(..., set_priority=True)``); `describe_kernel`
reports which one the dispatcher picks for this model's shapes (the start-up log line).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig
from torch.nn.attention import SDPBackend, sdpa_kernel

from splitllama.config.model import ATTENTION_BACKENDS as BACKENDS  # flex is not offered: benchmarks/README.md
from splitllama.platform.compat.model import sdp_kernel_choice

KERNEL_PRIORITY = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION,
                   SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
_KERNEL_NAMES = {int(SDPBackend.CUDNN_ATTENTION): "cudnn", int(SDPBackend.FLASH_ATTENTION): "flash",
                 int(SDPBackend.EFFICIENT_ATTENTION): "memory-efficient", int(SDPBackend.MATH): "math"}


def resolve_backend(backend: str, impl: str) -> str:
    """'auto' -> 'transformer_engine' with the TE layer spec, else 'sdpa'."""
    if backend not in BACKENDS:
        raise ValueError(f"model.attention_backend={backend!r}; expected one of {'|'.join(BACKENDS)}")
    if backend == "auto":
        return "transformer_engine" if impl == "transformer_engine" else "sdpa"
    if backend == "transformer_engine" and impl != "transformer_engine":
        raise ValueError("model.attention_backend=transformer_engine needs the Transformer Engine "
                         "layer spec (model.transformer_impl=transformer_engine)")
    return backend


def check_packing_support(backend: str, *, reset_attention_mask: bool, packed_sequences: bool) -> None:
    """Refuse document masking a backend cannot honour (ValueError naming backend and flag)."""
    if backend == "transformer_engine" and (reset_attention_mask or packed_sequences):
        flag = "data.reset_attention_mask" if reset_attention_mask else "data.packed_sequences"
        raise ValueError(f"model.attention_backend=transformer_engine cannot honour {flag} in "
                         f"SplitLlama (its layer spec uses TE's causal mask type, which ignores "
                         f"document masks); use model.attention_backend=sdpa")
    if backend == "local" and packed_sequences:
        raise ValueError("model.attention_backend=local cannot honour data.packed_sequences "
                         "(Megatron-Core's DotProductAttention has no packed/THD path); use "
                         "model.attention_backend=sdpa")


def _choice(q, k, v, mask, causal: bool, gqa: bool) -> int:
    """The kernel SDPA's dispatcher picks (torch private `_fused_sdp_choice`: `platform.compat.model`)."""
    return sdp_kernel_choice(q, k, v, mask, causal, gqa)


class SDPAttention(MegatronModule):
    """Megatron ``core_attention`` on torch SDPA; see the module docstring."""

    def __init__(self, config: TransformerConfig, layer_number: int, attn_mask_type: AttnMaskType,
                 attention_type: str, attention_dropout: Optional[float] = None,
                 softmax_scale: Optional[float] = None, cp_comm_type: Optional[str] = None,
                 pg_collection=None) -> None:
        super().__init__(config=config)
        if config.context_parallel_size != 1:
            raise ValueError("model.attention_backend=sdpa does not support context parallelism")
        dropout = config.attention_dropout if attention_dropout is None else attention_dropout
        if dropout:
            raise ValueError(f"model.attention_backend=sdpa runs with attention dropout 0 (got {dropout})")
        if attn_mask_type not in (AttnMaskType.causal, AttnMaskType.padding_causal):
            raise ValueError(f"SDPAttention is causal self-attention; got mask type {attn_mask_type}")
        self.softmax_scale = softmax_scale or 1.0 / math.sqrt(config.kv_channels)
        self._gqa_native: dict[tuple, bool] = {}  # (device, dtype, masked) -> enable_gqa works

    def _use_native_gqa(self, q, k, v, mask, causal: bool) -> bool:
        key = (q.device.type, q.dtype, mask is not None, causal)
        if key not in self._gqa_native:
            self._gqa_native[key] = gqa_is_native(q, k, v, mask, causal)
        return self._gqa_native[key]

    def _sdpa(self, q, k, v, mask=None, causal=True):
        """q [b, np, s, hn], k/v [b, ng, s, hn]; SDPA with the kernel priority and GQA choice."""
        gqa = q.size(1) != k.size(1)
        if gqa and not self._use_native_gqa(q, k, v, mask, causal):
            rep = q.size(1) // k.size(1)
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
            gqa = False
        with sdpa_kernel(KERNEL_PRIORITY, set_priority=True):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal,
                                                  scale=self.softmax_scale, enable_gqa=gqa)

    def forward(self, query, key, value, attention_mask, attn_mask_type=None,
                attention_bias=None, packed_seq_params: Optional[PackedSeqParams] = None):
        if attention_bias is not None:
            raise ValueError("model.attention_backend=sdpa does not take an attention bias")
        if packed_seq_params is not None and packed_seq_params.qkv_format == "thd":
            return self._forward_thd(query, key, value, packed_seq_params)
        # [s, b, n, d] -> [b, n, s, d]
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        if attention_mask is None:
            out = self._sdpa(q, k, v, causal=True)
        else:  # Megatron: True = masked out; SDPA: True = attend
            out = self._sdpa(q, k, v, mask=~attention_mask.to(torch.bool), causal=False)
        s, b = query.size(0), query.size(1)
        return out.permute(2, 0, 1, 3).reshape(s, b, -1)

    def _forward_thd(self, query, key, value, params: PackedSeqParams):
        """query [t, np, hn]: one causal SDPA call per document of ``cu_seqlens_q``."""
        cu = params.cu_seqlens_q.tolist()
        if cu[0] != 0 or cu[-1] != query.size(0):
            raise ValueError(f"packed_seq_params.cu_seqlens_q spans [{cu[0]}, {cu[-1]}) but the "
                             f"packed sequence has {query.size(0)} tokens")
        lengths = [end - start for start, end in zip(cu[:-1], cu[1:])]
        if min(lengths) < 0:
            raise ValueError(f"packed_seq_params.cu_seqlens_q is not non-decreasing: {cu}")
        # torch.split, not slicing: its backward is one concatenation of the segments' grads
        # (slices would each zero-fill a full-size gradient)
        outs = []
        for q, k, v in zip(*(torch.split(t, lengths) for t in (query, key, value))):
            if q.size(0) == 0:
                continue
            q, k, v = (t.transpose(0, 1).unsqueeze(0) for t in (q, k, v))
            outs.append(self._sdpa(q, k, v, causal=True)[0].transpose(0, 1))
        return torch.cat(outs, dim=0).reshape(query.size(0), -1)


def gqa_is_native(q, k, v, mask, causal: bool) -> bool:
    """True unless ``enable_gqa`` would push SDPA to the math kernel while expanded K/V would
    get a fused one (then expanding is the faster choice)."""
    try:
        with sdpa_kernel(KERNEL_PRIORITY, set_priority=True):
            native = _choice(q, k, v, mask, causal, True)
            if native != int(SDPBackend.MATH):
                return True
            rep = q.size(1) // k.size(1)
            ke, ve = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
            return _choice(q, ke, ve, mask, causal, False) == int(SDPBackend.MATH)
    except (AttributeError, RuntimeError, TypeError):  # no private probe: trust enable_gqa
        return True


def describe_kernel(config: TransformerConfig, device: torch.device, tp: int) -> str:
    """Which SDPA kernel this block's causal attention runs with, e.g. 'flash (GQA native)'."""
    heads, groups = config.num_attention_heads // tp, config.num_query_groups // tp
    dtype = torch.bfloat16 if config.bf16 else config.params_dtype
    q = torch.zeros(1, heads, 128, config.kv_channels, device=device, dtype=dtype)
    k = torch.zeros(1, groups, 128, config.kv_channels, device=device, dtype=dtype)
    native = heads == groups or gqa_is_native(q, k, k, None, True)
    if not native:
        k = k.repeat_interleave(heads // groups, dim=1)
    try:
        with sdpa_kernel(KERNEL_PRIORITY, set_priority=True):
            name = _KERNEL_NAMES.get(_choice(q, k, k, None, True, native and heads != groups), "unknown")
    except (AttributeError, RuntimeError, TypeError):
        name = "unknown"
    gqa = "no GQA" if heads == groups else ("GQA native" if native else "GQA via expanded K/V")
    return f"{name} ({gqa}, {str(dtype).replace('torch.', '')}, {device.type})"
