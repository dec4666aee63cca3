"""The HF <-> Megatron mapping table: bit-exact round trips, TP slicing layouts, and the q/k/v
layout against a reference written out from transformers' LLaMA attention."""
from __future__ import annotations

import pytest
import torch

from splitllama.config.model import ModelConfig
from splitllama.convert.keys import schema
from splitllama.convert.mapping import (
    QKV, Copy, GatedFC1, hf_to_mcore, mappings, mcore_to_hf, source_name,
)
from splitllama.hf.build import split_from_llamas, tiny_llama_configs, tiny_llama_from_config


def _hf_state(mlp: bool) -> tuple[ModelConfig, dict]:
    lo, up = tiny_llama_configs()
    hf = split_from_llamas(tiny_llama_from_config(lo, 0), tiny_llama_from_config(up, 1), 2, 3, mlp=mlp)
    cfg = ModelConfig(lower=lo, upper=up, num_layers_lower=2, num_layers_upper=3, mlp=mlp)
    return cfg, {k: v.clone() for k, v in hf.state_dict().items()}


def _tiny(mlp: bool, head: str = "lm") -> ModelConfig:
    lo, up = tiny_llama_configs()
    return ModelConfig(lower=lo, upper=up, num_layers_lower=2, num_layers_upper=3, mlp=mlp, head=head)


def test_round_trip_is_bit_exact():
    for mlp in (False, True):
        cfg, hf = _hf_state(mlp)
        mc = hf_to_mcore(hf, cfg)
        back = mcore_to_hf(mc, cfg)
        assert set(back) == set(hf)
        for k in hf:
            assert torch.equal(back[k], hf[k]), k
        # and through TP=2 shards
        for m in mappings(cfg):
            assert torch.equal(m.unshard([m.shard(mc[m.mcore], 2, r) for r in range(2)]), mc[m.mcore]), m.mcore


@pytest.mark.parametrize("mlp,head", [(False, "lm"), (True, "lm"), (True, "value")])
def test_every_mapping_round_trips_and_shards(mlp, head):
    """For each mapping of the table, on random tensors of the tiny config's real shapes:
    split(merge(x)) == x, merge has the checkpoint shape, and the TP=2 slices put back
    together (a plain cat along the TP axis, or gate/up halves for fc1) give the merged tensor."""
    cfg = _tiny(mlp, head)
    g = torch.Generator().manual_seed(0)
    table = mappings(cfg)
    assert len({m.mcore for m in table}) == len(table) and len({h for m in table for h in m.hf}) == sum(
        len(m.hf) for m in table)
    assert {type(m) for m in table} >= {QKV, GatedFC1, Copy}
    for m in table:
        x = [torch.randn(s, generator=g) for s in m.hf_shapes]
        full = m.merge(x)
        assert tuple(full.shape) == m.shape, m.mcore
        assert len(m.split(full)) == len(x) and all(torch.equal(a, b) for a, b in zip(m.split(full), x)), m.mcore
        buf = torch.empty(m.shape)  # the importer's pooled-buffer form gives the same tensor
        assert torch.equal(m.merge(x, out=buf), full) and torch.equal(buf, full), m.mcore
        if m.row_offsets is not None:  # streamed as row blocks: each HF tensor sits at its offset
            for t, r0 in zip(x, m.row_offsets):
                assert torch.equal(full[r0:r0 + t.shape[0]], t), m.mcore
        shards = [m.shard(full, 2, r) for r in range(2)]
        assert torch.equal(m.unshard(shards), full), m.mcore
        for r, s in enumerate(shards):  # the live stream's in-place gather: views of the full tensor
            views = m.shard_views(full, 2, r)
            assert all(v.data_ptr() >= full.data_ptr() and v.untyped_storage().data_ptr() == full.data_ptr()
                       for v in views), m.mcore
            assert torch.equal(torch.cat(views, dim=m.tp_axis or 0), s), m.mcore
        if m.tp_axis is None:
            assert all(torch.equal(s, full) for s in shards), m.mcore
            continue
        assert shards[0].shape[m.tp_axis] * 2 == full.shape[m.tp_axis], m.mcore
        if isinstance(m, GatedFC1):
            gate, up = x
            f = gate.shape[0] // 2
            assert all(torch.equal(s, torch.cat([gate[r * f:(r + 1) * f], up[r * f:(r + 1) * f]]))
                       for r, s in enumerate(shards)), m.mcore
        else:
            assert torch.equal(torch.cat(shards, dim=m.tp_axis), full), m.mcore


def _reference_qkv(q, k, v, heads: int, groups: int) -> torch.Tensor:
    """Megatron's fused q/k/v rows, built head by head from transformers' LLaMA layout:
    q_proj rows [i*hd, (i+1)*hd) are query head i, k/v_proj rows [g*hd, (g+1)*hd) KV head g,
    and query head i attends with KV head i // (heads // groups) (`repeat_kv`). Megatron's
    linear_qkv stores, for each KV group g: its query heads, then k_g, then v_g."""
    hd = k.shape[0] // groups
    rows = []
    for grp in range(groups):
        for i in range(heads):
            if i // (heads // groups) == grp:
                rows.append(q[i * hd:(i + 1) * hd])
        rows += [k[grp * hd:(grp + 1) * hd], v[grp * hd:(grp + 1) * hd]]
    return torch.cat(rows)


def test_qkv_merge_matches_transformers_layout():
    cfg = _tiny(False)
    g = torch.Generator().manual_seed(1)
    for m, blk in ((mappings(cfg)[1], cfg.lower), (schema(cfg)["upper.layers.0.self_attention.linear_qkv.weight"], cfg.upper)):
        assert isinstance(m, QKV) and m.groups == blk.num_key_value_heads
        q, k, v = (torch.randn(s, generator=g, dtype=torch.float64) for s in m.hf_shapes)
        want = _reference_qkv(q, k, v, blk.num_attention_heads, blk.num_key_value_heads)
        assert torch.equal(m.merge([q, k, v]), want), m.mcore
    assert (cfg.lower.num_attention_heads, cfg.upper.num_attention_heads) == (4, 8)  # 2 and 4 heads per group


def test_qkv_layout_is_per_group():
    cfg, hf = _hf_state(False)
    blk = cfg.lower  # 4 heads, 2 groups, head_dim 16
    q, k, v = (hf[f"model.layers_first.0.self_attn.{p}_proj.weight"] for p in "qkv")
    e = next(e for e in mappings(cfg) if isinstance(e, QKV))
    qkv = e.merge([q, k, v])
    hd = blk.kv_channels
    # group 0: q heads 0,1 then k0 then v0; group 1: q heads 2,3, k1, v1
    expect = torch.cat([q[0:2 * hd], k[0:hd], v[0:hd], q[2 * hd:4 * hd], k[hd:2 * hd], v[hd:2 * hd]])
    assert torch.equal(qkv, expect)
    assert all(torch.equal(a, b) for a, b in zip(e.split(qkv), (q, k, v)))
    # TP rank 1 of 2 holds exactly group 1
    assert torch.equal(e.shard(qkv, 2, 1), expect[4 * hd:])
    with pytest.raises(ValueError, match="2 KV groups not divisible by TP 4"):
        e.shard(qkv, 4, 0)


def test_fc1_shard_is_gate_and_up_chunks():
    cfg, hf = _hf_state(False)
    gate, up = hf["model.layers_first.1.mlp.gate_proj.weight"], hf["model.layers_first.1.mlp.up_proj.weight"]
    e = next(e for e in mappings(cfg) if isinstance(e, GatedFC1) and e.mcore.startswith("lower.layers.1."))
    full = torch.cat([gate, up])
    r1 = e.shard(full, 2, 1)
    assert torch.equal(r1, torch.cat([gate.chunk(2)[1], up.chunk(2)[1]]))
    assert not torch.equal(r1, full.chunk(2)[1])  # the prototype's slice differs


def test_adapter_names_follow_mlp_flag():
    for mlp, names in ((False, {"adapter.linear.weight"}), (True, {"adapter.linear_fc1.weight", "adapter.linear_fc2.weight"})):
        cfg, _ = _hf_state(mlp)
        assert {e.mcore for e in mappings(cfg) if e.mcore.startswith("adapter")} == names


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


def test_shapes_of_the_llama3_8b_70b_model():
    cfg = ModelConfig(lower="llama3_8b", upper="llama3_70b", num_layers_lower=32, num_layers_upper=8)
    sch = schema(cfg)
    assert sch["embedding.word_embeddings.weight"].shape == (128256, 4096)
    assert sch["lower.layers.31.self_attention.linear_qkv.weight"].shape == (4096 + 2 * 8 * 128, 4096)
    assert sch["upper.layers.7.self_attention.linear_qkv.weight"].shape == (8192 + 2 * 8 * 128, 8192)
    assert sch["lower.layers.0.mlp.linear_fc1.weight"].shape == (2 * 14336, 4096)
    assert sch["upper.layers.0.mlp.linear_fc2.weight"].shape == (8192, 28672)
    assert sch["upper.layers.0.mlp.linear_fc1.layer_norm_weight"].shape == (8192,)
    assert sch["adapter.linear.weight"].shape == (8192, 4096) and sch["output_layer.weight"].shape == (128256, 8192)
    assert len(sch) == 1 + 6 * 40 + 1 + 2
