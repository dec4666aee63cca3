"""Measured pipeline costs: profile file + key checks (pipeline/measured.py), the planner over
measured units with per-stage overheads (pipeline/plan.py), calibration, and a real profile."""
from __future__ import annotations

import itertools
import json
import math
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from splitllama.config.job import load_job_config
from splitllama.errors import UsageError
from splitllama.pipeline.cost import Hardware, units_for
from splitllama.pipeline.layout import PipelineLayout
from splitllama.pipeline.measured import (Profile, StepCosts, UnitTiming, calibrate, fit_hardware, job_key,
                                          load_profile, stage_overhead, units_from_profile, write_profile)
from splitllama.preflight import profile_source
from splitllama.preflight.resolve import split_costs, stage_plan, units_for_job
from splitllama.pipeline.plan import StageOverhead, evaluate, one_f_one_b_makespan, plan, uniform

ROOT = Path(__file__).resolve().parents[2]
TINY = str(ROOT / "configs" / "tiny.yaml")
TIMES = {"embedding": (0.001, 0.002), "lower": (0.010, 0.020), "adapter": (0.002, 0.003),
         "upper": (0.030, 0.060), "head": (0.040, 0.050)}
COSTS = StepCosts(optimizer_s_per_param=2e-8, grad_finalize_s_per_param=1e-8, fixed_s=1e-3,
                  p2p_latency_s=1e-4, p2p_s_per_byte=1e-9)


def _job(*overrides):
    return load_job_config(TINY, ["parallel.pipeline_model_parallel_size=2", *overrides])


def _profile(job, times=TIMES, **key) -> Profile:
    from splitllama.preflight.profile_source import environment_key

    k = {**job_key(job), **environment_key(job), **key}
    return Profile(k, {kind: UnitTiming(f, b) for kind, (f, b) in times.items()}, COSTS, {"synthetic": True})


@pytest.fixture
def no_profiling(monkeypatch):
    """Fail the test if anything tries to take a profile."""
    from splitllama.planning import profile as prof_mod

    def boom(*a, **k):
        raise AssertionError("re-profiled although a profile exists")
    monkeypatch.setattr(prof_mod, "take_profile", boom)
    monkeypatch.setattr(profile_source, "take_profile_for_job", boom)


def test_profile_reused_not_retaken(tmp_path, no_profiling):
    path = str(tmp_path / "p.json")
    write_profile(_profile(_job()), path)
    job = _job("parallel.pipeline_split=profile", f"parallel.profile_file={path}", "parallel.profile_if_missing=true")
    units, over = split_costs(job, 1)
    by_kind = {u.kind: u for u in units}
    for kind, (f, b) in TIMES.items():
        assert (by_kind[kind].fwd_time, by_kind[kind].bwd_time) == (f, b)
    assert over.optimizer_s_per_param == COSTS.optimizer_s_per_param
    p = stage_plan(job, dp=1)
    assert p.overhead is not None and p.method == "planned"


def test_missing_profile_taken_only_when_asked(tmp_path):
    path = str(tmp_path / "new.json")
    job = _job("parallel.pipeline_split=profile", f"parallel.profile_file={path}")
    with pytest.raises(UsageError, match="no such file.*--profile"):
        split_costs(job, 1)
    calls = []

    def fake_take(j, p):
        calls.append(p)
        write_profile(_profile(j), p)
    job = _job("parallel.pipeline_split=profile", f"parallel.profile_file={path}", "parallel.profile_if_missing=true")
    prof = profile_source.job_profile(job, take=fake_take)
    assert calls == [path] and prof.units["upper"].fwd_s == TIMES["upper"][0]
    profile_source.job_profile(job, take=fake_take)  # the file now exists: not taken again
    assert calls == [path]


@pytest.mark.parametrize("override, key", [("data.seq_length=32", "seq_length"),
                                           ("train.bf16=true", "dtype"),
                                           ("train.micro_batch_size=2", "micro_batch_size")])
def test_mismatch_refused_naming_key(tmp_path, override, key, no_profiling):
    path = str(tmp_path / "p.json")
    write_profile(_profile(_job()), path)
    job = _job("parallel.pipeline_split=profile", f"parallel.profile_file={path}", override)
    with pytest.raises(UsageError, match=f"key '{key}' is") as e:
        split_costs(job, 1)
    assert "\n" not in str(e.value)


def test_mismatch_nested_model_key(tmp_path):
    path = str(tmp_path / "p.json")
    write_profile(_profile(_job()), path)
    job = _job("model.mlp=true")
    with pytest.raises(UsageError, match="key 'model.mlp' is false in the profile but true here"):
        load_profile(path, job_key(job))


def test_profile_serves_any_depth(tmp_path):
    """N / M are not in the key: one profile plans every depth of the same widths."""
    path = str(tmp_path / "p.json")
    write_profile(_profile(_job()), path)
    deeper = _job("model.num_layers_lower=5")
    prof = load_profile(path, job_key(deeper))
    assert sum(u.kind == "lower" for u in units_from_profile(prof, deeper.model)) == 5


def test_not_a_profile(tmp_path):
    bad = tmp_path / "x.json"
    bad.write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(UsageError, match="not a SplitLlama unit profile"):
        load_profile(str(bad), {})


def test_cli_mismatch_is_one_error_line(tmp_path):
    path = str(tmp_path / "p.json")
    write_profile(_profile(_job()), path)
    r = subprocess.run([sys.executable, str(ROOT / "tools" / "plan_pipeline.py"), "--config", TINY, "--pp", "2",
                        f"parallel.profile_file={path}", "data.seq_length=32"],
                       capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert r.returncode == 2, r.stderr
    err = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(err) == 1 and err[0].startswith("error:") and "'seq_length'" in err[0], r.stderr


def test_config_needs_profile_file():
    with pytest.raises(ValueError, match="profile_file"):
        _job("parallel.pipeline_split=profile").parallel.validate(2)


# ---- planner over measured units -----------------------------------------------------------------
def test_makespan_balanced_equals_classic_formula():
    for pp, m in ((2, 4), (4, 8), (3, 2)):
        span, _ = one_f_one_b_makespan([1.0] * pp, [2.0] * pp, [0.0] * pp, m)
        assert span == pytest.approx((m + pp - 1) * 3.0)


def test_makespan_hand_computed():
    # pp=2, m=2, p2p 0.5 each way: stage0 F0 [0,1] F1 [1,2]; stage1 F0 [1.5,4.5] B0 [4.5,10.5];
    # stage0 B0 [11,13]; stage1 F1 [13.5? no: max(10.5, 2.5)=10.5... B0 then F1] -> see order:
    # stage1 runs F0 B0 F1 B1: F1 [10.5,13.5], B1 [13.5,19.5]; stage0 B1 [20,22]
    span, ends = one_f_one_b_makespan([1.0, 3.0], [2.0, 6.0], [0.5, 0.0], 2)
    assert ends[1] == pytest.approx(19.5) and span == pytest.approx(22.0)


def test_plan_over_profile_minimises_predicted_step():
    job = _job("model.num_layers_lower=4", "model.num_layers_upper=3")
    prof = _profile(job)
    units, over = units_from_profile(prof, job.model), stage_overhead(prof)
    for pp in (2, 3):
        best = plan(units, pp, "1f1b", None, 4, stage_overhead=over)
        n = 4 + 1 + 3
        brute = min(evaluate(PipelineLayout.from_counts(
            [b - a for a, b in zip((0,) + c, c + (n,))], 4, 3), units, pp, None, 4,
            stage_overhead=over).step_time_s for c in itertools.combinations(range(1, n), pp - 1))
        assert best.step_time_s == pytest.approx(brute)
        # the prediction includes the per-stage costs and the p2p: more than the bare makespan
        bare = evaluate(best.layout, units, pp, None, 4, stage_overhead=StageOverhead()).step_time_s
        assert best.step_time_s > bare + max(s.overhead_s for s in best.stages) - 1e-12
        assert best.step_time_s <= uniform(units, pp, None, 4, stage_overhead=over).step_time_s + 1e-12


def test_stage_overhead_counts_local_params():
    job = _job()
    prof = _profile(job)
    units = units_from_profile(prof, job.model)
    over = stage_overhead(prof)
    p = evaluate("L2,A|U3", units, 2, None, 4, stage_overhead=over)
    for s, group in zip(p.stages, ([units[0], units[1], units[2], units[3]], units[4:])):
        local = sum(u.param_bytes for u in group) / 4  # fp32 on CPU
        want = COSTS.fixed_s + local * (COSTS.optimizer_s_per_param + COSTS.grad_finalize_s_per_param)
        assert s.overhead_s == pytest.approx(want)
    assert p.stages[0].p2p_s == pytest.approx(COSTS.p2p_latency_s + units[3].p2p_bytes * COSTS.p2p_s_per_byte)
    # without an overhead the old prediction is unchanged
    assert evaluate("L2,A|U3", units, 2, None, 4).step_time_s == pytest.approx(5 * p.bottleneck_time)


# ---- calibration ---------------------------------------------------------------------------------
def test_calibration_recovers_hardware():
    job = load_job_config(TINY, ["data.seq_length=64"])
    true = Hardware(peak_flops=200e12, flops_efficiency=0.4, mem_bandwidth=2e12, bandwidth_efficiency=0.6)
    units = units_for(job.model, 64, 4, 1, 1, None, 4, hardware=true)
    times = {u.kind: (u.fwd_time, u.bwd_time) for u in units}
    prof = _profile(job, times, dtype="fp32")
    hw = calibrate(prof, job.model)
    assert hw.peak_flops * hw.flops_efficiency == pytest.approx(80e12, rel=1e-6)
    assert hw.mem_bandwidth * hw.bandwidth_efficiency == pytest.approx(1.2e12, rel=1e-6)
    refit = {u.kind: (u.fwd_time, u.bwd_time) for u in units_for(job.model, 64, 4, 1, 1, None, 4, hardware=hw)}
    for k in times:
        assert refit[k] == pytest.approx(times[k], rel=1e-6)


def test_fit_drops_unsupported_bandwidth_term():
    hw = fit_hardware([(1e9, 0.0, 1e-3), (2e9, 0.0, 2e-3), (1e9, 1e6, 1e-3)])
    assert hw.peak_flops == pytest.approx(1e12, rel=1e-6) and math.isinf(hw.mem_bandwidth)


def test_cost_split_uses_calibrated_hardware(tmp_path):
    path = str(tmp_path / "p.json")
    job = _job()
    write_profile(_profile(job), path)
    cal = _job(f"parallel.profile_file={path}")
    units, over = split_costs(cal, 1)
    assert over is None
    hw = calibrate(load_profile(path, job_key(cal)), cal.model)
    assert [u.time for u in units] == [u.time for u in units_for_job(cal, 1, hw)]
    assert [u.time for u in split_costs(job, 1)[0]] == [u.time for u in units_for_job(job, 1)]  # H100


# ---- a real profile of the tiny model (one process, CPU) -----------------------------------------
@pytest.mark.slow
def test_real_profile_tiny_then_reused(tmp_path):
    out = str(tmp_path / "tiny_profile.json")
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    tool = [sys.executable, str(ROOT / "tools" / "plan_pipeline.py"), "--config", TINY, "--pp", "2"]
    r = subprocess.run(tool + ["--profile", "--profile-out", out], capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    d = json.load(open(out))
    assert d["key"]["seq_length"] == 64 and d["key"]["dtype"] == "fp32" and d["key"]["threads"] == 1
    for kind in ("embedding", "lower", "adapter", "upper", "head"):
        assert d["units"][kind]["fwd_s"] > 0 and d["units"][kind]["bwd_s"] > 0
        assert d["units"][kind]["peak_memory_bytes"] is None  # CPU: not measured
    c = d["costs"]
    assert c["optimizer_s_per_param"] > 0 and c["p2p_latency_s"] > 0 and "measured" in c["p2p_source"]
    # host contention of the two stage processes, measured (this box: 0.9-1.1, see benchmarks/README.md)
    assert c["contention_procs"] == 2 and "measured" in c["contention_source"], c
    assert 0.7 < c["host_contention"] < 1.6, c
    mtime = os.path.getmtime(out)
    r2 = subprocess.run(tool + [f"parallel.profile_file={out}"], capture_output=True, text=True, env=env)
    assert r2.returncode == 0, r2.stderr[-3000:]
    assert "profile" in r2.stdout and os.path.getmtime(out) == mtime  # read, not re-taken


@pytest.mark.slow
def test_profile_measures_contention_of_an_oversubscribed_host(tmp_path):
    """pp = cores + 2 stage processes on this host: each gets about cores / pp of a core while
    all compute, so the measured host contention must be well above 1 (it is ~2 at 4 on 2)."""
    cores = os.cpu_count() or 1
    pp = cores + 2
    out = str(tmp_path / "oversubscribed.json")
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "splitllama.planning.profile_cli", "--config", TINY,
                        "--profile-out", out, "--reps", "6", f"parallel.pipeline_model_parallel_size={pp}"],
                       capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    c = json.load(open(out))["costs"]
    assert c["contention_procs"] == pp and c["host_contention"] > 1.0 + 0.5 * (pp / cores - 1), c
    # and the planner's prediction pays for it: the same plan is slower with the measured contention
    job = load_job_config(TINY, ["parallel.pipeline_model_parallel_size=2"])
    prof = load_profile(out, job_key(job))
    units, over = units_from_profile(prof, job.model), stage_overhead(prof)
    bare = evaluate("L2,A,U1|U2", units, 2, None, 8, stage_overhead=replace(over, host_contention=1.0))
    assert evaluate("L2,A,U1|U2", units, 2, None, 8, stage_overhead=over).step_time_s > bare.step_time_s
