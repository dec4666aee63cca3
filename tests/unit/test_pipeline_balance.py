"""Live pipeline balance analysis (splitllama/pipeline/balance.py) and the stage compute timers
(splitllama/training/stage_timers.py), without torch.distributed.

Synthetic stage times are made from "true" unit costs (the analytic units distorted, standing in
for a device the analytic model does not know): each stage's busy time per step is
num_microbatches x the sum of its true unit times."""
from __future__ import annotations

import time
from dataclasses import replace

import pytest
import torch

from splitllama.config.model import ModelConfig
from splitllama.pipeline.balance import SUGGEST_THRESHOLD, analyze, measured_units, stage_of_units
from splitllama.pipeline.cost import Unit, units_for
from splitllama.pipeline.layout import PipelineLayout
from splitllama.pipeline.plan import GiB, evaluate, plan
from splitllama.training.stage_timers import StageTimers

M = 8  # micro-batches per step


def analytic(n_lower: int = 8, n_upper: int = 4):
    cfg = ModelConfig(lower="llama3_8b", upper="llama3_70b", num_layers_lower=n_lower, num_layers_upper=n_upper)
    return units_for(cfg, 4096, 1, 8, 1, None, 2, True)


def true_costs(units, factor: dict):
    """The units with their times multiplied per kind (``factor[kind]``, default 1)."""
    return [replace(u, fwd_time=u.fwd_time * factor.get(u.kind, 1.0),
                    bwd_time=u.bwd_time * factor.get(u.kind, 1.0)) for u in units]


def busy(true_units, layout) -> list[float]:
    """Per stage, seconds of compute per step the true costs give this layout."""
    return [M * s.time_s for s in evaluate(layout, true_units, num_microbatches=M).stages]


def test_bad_layout_is_flagged_and_the_suggestion_is_the_plan_over_the_true_costs():
    units = analytic()
    true = true_costs(units, {"lower": 3e3, "adapter": 3e3, "upper": 3e3, "head": 3e3, "embedding": 3e3})
    bad = "L8,A,U3|U1"  # nearly everything on stage 0
    r = analyze(units, bad, busy(true, bad), M, predicted_step_s=1.0, measured_step_s=2.0)
    best = plan(true, 2, "1f1b", None, M)
    assert r.suggested_layout == str(best.layout) != bad
    assert r.measured_bottleneck_over_ideal > 1.3
    current = evaluate(bad, true, 2, None, M)
    assert r.suggested_speedup == pytest.approx(current.step_time_s / best.step_time_s, rel=1e-9)
    assert r.suggested_speedup >= SUGGEST_THRESHOLD
    line = r.line(40)
    assert line.startswith("[pipeline balance] iter 40 | layout L8,A,U3|U1 |")
    assert f"UNBALANCED: try parallel.pipeline_layout={best.layout} " in line
    assert "step predicted 1 s, measured 2 s" in line
    d = r.to_dict()
    assert d["stage_busy_s"] == pytest.approx(busy(true, bad))
    assert d["suggested_layout"] == str(best.layout)
    assert {"stage_busy_s", "measured_bottleneck_over_ideal", "predicted_step_s", "measured_step_s",
            "suggested_layout"} <= set(d)


@pytest.mark.parametrize("pp, bad", [(2, "L1|L7,A,U4"), (4, "L1|L1|L1|L5,A,U4"), (4, "L6|L1|L1|A,U4")])
def test_stage_uniform_errors_are_recovered_exactly(pp, bad):
    """The model's error is the same for every unit of a stage (here: the whole device is 500x
    slower than the analytic H100): the suggestion is the true plan, at PP=2 and PP=4."""
    units = analytic()
    true = true_costs(units, {k: 500.0 for k in ("embedding", "lower", "adapter", "upper", "head")})
    r = analyze(units, bad, busy(true, bad), M)
    assert r.suggested_layout == str(plan(true, pp, "1f1b", None, M).layout)


def test_kind_dependent_errors_converge_when_the_suggestion_is_followed():
    """Errors that differ inside a stage (narrow lower layers run relatively slower, the head
    faster than the analytic model says) are corrected to first order: following the suggestions,
    each run re-measured, reaches the true plan within three runs."""
    units = analytic()
    true = true_costs(units, {"lower": 2.0, "adapter": 1.0, "upper": 1.0, "head": 0.3, "embedding": 1.0})
    target = str(plan(true, 4, "1f1b", None, M).layout)
    assert str(plan(units, 4, "1f1b", None, M).layout) != target  # the analytic plan is wrong here
    layout, seen = "L5|L3|A,U1|U3", []
    for _ in range(3):
        r = analyze(units, layout, busy(true, layout), M)
        seen.append((layout, r.suggested_layout))
        if r.suggested_layout is None:
            break
        layout = r.suggested_layout
    true_step = evaluate(layout, true, 4, None, M).step_time_s
    best_step = plan(true, 4, "1f1b", None, M).step_time_s
    assert layout == target or true_step <= best_step * SUGGEST_THRESHOLD, seen


def test_balanced_layout_has_no_suggestion():
    units = analytic()
    true = true_costs(units, {"lower": 700.0, "upper": 700.0, "adapter": 700.0, "head": 700.0, "embedding": 700.0})
    good = str(plan(true, 2, "1f1b", None, M).layout)
    r = analyze(units, good, busy(true, good), M)
    assert r.suggested_layout is None and r.suggested_speedup == pytest.approx(1.0)
    assert r.measured_bottleneck_over_ideal == pytest.approx(plan(true, 2, "1f1b", None, M).bottleneck_over_ideal)
    assert "balanced (no layout predicted >= 5% faster)" in r.line(1)


def test_a_small_gain_is_not_suggested():
    """A layout only a little (< 5 %) faster at the measured costs is not worth a restart."""
    def u(name, kind, t):
        return Unit(name, kind, fwd_time=t / 3, bwd_time=2 * t / 3)
    chain = ([u("embedding", "embedding", 0.01)] + [u(f"lower.{i}", "lower", 1.0) for i in range(4)]
             + [u("adapter", "adapter", 0.02)] + [u(f"upper.{i}", "upper", 1.0) for i in range(4)]
             + [u("head", "head", 0.3)])
    assert str(plan(chain, 2, "1f1b", None, M).layout) == "L4,A|U4"  # 4.03 | 4.30
    r = analyze(chain, "L4|A,U4", busy(chain, "L4|A,U4"), M)  # 4.01 | 4.32: 0.5 % slower
    assert r.suggested_layout is None and r.suggested_speedup == pytest.approx(4.32 / 4.30)
    worse = analyze(chain, "L4,A,U1|U3", busy(chain, "L4,A,U1|U3"), M)  # 5.03 | 3.30
    assert worse.suggested_layout == "L4,A|U4" and worse.suggested_speedup == pytest.approx(5.03 / 4.30)


def test_the_suggestion_fits_the_memory_budget():
    units = analytic()
    true = true_costs(units, {})
    bad = "L8,A,U3|U1"
    free = analyze(units, bad, busy(true, bad), M).suggested_layout
    budget = max(s.memory_total for s in evaluate(free, units, 2, None, M).stages) * 0.97
    r = analyze(units, bad, busy(true, bad), M, memory_budget=budget)
    want = plan(true, 2, "1f1b", budget, M)
    assert r.suggested_layout == str(want.layout) != free
    none_fits = analyze(units, bad, busy(true, bad), M, memory_budget=1 * GiB)
    assert none_fits.suggested_layout is None and none_fits.suggested_speedup is None


def test_measured_units_match_each_stage_and_keep_memory():
    units = analytic()
    layout = PipelineLayout.parse("L3|L5,A,U4")
    scaled = measured_units(units, layout, [0.25, 0.75])
    stages = evaluate(layout, scaled, 2).stages
    assert [s.time_s for s in stages] == pytest.approx([0.25, 0.75])
    assert [s.memory_total for s in stages] == [s.memory_total for s in evaluate(layout, units, 2).stages]
    assert stage_of_units(layout, len(units)) == [0] * 4 + [1] * 11


def test_bad_inputs_are_refused_or_reported():
    units = analytic()
    with pytest.raises(ValueError, match="3 stage times for a 2-stage layout"):
        measured_units(units, "L3|L5,A,U4", [1.0, 1.0, 1.0])
    with pytest.raises(ValueError, match="holds 12 units"):
        stage_of_units("L3|L2,A,U4", len(units))
    r = analyze(units, "L3|L5,A,U4", [0.0, 0.0], M)
    assert r.measured_bottleneck_over_ideal is None and r.suggested_layout is None
    assert "no compute measured" in r.line(1)


# ---- the timers Megatron-Core's schedules call --------------------------------------------------
def test_stage_timers_count_training_compute_only():
    t = StageTimers(cuda=False)
    for name, seconds in (("forward-compute", 0.02), ("backward-compute", 0.03), ("forward-recv", 0.05)):
        t(name, log_level=2).start()
        time.sleep(seconds)
        t(name).stop()
    with torch.no_grad():  # evaluation forward: not training compute
        t("forward-compute", log_level=2).start()
        time.sleep(0.02)
        t("forward-compute").stop()
    t("forward-backward", log_level=1).start(barrier=True)  # other names: no-op
    t("forward-backward").stop()
    got = t.read()
    assert set(got) == {"forward-compute", "backward-compute"}
    assert got["forward-compute"][1] == 1 and got["backward-compute"][1] == 1
    assert 0.02 <= got["forward-compute"][0] < 1.0 and 0.03 <= got["backward-compute"][0] < 1.0
    assert t.read() == {"forward-compute": (0.0, 0), "backward-compute": (0.0, 0)}  # reset
