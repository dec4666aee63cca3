"""Pipeline planner (splitllama/pipeline/plan.py): exactness vs brute force, memory, the 8B+70B
worked example, the CLI's JSON, and the explicit-layout path."""
from __future__ import annotations

import itertools
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

from splitllama.config.job import load_job_config
from splitllama.config.model import ModelConfig
from splitllama.pipeline.cost import Unit, units_for
from splitllama.pipeline.layout import PipelineLayout
from splitllama.preflight.resolve import check_parallel, stage_plan
from splitllama.pipeline.plan import GiB, evaluate, params_balanced, plan, uniform

ROOT = Path(__file__).resolve().parents[2]
CFG = str(ROOT / "configs" / "llama3_8b_70b.yaml")


def random_chain(rng: random.Random, n_lower: int, n_upper: int, integer: bool = False) -> list[Unit]:
    def u(name: str, kind: str) -> Unit:
        t = rng.randint(0, 5) if integer else rng.uniform(0.0, 10.0)
        return Unit(name, kind, param_count=rng.randint(0, 1000), param_bytes=rng.uniform(0, 10),
                    grad_bytes=rng.uniform(0, 10), optim_bytes=rng.uniform(0, 10),
                    act_bytes_per_mb=rng.uniform(0, 5), act_working_bytes=rng.uniform(0, 3) * rng.randint(0, 1),
                    fwd_time=t / 3, bwd_time=2 * t / 3)
    return ([u("embedding", "embedding")] + [u(f"lower.{i}", "lower") for i in range(n_lower)]
            + [u("adapter", "adapter")] + [u(f"upper.{i}", "upper") for i in range(n_upper)] + [u("head", "head")])


def compositions(n: int, k: int):
    for cuts in itertools.combinations(range(1, n), k - 1):
        b = (0,) + cuts + (n,)
        yield [b[i + 1] - b[i] for i in range(k)]


def chain_splits(n_lo, n_up, pp, end_stages=True):
    """Every whole-chain split (embedding and head counted) into pp non-empty stages; without
    end_stages none holds the embedding or the head alone."""
    n = n_lo + n_up + 3
    for sizes in compositions(n, pp):
        if not end_stages and pp > 1 and (sizes[0] == 1 or sizes[-1] == 1):
            continue
        yield PipelineLayout.from_chain_counts(sizes, n_lo, n_up)


def brute_force(units, pp, budget=None, m=None, end_stages=True):
    n_lo = sum(u.kind == "lower" for u in units)
    n_up = sum(u.kind == "upper" for u in units)
    best = None
    for layout in chain_splits(n_lo, n_up, pp, end_stages):
        p = evaluate(layout, units, pp, budget, m)
        if p.fits and (best is None or p.bottleneck_time < best.bottleneck_time):
            best = p
    return best


def sum_sq(p) -> float:
    return sum(s.time_s ** 2 for s in p.stages)


@pytest.mark.parametrize("seed", range(400))
def test_planner_equals_brute_force(seed):
    rng = random.Random(seed)
    n_lower, n_upper = rng.randint(0, 4), rng.randint(0, 3)
    n_upper = min(n_upper, 6 - n_lower)  # n = N + 1 + M + embedding + head <= 9 units
    n_core = n_lower + 1 + n_upper
    pp = rng.randint(1, min(5, n_core))
    units = random_chain(rng, n_lower, n_upper, integer=seed % 3 == 0)  # integers force ties
    m = rng.choice([None, 1, 2, 8])
    ends = seed % 4 != 3  # head / embedding stages allowed (the default) or not
    budget = None
    if seed % 2:  # a budget that some (maybe no) plans meet
        mems = [s.memory_total for layout in chain_splits(n_lower, n_upper, pp, ends)
                for s in evaluate(layout, units, pp, None, m).stages]
        budget = rng.choice(sorted(mems))
    ref = brute_force(units, pp, budget, m, ends)
    if ref is None:
        with pytest.raises(ValueError, match="no .*pipeline plan fits the memory budget"):
            plan(units, pp, memory_budget=budget, num_microbatches=m, end_stages=ends)
        return
    got = plan(units, pp, memory_budget=budget, num_microbatches=m, end_stages=ends)
    assert got.bottleneck_time == pytest.approx(ref.bottleneck_time, rel=1e-12, abs=1e-12)
    assert got.fits and got.layout.pp == pp
    got.layout.validate(n_lower, n_upper, pp)  # no empty stage, adapter in one place
    assert PipelineLayout.parse(str(got.layout)) == got.layout  # E / H stages print and parse back
    if not ends:
        assert all(s.lower_layers or s.adapter or s.upper_layers for s in got.layout.stages)
    # tie-break: the smallest sum of squared stage times among the optimal plans
    optimal = [evaluate(layout, units, pp, budget, m) for layout in chain_splits(n_lower, n_upper, pp, ends)]
    optimal = [p for p in optimal if p.fits and p.bottleneck_time <= ref.bottleneck_time * (1 + 1e-9) + 1e-12]
    assert sum_sq(got) == pytest.approx(min(sum_sq(p) for p in optimal), rel=1e-9, abs=1e-12)
    assert plan(units, pp, memory_budget=budget, num_microbatches=m, end_stages=ends).layout == got.layout


def chain_from_times(lower, adapter, upper, emb=0.0, head=0.0) -> list[Unit]:
    mk = lambda name, kind, t: Unit(name, kind, fwd_time=t / 3, bwd_time=2 * t / 3)  # noqa: E731
    return ([mk("embedding", "embedding", emb)] + [mk(f"lower.{i}", "lower", t) for i, t in enumerate(lower)]
            + [mk("adapter", "adapter", adapter)] + [mk(f"upper.{i}", "upper", t) for i, t in enumerate(upper)]
            + [mk("head", "head", head)])


def test_min_max_not_min_sum_of_squares():
    # the split with the least sum of squares (8|4|5|10) has a worse bottleneck than 8|9|9|1
    p = plan(chain_from_times([3, 5, 4], 5, [9, 1]), 4)
    assert p.bottleneck_time == pytest.approx(9) and str(p.layout) == "L2|L1,A|U1|U1"


def test_stage_memory_accounting():
    units = [Unit("embedding", "embedding", param_bytes=1, grad_bytes=2, optim_bytes=3, act_bytes_per_mb=1),
             Unit("lower.0", "lower", param_bytes=10, act_bytes_per_mb=5, act_working_bytes=7),
             Unit("adapter", "adapter", act_bytes_per_mb=2, act_working_bytes=1),
             Unit("head", "head", optim_bytes=100, act_bytes_per_mb=50)]
    p = evaluate("L1|A", units, 2, memory_budget=60, num_microbatches=8)
    s0, s1 = p.stages
    assert s0.memory == {"params": 11, "grads": 2, "optimizer": 3, "activations": 2 * 6 + 7}
    assert s1.memory == {"params": 0, "grads": 0, "optimizer": 100, "activations": 1 * 52 + 1}
    assert s0.fits and not s1.fits and (s0.in_flight, s1.in_flight) == (2, 1)
    assert evaluate("L1|A", units, 2, num_microbatches=1).stages[0].in_flight == 1  # min(pp - i, m)


@pytest.mark.parametrize("seed", range(60))
def test_params_balanced_minimises_max_stage_params(seed):
    rng = random.Random(1000 + seed)
    n_lower, n_upper = rng.randint(0, 4), rng.randint(0, 2)
    units = random_chain(rng, n_lower, n_upper)
    pp = rng.randint(1, n_lower + 1 + n_upper)
    got = params_balanced(units, pp)
    best = min(max(s.params for s in evaluate(PipelineLayout.from_counts(sz, n_lower, n_upper), units).stages)
               for sz in compositions(n_lower + 1 + n_upper, pp))
    assert max(s.params for s in got.stages) == best


def test_pp_larger_than_units_raises():
    units = random_chain(random.Random(0), 2, 1)  # 4 core units
    for bad in (5, 0):
        with pytest.raises(ValueError, match="non-empty pipeline stages"):
            plan(units, bad)
    assert plan(units, 4).layout.pp == 4


def test_memory_infeasible_names_smallest_need():
    units = units_for(big_model(), 4096, 1, tp=1, dp=1)
    with pytest.raises(ValueError) as e:
        plan(units, 4, memory_budget=40 * GiB, num_microbatches=64)
    msg = str(e.value)
    assert "GiB on its largest stage" in msg and "budget of 40.00 GiB" in msg


def test_evaluate_reports_over_budget_instead_of_raising():
    units = units_for(big_model(), 4096, 1, tp=1, dp=1)
    p = uniform(units, 4, memory_budget=40 * GiB, num_microbatches=64)
    assert not p.fits and not p.stages[-1].fits
    assert p.stages[0].in_flight == 4 and p.stages[-1].in_flight == 1


def big_model() -> ModelConfig:
    return ModelConfig(lower="llama3_8b", upper="llama3_70b", num_layers_lower=32, num_layers_upper=8)


def test_worked_example_8b_70b_pp4():
    units = units_for(big_model(), 4096, 1, tp=8, dp=1, recompute="selective")
    planned, uni, par = plan(units, 4), uniform(units, 4), params_balanced(units, 4)
    assert str(uni.layout) == "L10|L10|L10|L2,A,U8"
    assert 2.0 < uni.bottleneck_over_ideal < 2.4  # docs/design.md §5: ~2.2x
    assert planned.bottleneck_over_ideal < 1.15  # docs/design.md §5: ~1.1x
    assert uni.bottleneck_time >= 1.8 * planned.bottleneck_time
    assert planned.bottleneck_time <= par.bottleneck_time
    assert planned.stages[0].units.startswith("E,") and planned.stages[-1].units.endswith(",H")


def test_bubble_and_step_time():
    units = units_for(big_model(), 4096, 1, tp=8)
    p = plan(units, 4, num_microbatches=8)
    assert p.bubble_fraction == pytest.approx(3 / 11)
    assert p.step_time_s == pytest.approx(11 * p.bottleneck_time)
    assert plan(units, 4).bubble_fraction is None


def test_cli_json():
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, str(ROOT / "tools" / "plan_pipeline.py"), "--config", CFG,
                          "--pp", "4", "--seq-length", "4096", "--micro-batch-size", "1", "--tp", "8",
                          "--dp", "1", "--memory-gb", "80", "--json", "train.global_batch_size=64"],
                         capture_output=True, text=True, env=env, cwd=ROOT, check=True)
    d = json.loads(out.stdout)
    planned, uni = d["planned"], d["uniform"]
    assert uni["bottleneck_over_ideal"] >= 1.8 * planned["bottleneck_over_ideal"]
    assert d["params_balanced"]["bottleneck_over_ideal"] >= planned["bottleneck_over_ideal"]
    assert len(planned["stages"]) == 4 and planned["fits"]
    PipelineLayout.parse(planned["layout"]).validate(32, 8, 4)
    assert d["setup"]["num_microbatches"] == 64


@pytest.mark.parametrize("bad, match", [
    ("L10|L10|L10|L2,A,U7", "upper layers"),
    ("L10|L10|L12,A,U8", "3 stages"),
    ("L10|L10|L12|A,U8", None),  # valid: a stage may start with the adapter
    ("L10||L12,A|U8", "empty"),
    ("L10,A|L10|L12|U8", "before the"),
    ("L10|L10|U1,L12|A,U7", "order inside a stage"),
    ("L10|X3|L12,A|U8", "is not"),
])
def test_explicit_layout_validation(bad, match):
    units = units_for(big_model(), 4096, 1, tp=8)
    if match is None:
        assert evaluate(bad, units, 4).layout.pp == 4
        return
    with pytest.raises(ValueError, match=match):
        evaluate(bad, units, 4)


def test_plan_for_job_paths():
    job = load_job_config(CFG)
    assert str(stage_plan(job, check_parallel(job, 32)[2]).layout) == str(plan(
        units_for(job.model, 4096, 1, 8, 1, "selective"), 4).layout)
    job = load_job_config(CFG, ["parallel.pipeline_split=uniform"])
    assert str(stage_plan(job, dp=1).layout) == "L10|L10|L10|L2,A,U8"
    job = load_job_config(CFG, ["parallel.pipeline_split=params"])
    assert stage_plan(job, dp=1).method == "params_balanced"
    job = load_job_config(CFG, ["parallel.pipeline_layout=L16|L16,A|U4|U4"])
    assert str(stage_plan(job, dp=1).layout) == "L16|L16,A|U4|U4"
    job = load_job_config(CFG, ["parallel.pipeline_layout=L16|L16,A|U8"])
    with pytest.raises(ValueError, match="pipeline_model_parallel_size is 4"):
        stage_plan(job, dp=1)
    job = load_job_config(CFG, ["parallel.tensor_model_parallel_size=1", "parallel.sequence_parallel=false",
                                "parallel.pipeline_split=uniform", "parallel.memory_budget_gb=40"])
    with pytest.warns(UserWarning, match="over the budget"):
        stage_plan(job, dp=1)
    with pytest.raises(ValueError, match="not divisible"):
        check_parallel(load_job_config(CFG), 30)
