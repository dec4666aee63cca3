"""The HF <-> Megatron mapping table: bit-exact round trips and TP slicing layouts."""
from __future__ import annotations

import torch

from splitllama.config.model import ModelConfig
from splitllama.convert.mapping import (
    QKV, FC1, entries, hf_to_mcore, mcore_to_hf, merge_qkv, shard_state_dict, source_name, split_qkv,
    tp_shard, tp_unshard,
)
from splitllama.hf.build import split_from_llamas, tiny_llama_configs, tiny_llama_from_config


def _hf_state(mlp: bool) -> tuple[ModelConfig, dict]:
    lo, up = tiny_llama_configs()
    hf = split_from_llamas(tiny_llama_from_config(lo, 0), tiny_llama_from_config(up, 1), 2, 3, mlp=mlp)
    cfg = ModelConfig(lower=lo, upper=up, num_layers_lower=2, num_layers_upper=3, mlp=mlp)
    return cfg, {k: v.clone() for k, v in hf.state_dict().items()}


def test_round_trip_is_bit_exact():
    for mlp in (False, True):
        cfg, hf = _hf_state(mlp)
        mc = hf_to_mcore(hf, cfg)
        back = mcore_to_hf(mc, cfg)
        assert set(back) == set(hf)
        for k in hf:
            assert torch.equal(back[k], hf[k]), k
        # and through TP=2 shards
        shards = [shard_state_dict(mc, cfg, 2, r) for r in range(2)]
        for e in entries(cfg):
            assert torch.equal(tp_unshard(e, [s[e.mcore] for s in shards]), mc[e.mcore]), e.mcore


def test_qkv_layout_is_per_group():
    cfg, hf = _hf_state(False)
    blk = cfg.lower  # 4 heads, 2 groups, head_dim 16
    q, k, v = (hf[f"model.layers_first.0.self_attn.{p}_proj.weight"] for p in "qkv")
    qkv = merge_qkv(q, k, v, blk)
    hd = blk.kv_channels
    # group 0: q heads 0,1 then k0 then v0; group 1: q heads 2,3, k1, v1
    expect = torch.cat([q[0:2 * hd], k[0:hd], v[0:hd], q[2 * hd:4 * hd], k[hd:2 * hd], v[hd:2 * hd]])
    assert torch.equal(qkv, expect)
    assert all(torch.equal(a, b) for a, b in zip(split_qkv(qkv, blk), (q, k, v)))
    e = next(e for e in entries(cfg) if e.kind == QKV)
    # TP rank 1 of 2 holds exactly group 1
    assert torch.equal(tp_shard(e, qkv, 2, 1), expect[4 * hd:])


def test_fc1_shard_is_gate_and_up_chunks():
    cfg, hf = _hf_state(False)
    gate, up = hf["model.layers_first.1.mlp.gate_proj.weight"], hf["model.layers_first.1.mlp.up_proj.weight"]
    e = next(e for e in entries(cfg) if e.kind == FC1 and e.mcore.startswith("lower.layers.1."))
    full = torch.cat([gate, up])
    r1 = tp_shard(e, full, 2, 1)
    assert torch.equal(r1, torch.cat([gate.chunk(2)[1], up.chunk(2)[1]]))
    assert not torch.equal(r1, full.chunk(2)[1])  # the prototype's slice differs


def test_adapter_names_follow_mlp_flag():
    for mlp, names in ((False, {"adapter.linear.weight"}), (True, {"adapter.linear_fc1.weight", "adapter.linear_fc2.weight"})):
        cfg, _ = _hf_state(mlp)
        assert {e.mcore for e in entries(cfg) if e.mcore.startswith("adapter")} == names


def test_te_norm_names_are_accepted():
    cfg, hf = _hf_state(False)
    mc = hf_to_mcore(hf, cfg)
    te = {k.replace("input_layernorm.weight", "self_attention.linear_qkv.layer_norm_weight")
           .replace("pre_mlp_layernorm.weight", "mlp.linear_fc1.layer_norm_weight"): v for k, v in mc.items()}
    assert all(torch.equal(mcore_to_hf(te, cfg)[k], hf[k]) for k in hf)


def test_source_names_point_at_the_right_layers():
    cfg = ModelConfig(lower="llama3_8b", upper="llama3_70b", num_layers_lower=32, num_layers_upper=8)
    assert source_name("model.layers_last.0.mlp.up_proj.weight", cfg) == ("upper", "model.layers.72.mlp.up_proj.weight")
    assert source_name("model.layers_last.7.input_layernorm.weight", cfg)[1] == "model.layers.79.input_layernorm.weight"
    assert source_name("model.layers_first.31.self_attn.q_proj.weight", cfg) == ("lower", "model.layers.31.self_attn.q_proj.weight")
    assert source_name("model.embed_tokens.weight", cfg)[0] == "lower"
    assert source_name("lm_head.weight", cfg)[0] == "upper"
