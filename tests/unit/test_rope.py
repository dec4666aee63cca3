"""Per-block RoPE: Megatron rotary frequencies (with llama3 scaling) equal transformers'."""
from __future__ import annotations

import dataclasses

import pytest
import torch
from transformers import LlamaConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from splitllama.config.model import PRESETS
from splitllama.model.rope import build_rotary


@pytest.mark.parametrize("name", ["llama3_8b", "llama31_8b", "llama31_70b", "tiny_lower"])
def test_inv_freq_matches_transformers(name):
    blk = PRESETS[name]
    hf_cfg = LlamaConfig.from_dict(blk.to_hf_dict())
    rope_type = hf_cfg.rope_parameters.get("rope_type", "default") if hasattr(hf_cfg, "rope_parameters") else blk.rope_type
    if rope_type == "default":
        base = hf_cfg.rope_parameters["rope_theta"]
        dim = blk.kv_channels
        ref = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    else:
        ref, _ = ROPE_INIT_FUNCTIONS[rope_type](hf_cfg, "cpu")
    ours = build_rotary(blk, use_cpu_initialization=True).inv_freq
    assert rope_type == blk.rope_type
    torch.testing.assert_close(ours.double(), ref.double(), rtol=2e-7, atol=0)


def test_custom_llama3_parameters_are_honoured():
    blk = dataclasses.replace(PRESETS["tiny_lower"], rope_scaling={
        "rope_type": "llama3", "factor": 4.0, "low_freq_factor": 2.0, "high_freq_factor": 8.0,
        "original_max_position_embeddings": 32})
    hf_cfg = LlamaConfig.from_dict(blk.to_hf_dict())
    ref, _ = ROPE_INIT_FUNCTIONS["llama3"](hf_cfg, "cpu")
    torch.testing.assert_close(build_rotary(blk, True).inv_freq.double(), ref.double(), rtol=2e-7, atol=0)
    plain = build_rotary(dataclasses.replace(blk, rope_scaling=None), True).inv_freq
    assert not torch.allclose(plain, build_rotary(blk, True).inv_freq)
