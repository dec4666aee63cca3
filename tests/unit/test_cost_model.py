"""Cost model sanity (splitllama/pipeline/cost.py): parameter counts, FLOPs, memory, p2p widths."""
from __future__ import annotations

from pathlib import Path

import pytest

from splitllama.config.job import load_job_config
from splitllama.config.model import ModelConfig
from splitllama.preflight.resolve import units_for_job
from splitllama.pipeline.cost import CAUSAL_ATTENTION_FACTOR, layer_param_counts, units_for

CFG = str(Path(__file__).resolve().parents[2] / "configs" / "llama3_8b_70b.yaml")


def model(n: int = 32, m: int = 8, mlp: bool = False) -> ModelConfig:
    return ModelConfig(lower="llama3_8b", upper="llama3_70b", num_layers_lower=n, num_layers_upper=m, mlp=mlp)


def by_name(units):
    return {u.name: u for u in units}


def test_param_counts_match_llama3():
    u = by_name(units_for(model(mlp=True), seq=128, micro_batch=1))
    assert u["lower.0"].param_count == 218_112_000  # 218.1 M
    assert u["upper.0"].param_count == 855_654_400  # 855.7 M (3.92x)
    assert u["embedding"].param_count == 525_336_576  # 525.3 M
    assert u["head"].param_count == 128256 * 8192 + 8192  # LM head 1.051 B + final norm
    assert round(u["head"].param_count / 1e9, 3) == 1.051
    assert round(u["adapter"].param_count / 1e6, 1) == 100.7
    assert by_name(units_for(model(), 128, 1))["adapter"].param_count == 4096 * 8192


def test_layer_params_reproduce_hf_totals():
    m = model()
    for blk, total in ((m.lower, 8_030_261_248), (m.upper, 70_553_706_496)):
        gemm, norms = layer_param_counts(blk)
        emb = blk.vocab_size * blk.hidden_size
        assert 2 * emb + blk.num_hidden_layers * (gemm + norms) + blk.hidden_size == total


def test_forward_flop_ratio_70b_over_8b():
    u = by_name(units_for(model(), seq=128, micro_batch=1))
    ratio = u["upper.0"].fwd_flops / u["lower.0"].fwd_flops
    assert 3.85 < ratio < 3.95
    assert u["upper.0"].param_count / u["lower.0"].param_count == pytest.approx(3.923, abs=1e-3)


def test_gemm_and_attention_flops():
    seq, b = 4096, 2
    u = by_name(units_for(model(), seq, b))
    gemm, _ = layer_param_counts(model().lower)
    core = 4 * b * seq * seq * 32 * 128 * CAUSAL_ATTENTION_FACTOR
    assert u["lower.0"].fwd_flops == pytest.approx(2 * seq * b * gemm + core)
    head_per_token = u["head"].fwd_flops / (seq * b)
    assert head_per_token == pytest.approx(2.10e9, rel=0.01)  # 2.10 GFLOP/token (+ CE)
    assert u["embedding"].fwd_flops == 0.0
    # attention grows with s^2: doubling seq more than doubles a layer's FLOPs
    u2 = by_name(units_for(model(), 2 * seq, b))
    extra = u2["lower.0"].fwd_flops - 2 * u["lower.0"].fwd_flops
    assert extra == pytest.approx(2 * core)


def test_backward_and_recompute():
    none = by_name(units_for(model(), 4096, 1, recompute=None))
    sel = by_name(units_for(model(), 4096, 1, recompute="selective"))
    full = by_name(units_for(model(), 4096, 1, recompute="full"))
    core = 4 * 4096 * 4096 * 64 * 128 * CAUSAL_ATTENTION_FACTOR
    f = none["upper.0"].fwd_flops
    assert none["upper.0"].bwd_flops == pytest.approx(2 * f)
    assert sel["upper.0"].bwd_flops == pytest.approx(2 * f + core)
    assert full["upper.0"].bwd_flops == pytest.approx(3 * f)
    # recompute never touches embedding, adapter, head
    for name in ("adapter", "head"):
        assert full[name].bwd_flops == pytest.approx(2 * full[name].fwd_flops)
    assert full["upper.0"].time > sel["upper.0"].time > none["upper.0"].time
    with pytest.raises(ValueError, match="recompute"):
        units_for(model(), 4096, 1, recompute="sometimes")


def test_activation_bytes_korthikanti():
    s, b, tp = 4096, 1, 8
    h, a = 8192, 64
    sbh = s * b * h
    kw = dict(seq=s, micro_batch=b, tp=tp, sequence_parallel=True)
    none = by_name(units_for(model(), recompute=None, **kw))["upper.0"]
    sel = by_name(units_for(model(), recompute="selective", **kw))["upper.0"]
    full = by_name(units_for(model(), recompute="full", **kw))["upper.0"]
    assert none.act_bytes_per_mb == pytest.approx(sbh * (34 + 5 * a * s / h) / tp)
    assert sel.act_bytes_per_mb == pytest.approx(34 * sbh / tp)
    assert full.act_bytes_per_mb == pytest.approx(2 * sbh / tp)
    assert full.act_working_bytes == pytest.approx(none.act_bytes_per_mb)
    tp_only = by_name(units_for(model(), s, b, tp, recompute="selective", sequence_parallel=False))
    assert tp_only["upper.0"].act_bytes_per_mb == pytest.approx(sbh * (10 + 24 / tp))
    head = by_name(units_for(model(), s, b, tp=1))["head"]
    assert head.act_bytes_per_mb >= s * b * 128256 * 6


def test_state_bytes_tp_dp_and_distributed_optimizer():
    n = 855_654_400
    one = by_name(units_for(model(), 4096, 1))["upper.0"]
    assert one.param_bytes == 2 * n and one.grad_bytes == 4 * n and one.optim_bytes == 12 * n
    tp8 = by_name(units_for(model(), 4096, 1, tp=8, dp=4))["upper.0"]
    sharded = (n - 2 * 8192) / 8 + 2 * 8192  # norms replicated
    assert tp8.param_bytes == pytest.approx(2 * sharded)
    assert tp8.optim_bytes == pytest.approx(12 * sharded / 4)
    assert tp8.fwd_flops == pytest.approx(one.fwd_flops / 8)
    no_do = by_name(units_for(model(), 4096, 1, tp=8, dp=4, distributed_optimizer=False))["upper.0"]
    assert no_do.optim_bytes == pytest.approx(12 * sharded)
    fp32 = by_name(units_for(model(), 4096, 1, dtype_bytes=4))["upper.0"]
    assert fp32.param_bytes == 4 * n and fp32.optim_bytes == 8 * n


def test_chain_order_and_p2p_widths():
    units = units_for(model(3, 2), 4096, 1, tp=8)
    assert [u.kind for u in units] == ["embedding"] + ["lower"] * 3 + ["adapter"] + ["upper"] * 2 + ["head"]
    widths = [u.out_width for u in units]
    assert widths == [4096] * 4 + [8192] * 3 + [0]
    u = by_name(units)
    assert u["lower.2"].p2p_bytes == 4096 * 4096 * 2 / 8  # SP: the boundary tensor is sharded
    assert u["adapter"].p2p_bytes == 4096 * 8192 * 2 / 8
    assert u["head"].p2p_bytes == 0


def test_units_for_job_uses_config():
    job = load_job_config(CFG, ["data.seq_length=2048", "train.recompute_granularity=full"])
    units = units_for_job(job, dp=2)
    assert len(units) == 32 + 8 + 3
    ref = by_name(units_for(job.model, 2048, 1, 8, 2, "full", 2, True, sequence_parallel=True))
    assert by_name(units)["upper.3"] == ref["upper.3"]
