"""The live pipeline balance report of a real PP=2 training run (2 processes, gloo, one thread
each; issue 13, deliverable 4): a deliberately bad layout is flagged, its suggestion is the
planner's layout over the measured costs, following it balances the measured pipeline, and
``logging.pipeline_balance=false`` turns the report off."""
from __future__ import annotations

import re

import pytest

from splitllama.config.job import load_job_config
from splitllama.preflight.resolve import units_for_job
from splitllama.pipeline.balance import analyze, measured_units
from splitllama.pipeline.plan import plan
from tests import apprun
from tests.launch import REPO

pytestmark = pytest.mark.distributed

# Deliberately bad: stage 0 holds the embedding and one lower layer, stage 1 everything else.
# It is bad by far more than timing noise: the measured per-stage scale factors of a PP=2 run on
# two shared vCPUs differ by up to ~1.5x (one stage slowed by the other's compute), and for any
# ratio of the two factors in 0.5..3 the plan over the measured costs is still the profile plan
# (L2,A,U1|U2). The one-unit-off layout L2,A,U2|U1 flips to "balanced" once stage 1's factor is
# 1.25x stage 0's (seen once in CI).
BAD = "L1|L1,A,U3"
RUN = ["train.train_iters=20", "logging.log_interval=10", "train.global_batch_size=16",
       "parallel.pipeline_model_parallel_size=2"]
KEYS = {"stage_busy_s", "measured_bottleneck_over_ideal", "predicted_step_s", "measured_step_s",
        "suggested_layout"}


def _run(tmp_path, name: str, layout: str, *extra: str):
    m = tmp_path / f"{name}.jsonl"
    p = apprun.run(2, [*RUN, f"parallel.pipeline_layout={layout}", f"logging.metrics_file={m}", *extra])
    return p.stdout, [r for r in apprun.metrics(m) if "loss" in r]


def test_bad_layout_is_flagged_and_following_the_suggestion_balances_it(tmp_path):
    out, recs = _run(tmp_path, "bad", BAD)
    assert [r["iteration"] for r in recs] == [10, 20]
    pb = recs[-1]["pipeline_balance"]
    assert KEYS <= set(pb) and pb["layout"] == BAD
    busy, step = pb["stage_busy_s"], pb["measured_step_s"]
    assert len(busy) == 2 and all(b > 0 for b in busy)
    assert step == recs[-1]["step_time_s"]
    # busy excludes waiting on the neighbour: the light stage is idle for much of the step
    assert min(busy) < 0.8 * step and max(busy) < step
    assert pb["measured_bottleneck_over_ideal"] == pytest.approx(max(busy) * 2 / sum(busy))
    assert pb["measured_bottleneck_over_ideal"] > 1.2, pb

    # the suggestion is the exact planner's layout over the measured costs (the run's analytic
    # unit costs scaled so each stage's prediction equals its measured busy time)
    job = load_job_config(str(REPO / "configs/tiny.yaml"), RUN[2:])
    m = 16 // 4
    units = measured_units(units_for_job(job, 1), BAD, [b / m for b in busy])
    best = plan(units, 2, "1f1b", None, m)
    assert pb["suggested_layout"] == str(best.layout) != BAD
    line = [ln for ln in out.splitlines() if ln.startswith("[pipeline balance] iter 20 ")]
    assert len(line) == 1, out[-3000:]
    assert f"layout {BAD} |" in line[0]
    assert f"UNBALANCED: try parallel.pipeline_layout={best.layout} " in line[0]
    share = re.search(r"stage busy share (\d+)% (\d+)%", line[0])
    assert share and int(share[1]) == round(100 * busy[0] / sum(busy))
    assert out.count("[pipeline balance]") == 2  # one line per log interval, from rank 0 only

    # following the suggestion: the measured pipeline is more balanced
    _, recs2 = _run(tmp_path, "suggested", best.layout)
    pb2 = recs2[-1]["pipeline_balance"]
    assert pb2["measured_bottleneck_over_ideal"] < pb["measured_bottleneck_over_ideal"], (pb, pb2)


def test_report_off(tmp_path):
    out, recs = _run(tmp_path, "off", BAD, "logging.pipeline_balance=false", "train.train_iters=10")
    assert recs and all("pipeline_balance" not in r for r in recs)
    assert "[pipeline balance]" not in out


def _inject_unit_times(prof_path: str, job) -> None:
    """Replace the measured per-kind unit times by the analytic model's (same total per chain)
    and the measured host contention by 1 (the stages do not slow each other)."""
    import json
    from dataclasses import replace

    from splitllama.pipeline.measured import Profile, UnitTiming, units_from_profile, write_profile

    with open(prof_path) as f:
        prof = Profile.from_dict(json.load(f))
    analytic = {u.kind: u for u in units_for_job(job, 1)}
    measured_total = sum(u.fwd_time + u.bwd_time for u in units_from_profile(prof, job.model))
    analytic_total = sum(u.fwd_time + u.bwd_time for u in units_for_job(job, 1))
    scale = measured_total / analytic_total
    units = {k: UnitTiming(analytic[k].fwd_time * scale, analytic[k].bwd_time * scale)
             for k in prof.units}
    # host contention too: measured 2.58 on a loaded box, it made one stage holding everything
    # the profile plan ('L1|L1,A,U3' != 'L1|L1,A,U3' failed again with injected unit times alone)
    costs = replace(prof.costs, host_contention=1.0, contention_source="injected")
    write_profile(replace(prof, units=units, costs=costs, meta={**prof.meta, "injected": "analytic ratios"}),
                  prof_path)


def test_bad_layout_suggests_the_profile_plan(tmp_path):
    """With a profile of this machine (one thread, as each training process has; unit times
    injected, see `_inject_unit_times`) and a deliberately bad explicit layout, the live report's
    suggestion is the profile planner's (`parallel.pipeline_split=profile`): the run's units are
    the profile's, rescaled per stage by what each stage measured, planned with the profile's
    per-stage costs."""
    import os
    import subprocess
    import sys

    from splitllama.pipeline.measured import job_key, load_profile, stage_overhead, units_from_profile

    prof_path = str(tmp_path / "tiny_profile.json")
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    over = [o for o in RUN if o.startswith(("train.global", "parallel."))]
    tool = [sys.executable, str(REPO / "tools" / "plan_pipeline.py"), "--config", str(REPO / "configs/tiny.yaml"),
            *over, "--profile", "--profile-out", prof_path]
    r = subprocess.run(tool, capture_output=True, text=True, env=env, cwd=REPO, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    job = load_job_config(str(REPO / "configs/tiny.yaml"), over)
    # Deterministic: the profile's key and step costs are this machine's, its unit times are
    # injected (the analytic cost ratios, scaled to the measured chain total), so the profile plan
    # does not depend on how loaded the box was while profiling (under load the measured times
    # once made the bad layout the profile plan: 'L1|L1,A,U3' != 'L1|L1,A,U3' failed).
    _inject_unit_times(prof_path, job)
    prof = load_profile(prof_path, job_key(job))
    m = 16 // 4
    units, overhead = units_from_profile(prof, job.model), stage_overhead(prof)
    best = plan(units, 2, "1f1b", None, m, stage_overhead=overhead)
    assert str(best.layout) != BAD
    out, recs = _run(tmp_path, "bad_profiled", BAD, "parallel.pipeline_split=profile",
                     f"parallel.profile_file={prof_path}")
    pb = recs[-1]["pipeline_balance"]
    # the suggestion is the profile planner's over the profile's units rescaled per stage by
    # what each stage measured (recomputed here from the record's busy times: deterministic)
    expected = analyze(units, BAD, pb["stage_busy_s"], m, stage_overhead=overhead).suggested_layout
    assert pb["layout"] == BAD and expected is not None and pb["suggested_layout"] == expected != BAD, pb
    # the prediction is the profile's (its unit costs + per-stage overhead), not the analytic
    # H100's: compared with the planner's evaluation, not with the live time (a loaded box once
    # made the live step 7x shorter than the profile taken a minute before predicted)
    from splitllama.pipeline.plan import evaluate

    assert pb["predicted_step_s"] == pytest.approx(
        evaluate(BAD, units, 2, None, m, stage_overhead=overhead).step_time_s, rel=1e-6), pb
    assert f"UNBALANCED: try parallel.pipeline_layout={expected} " in out
