"""The simulated 1F1B step with host contention (`splitllama.pipeline.schedule`): exact against
the fixed-time schedule at contention 1, hand-computed with contention, and used by the plan's
predicted step time and the live balance report's measured costs."""
from __future__ import annotations

import random

import pytest

from splitllama.pipeline.balance import analyze, measured_units
from splitllama.pipeline.measured import stage_overhead, units_from_profile
from splitllama.pipeline.plan import StageOverhead, evaluate, plan
from splitllama.pipeline.schedule import one_f_one_b_makespan, simulate_1f1b, slowdown


def test_contention_one_is_the_fixed_time_schedule():
    rng = random.Random(0)
    for _ in range(300):
        pp, m = rng.randint(1, 6), rng.randint(1, 12)
        f = [rng.uniform(0.1, 2) for _ in range(pp)]
        b = [rng.uniform(0.1, 4) for _ in range(pp)]
        q = [rng.uniform(0, 0.3) for _ in range(pp)]
        span, finish = one_f_one_b_makespan(f, b, q, m)
        # the event-driven path (contention a hair above 1) agrees with the per-stage clocks
        s2, fin2, busy2 = simulate_1f1b(f, b, q, m, 1.0 + 1e-12, 2)
        assert s2 == pytest.approx(span, rel=1e-9) and fin2 == pytest.approx(finish, rel=1e-9)
        assert busy2 == pytest.approx([m * (x + y) for x, y in zip(f, b)], rel=1e-9)


def test_hand_computed_with_contention():
    # pp=2, m=2, every op 1 s, contention 2 (each stage half speed while both compute):
    # s0 F0 [0,1] alone; s0 F1 + s1 F0 [1,3] together; s1 B0 [3,4] alone; s0 B0 + s1 F1 [4,6];
    # s1 B1 [6,7] alone; s0 B1 [7,8] alone. Without contention the step is 6 s.
    span, finish, busy = simulate_1f1b([1, 1], [1, 1], [0, 0], 2, 2.0, 2)
    assert span == pytest.approx(8.0) and finish == pytest.approx([8.0, 7.0]) and busy == pytest.approx([6.0, 6.0])
    assert one_f_one_b_makespan([1, 1], [1, 1], [0, 0], 2)[0] == pytest.approx(6.0)
    # one micro-batch: the stages never compute at once, contention changes nothing
    assert simulate_1f1b([1, 2], [3, 4], [0.5, 0], 1, 3.0, 2)[0] == pytest.approx(1 + 0.5 + 2 + 4 + 0.5 + 3)


def test_slowdown_is_linear_in_busy_stages():
    assert slowdown(1, 1.5, 2) == 1.0 and slowdown(2, 1.5, 2) == 1.5
    assert slowdown(2, 1.5, 3) == pytest.approx(1.25) and slowdown(3, 1.5, 3) == pytest.approx(1.5)
    assert slowdown(4, 2.0, 2) == pytest.approx(4.0)  # beyond the measured count: extrapolated
    with pytest.raises(ValueError, match="contention must be > 0"):
        simulate_1f1b([1, 1], [1, 1], [0, 0], 2, 0.0, 2)


def _chain():
    """The tiny model's chain with the synthetic profile times of test_measured_profile."""
    from tests.unit.test_measured_profile import _job, _profile

    job = _job("model.lower={'preset': 'tiny_lower', 'num_hidden_layers': 6}", "model.num_layers_lower=6",
               "model.num_layers_upper=4")  # a 6-layer lower block (6 of tiny_lower's 4 is refused at load)
    prof = _profile(job)
    return units_from_profile(prof, job.model), stage_overhead(prof)


def test_plan_step_time_includes_contention():
    UNITS, OVER = _chain()
    base = evaluate(plan(UNITS, 2, "1f1b", None, 8, stage_overhead=OVER).layout, UNITS, 2, None, 8,
                    stage_overhead=OVER)
    slow = StageOverhead(**{**OVER.__dict__, "host_contention": 1.4, "contention_procs": 2})
    ev = evaluate(base.layout, UNITS, 2, None, 8, stage_overhead=slow)
    span = simulate_1f1b([s.fwd_s for s in ev.stages], [s.bwd_s for s in ev.stages],
                         [s.p2p_s for s in ev.stages], 8, 1.4, 2)[0]
    assert ev.step_time_s == pytest.approx(span + max(s.overhead_s for s in ev.stages))
    assert base.step_time_s < ev.step_time_s < 1.4 * base.step_time_s


def test_balance_report_scales_by_the_experienced_time():
    """When the run measures exactly what the contention model predicts (the busy time as
    experienced), the measured costs are the run's own units: the report is consistent."""
    UNITS, OVER = _chain()
    slow = StageOverhead(**{**OVER.__dict__, "host_contention": 1.5, "contention_procs": 2})
    m = 8
    best = plan(UNITS, 2, "1f1b", None, m, stage_overhead=slow)
    busy = evaluate(best.layout, UNITS, 2, None, m, stage_overhead=slow).simulate()[2]
    r = analyze(UNITS, best.layout, busy, m, stage_overhead=slow)
    assert r.suggested_layout is None and r.suggested_speedup == pytest.approx(1.0)
    # scaling by the solo time instead would inflate every unit by the overlap slowdown
    solo = measured_units(UNITS, best.layout, [b / m for b in busy])
    assert sum(u.time for u in solo) > 1.05 * sum(u.time for u in UNITS)
