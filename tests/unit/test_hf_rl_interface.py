"""What RL frameworks (veRL, vLLM) ask of the HF export: top-level LLaMA-like config attributes derived from the two
blocks, ``attn_implementation="flash_attention_2"`` (SDPA fallback without flash-attn) and packed input.

Packed input is veRL's "remove-padding" form: one row, ``position_ids`` restarting at 0 per document,
``attention_mask=None``, ``use_cache=False``. Tolerance: float64, 1e-10 absolute (the same arithmetic up to
summation order).
"""

from __future__ import annotations

import itertools
import json
import logging
import math
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForTokenClassification
from transformers.utils import is_flash_attn_2_available

from splitllama.hf.build import (
    critic_from_causal_lm,
    save_pretrained_with_code,
    split_from_llamas,
    tiny_llama_configs,
    tiny_llama_from_config,
)
from splitllama.hf.configuration_splitllama import CustomSplitLLamaConfig

DERIVED = ("hidden_size", "num_attention_heads", "num_key_value_heads", "max_position_embeddings", "head_dim")


def _blocks(h_lo=64, heads_lo=4, kv_lo=2, d_lo=16, pos_lo=256, h_up=192, heads_up=12, kv_up=4, d_up=16, pos_up=512):
    lo, up = tiny_llama_configs()
    lo.update(hidden_size=h_lo, num_attention_heads=heads_lo, num_key_value_heads=kv_lo, head_dim=d_lo,
              max_position_embeddings=pos_lo)
    up.update(hidden_size=h_up, num_attention_heads=heads_up, num_key_value_heads=kv_up, head_dim=d_up,
              max_position_embeddings=pos_up)
    return lo, up


def test_derived_attributes_rule():
    lo, up = _blocks()
    cfg = CustomSplitLLamaConfig(config8b=lo, config70b=up, num_layers_8=2, num_layers_70=3)
    assert (cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads) == (64, 4, 2)
    assert cfg.max_position_embeddings == 256 and cfg.head_dim == 16
    lo, up = _blocks(d_up=32, h_up=384)
    assert CustomSplitLLamaConfig(config8b=lo, config70b=up).head_dim is None  # blocks disagree
    # LLaMA-3-8B lower + 70B upper: 4096/32/8 and 8192/64/8
    lo, up = _blocks(4096, 32, 8, 128, 8192, 8192, 64, 8, 128, 8192)
    real = CustomSplitLLamaConfig(config8b=lo, config70b=up)
    assert (real.hidden_size, real.num_attention_heads, real.num_key_value_heads, real.head_dim) == (4096, 32, 8, 128)


@pytest.mark.parametrize("heads", [(4, 12, 2, 4), (6, 8, 2, 4), (3, 9, 3, 3), (8, 20, 8, 4), (12, 18, 6, 6)])
def test_divisibility_checks_match_both_blocks(heads):
    """For every divisor d up to 64: attr % d == 0 on the top level iff it holds in both blocks (tp, sp, ...);
    and the two-attribute checks (hidden % heads, heads % kv_heads) hold on the top level."""
    heads_lo, heads_up, kv_lo, kv_up = heads
    lo, up = _blocks(h_lo=16 * heads_lo, heads_lo=heads_lo, kv_lo=kv_lo, h_up=16 * heads_up, heads_up=heads_up,
                     kv_up=kv_up)
    cfg = CustomSplitLLamaConfig(config8b=lo, config70b=up)
    for attr in ("hidden_size", "num_attention_heads", "num_key_value_heads"):
        for d in range(1, 65):
            assert (getattr(cfg, attr) % d == 0) == (lo[attr] % d == 0 and up[attr] % d == 0), (attr, d)
    assert cfg.hidden_size % cfg.num_attention_heads == 0
    assert cfg.num_attention_heads % cfg.num_key_value_heads == 0
    assert cfg.num_key_value_heads == math.gcd(kv_lo, kv_up)


def test_derived_attributes_survive_save_and_load(tmp_path: Path):
    lo, up = _blocks()
    cfg = CustomSplitLLamaConfig(config8b=lo, config70b=up, num_layers_8=2, num_layers_70=3)
    cfg.save_pretrained(tmp_path)
    stored = json.loads((tmp_path / "config.json").read_text())
    assert stored["hidden_size"] == 64 and stored["num_attention_heads"] == 4  # written for plain-JSON readers
    again = CustomSplitLLamaConfig.from_pretrained(tmp_path)
    assert {k: getattr(again, k) for k in DERIVED} == {k: getattr(cfg, k) for k in DERIVED}
    again.save_pretrained(tmp_path / "twice")
    assert json.loads((tmp_path / "twice" / "config.json").read_text()) == stored
    # the per-block configs stay the source of truth: the model's layers use them
    assert again.upper_config().hidden_size == 192 and again.upper_config().num_attention_heads == 12


def test_conflicting_stored_value_is_refused(tmp_path: Path):
    lo, up = _blocks()
    CustomSplitLLamaConfig(config8b=lo, config70b=up).save_pretrained(tmp_path)
    data = json.loads((tmp_path / "config.json").read_text())
    data["num_attention_heads"] = 12
    (tmp_path / "config.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"num_attention_heads=12 but the two blocks give 4"):
        CustomSplitLLamaConfig.from_pretrained(tmp_path)


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """An export (mlp adapter) and its critic with blocks that differ in hidden size, heads and KV heads."""
    tmp = tmp_path_factory.mktemp("rl_exports")
    lo, up = _blocks()
    sources = tiny_llama_from_config(lo, seed=0), tiny_llama_from_config(up, seed=1)
    lm = split_from_llamas(*sources, 2, 3, mlp=True, adapter_init="random", seed=3)
    critic = critic_from_causal_lm(lm, init="normal", seed=5)
    return save_pretrained_with_code(lm, tmp / "lm"), save_pretrained_with_code(critic, tmp / "critic")


@pytest.mark.skipif(is_flash_attn_2_available(), reason="flash-attn is usable here: no fallback to test")
def test_flash_attention_2_request_falls_back_to_sdpa(exports, caplog):
    lm_dir, critic_dir = exports
    from transformers.utils import logging as hf_logging

    hf_logging.enable_propagation()
    try:
        with caplog.at_level(logging.WARNING):
            lm = AutoModelForCausalLM.from_pretrained(lm_dir, trust_remote_code=True, dtype=torch.float32,
                                                      attn_implementation="flash_attention_2")
            critic = AutoModelForTokenClassification.from_pretrained(
                critic_dir, trust_remote_code=True, dtype=torch.float32, attn_implementation="flash_attention_2")
    finally:
        hf_logging.disable_propagation()
    assert lm.config._attn_implementation == "sdpa" and critic.config._attn_implementation == "sdpa"
    lines = [r.getMessage() for r in caplog.records if "flash_attention_2 requested" in r.getMessage()]
    assert 1 <= len(lines) <= 2, lines  # one per model class at most (warning_once), never a failure
    assert all("using sdpa" in line for line in lines)
    assert type(lm)._supports_flash_attn


def _packed_vs_alone(model, field="logits"):
    g = torch.Generator().manual_seed(0)
    docs = [torch.randint(3, 512, (n,), generator=g) for n in (7, 3, 11, 5)]
    with torch.no_grad():
        alone = torch.cat([getattr(model(input_ids=d[None], use_cache=False), field)[0] for d in docs])
        ids = torch.cat(docs)[None]
        pos = torch.cat([torch.arange(len(d)) for d in docs])[None]
        packed = getattr(model(input_ids=ids, position_ids=pos, attention_mask=None, use_cache=False), field)[0]
        crossing = getattr(model(input_ids=ids, attention_mask=None, use_cache=False), field)[0]
    return packed, alone, crossing


@pytest.mark.parametrize("kind", ["actor", "critic"])
def test_packed_input_equals_documents_alone(exports, kind):
    lm_dir, critic_dir = exports
    auto = AutoModelForCausalLM if kind == "actor" else AutoModelForTokenClassification
    model = auto.from_pretrained(lm_dir if kind == "actor" else critic_dir, trust_remote_code=True,
                                 dtype=torch.float64, attn_implementation="flash_attention_2").eval()
    packed, alone, crossing = _packed_vs_alone(model)
    assert packed.shape == alone.shape == (26, 512 if kind == "actor" else 1)
    torch.testing.assert_close(packed, alone, rtol=0, atol=1e-10)
    assert (crossing - alone).abs().max() > 1e-4  # without the resets documents see each other


def test_auto_config_of_export_has_the_attributes(exports):
    cfg = AutoConfig.from_pretrained(exports[0], trust_remote_code=True)
    assert [getattr(cfg, k) for k in DERIVED] == [64, 4, 2, 256, 16]
    for a, b in itertools.combinations(("hidden_size", "num_attention_heads", "num_key_value_heads"), 2):
        assert getattr(cfg, a) % getattr(cfg, b) == 0
