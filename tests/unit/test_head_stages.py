"""Head / embedding stages in the layout language and the planner (`E|...`, `...|H`), and the
interleaved (virtual-stage) schedule and planner of splitllama/pipeline: against brute force,
against Megatron-Core's own schedule table, and the plan_pipeline acceptance numbers."""
from __future__ import annotations

import itertools
import json
import math
import random
import subprocess
import sys
from pathlib import Path

import pytest

from splitllama.pipeline.layout import PipelineLayout, Stage
from splitllama.pipeline.plan import evaluate, plan
from splitllama.pipeline.schedule import (interleaved_orders, one_f_one_b_makespan, peak_in_flight,
                                          pipeline_makespan, schedule_table, simulate_pipeline)
from tests.unit.test_pipeline_plan import compositions, random_chain

ROOT = Path(__file__).resolve().parents[2]
CFG = str(ROOT / "configs" / "llama3_8b_70b.yaml")


# ---- layout language -------------------------------------------------------------------------
@pytest.mark.parametrize("text", ["L16|L16,A|U4|U4|H", "E|L2,A|U2", "E|L2|A,U1|U1|H", "L2,A|U2|H"])
def test_head_and_embedding_stages_round_trip(text):
    lay = PipelineLayout.parse(text)
    assert str(lay) == text and PipelineLayout.parse(str(lay)) == lay
    n, m = sum(s.lower_layers for s in lay.stages), sum(s.upper_layers for s in lay.stages)
    lay.validate(n, m, lay.pp)
    counts = lay.chain_counts()
    assert sum(counts) == n + m + 3 and PipelineLayout.from_chain_counts(counts, n, m) == lay


def test_head_stage_flags_and_widths():
    lay = PipelineLayout.parse("E|L2,A|U2|H")
    assert lay.stages[0] == Stage(embedding=True) and lay.stages[-1] == Stage(head=True)
    assert lay.chain_counts() == [1, 3, 2, 1]
    assert [lay.input_is_upper_width(k) for k in range(1, 4)] == [False, True, True]
    assert not lay.output_is_upper_width(0) and lay.output_is_upper_width(3)
    # Megatron's per-block layouts: the E stage holds only the embedding, the H stage only the loss
    assert lay.megatron_layout("lower") == [["embedding"], ["decoder"] * 2, [], ["loss"]]
    assert lay.megatron_layout("upper") == [["embedding"], [], ["decoder"] * 2, ["loss"]]
    # written beside layers, E / H are the implied embedding / head: same layout
    assert PipelineLayout.parse("E,L2,A|U2,H") == PipelineLayout.parse("L2,A|U2")


@pytest.mark.parametrize("bad, msg", [("L2|H|U2", "H .* only be on the last stage"),
                                      ("L2,A|E|U2", "E .* only be on the first stage"),
                                      ("L2,H2|A", "not E, L<k>, A, U<k> or H"),
                                      ("L2,A|H,U2", "lists U after H"), ("E,H", "holds no layers")])
def test_bad_end_stage_tokens(bad, msg):
    with pytest.raises(ValueError, match=msg):
        PipelineLayout.parse(bad)


def test_interleaved_layout_validation():
    lay = PipelineLayout.parse("L1|L1,A|U1|U1,H")
    lay.validate(2, 2, 2, vpp=2)
    with pytest.raises(ValueError, match="2 x 2 = 4"):
        PipelineLayout.parse("L2,A|U2").validate(2, 2, 2, vpp=2)
    assert lay.chunks_of_rank(0, 2) == [0, 2] and lay.chunks_of_rank(1, 2) == [1, 3]


# ---- interleaved schedule ---------------------------------------------------------------------
def test_schedule_table_is_megatron_cores():
    from megatron.core.pipeline_parallel.schedules import get_schedule_table
    for m, vpp, group in [(4, 2, 2), (5, 2, 3), (8, 3, 4), (6, 2, 2)]:
        assert schedule_table(m, vpp, group) == [tuple(x) for x in get_schedule_table(m, vpp, group)]


def test_vpp1_is_one_f_one_b():
    rng = random.Random(3)
    for _ in range(100):
        pp, m = rng.randint(1, 5), rng.randint(1, 8)
        f, b = [rng.uniform(.1, 2) for _ in range(pp)], [rng.uniform(.1, 3) for _ in range(pp)]
        q = [rng.uniform(0, .2) for _ in range(pp)]
        assert pipeline_makespan(f, b, q, m, pp) == one_f_one_b_makespan(f, b, q, m)


def test_interleaved_orders_cover_every_op_once_and_respect_dependencies():
    for pp, vpp, m in [(2, 2, 2), (2, 2, 4), (4, 2, 8), (3, 3, 6), (4, 3, 4)]:
        orders = interleaved_orders(pp, vpp, m)
        ops = [op for o in orders for op in o]
        assert sorted(ops) == sorted((k, c, j) for k in "FB" for c in range(pp * vpp) for j in range(m))
        for r, o in enumerate(orders):
            assert all(c % pp == r for _, c, _ in o)
            assert all(o.index(("F", c, j)) < o.index(("B", c, j)) for _, c, j in o)
        span, _ = pipeline_makespan([1.0] * pp * vpp, [2.0] * pp * vpp, [0.0] * pp * vpp, m, pp)
        assert span >= m * vpp * 3.0  # a rank's own work


def test_interleaved_hand_computed():
    # pp=2, vpp=2, m=2, every forward 1 s, backward 2 s, no p2p. Megatron's order:
    # rank 0: F(c0,0) F(c0,1) F(c2,0) F(c2,1) | B(c2,0) B(c2,1) B(c0,0) B(c0,1) (warm-up = 2 + 2 = 4 = all)
    # rank 1: F(c1,0) F(c1,1) F(c3,0) B(c3,0) F(c3,1) B(c3,1) B(c1,0) B(c1,1) (warm-up 2)
    o = interleaved_orders(2, 2, 2)
    assert o[0] == [("F", 0, 0), ("F", 0, 1), ("F", 2, 0), ("F", 2, 1), ("B", 2, 0), ("B", 2, 1),
                    ("B", 0, 0), ("B", 0, 1)]
    assert o[1] == [("F", 1, 0), ("F", 1, 1), ("F", 3, 0), ("B", 3, 0), ("F", 3, 1), ("B", 3, 1),
                    ("B", 1, 0), ("B", 1, 1)]
    # r0: F00 [0,1] F01 [1,2] F20 [2,3] F21 [3,4]; r1: F10 [1,2] F11 [2,3] F30 [3,4] B30 [4,6]
    # F31 [6,7] B31 [7,9] B10 [9,11] B11 [11,13]; r0: B20 [6,8] B21 [9,11] B00 [11,13] B01 [13,15]
    span, finish = pipeline_makespan([1.0] * 4, [2.0] * 4, [0.0] * 4, 2, 2)
    assert finish == [15.0, 13.0] and span == 15.0


def test_interleaved_contention_one_matches_event_loop():
    rng = random.Random(5)
    for _ in range(40):
        pp, vpp = rng.randint(2, 4), rng.randint(2, 3)
        m = pp * rng.randint(1, 3)
        n = pp * vpp
        f, b = [rng.uniform(.1, 2) for _ in range(n)], [rng.uniform(.1, 3) for _ in range(n)]
        q = [rng.uniform(0, .2) for _ in range(n)]
        span, fin, busy = simulate_pipeline(f, b, q, m, pp)
        s2, fin2, busy2 = simulate_pipeline(f, b, q, m, pp, 1.0 + 1e-12, 2)
        assert s2 == pytest.approx(span, rel=1e-9) and fin2 == pytest.approx(fin, rel=1e-9)
        assert busy2 == pytest.approx(busy, rel=1e-9)


def test_peak_in_flight():
    # non-interleaved: stage k holds min(pp - k, m) micro-batches
    peaks = peak_in_flight(4, 1, 8, [1.0] * 4)
    assert [p[1] for p in peaks] == [[4], [3], [2], [1]]
    # interleaved pp=2 vpp=2 m=2 (orders above): rank 0 holds all 4 forwards before any backward
    peaks = peak_in_flight(2, 2, 2, [1.0, 1.0, 1.0, 1.0])
    assert peaks[0] == (4.0, [2, 2]) and peaks[1] == (3.0, [2, 1])


# ---- interleaved planner ---------------------------------------------------------------------
GAP = 1.02  # local search vs brute force on these instances: measured exact in 39 of 40, worst +0.9 %
def _brute_vpp(units, pp, vpp, m, budget):
    n_lo = sum(u.kind == "lower" for u in units)
    n_up = sum(u.kind == "upper" for u in units)
    best = None
    n, c = len(units), pp * vpp
    for cuts in itertools.combinations_with_replacement(range(1, n), c - 1):  # empty middle chunks too
        sizes = [b - a for a, b in zip((0,) + cuts, cuts + (n,))]
        if sizes[0] < 1 or sizes[-1] < 1:
            continue
        p = evaluate(PipelineLayout.from_chain_counts(sizes, n_lo, n_up, allow_empty=True), units, pp, budget, m,
                     vpp=vpp)
        if p.fits and (best is None or p.step_time_s < best.step_time_s):
            best = p
    return best


@pytest.mark.parametrize("seed", range(40))
def test_vpp_planner_against_brute_force(seed):
    rng = random.Random(7000 + seed)
    n_lower, n_upper = rng.randint(2, 5), rng.randint(1, 3)
    units = random_chain(rng, n_lower, n_upper)
    pp, vpp = 2, 2
    m = rng.choice([2, 4])
    ref = _brute_vpp(units, pp, vpp, m, None)
    exact = plan(units, pp, num_microbatches=m, vpp=vpp)  # objective: the simulated interleaved step
    assert exact.step_time_s == pytest.approx(ref.step_time_s, rel=1e-12)
    # the local search (forced by a zero exhaustive limit) on the same instance: measured gap
    local = plan(units, pp, num_microbatches=m, vpp=vpp, exhaustive_limit=0)
    assert local.step_time_s <= ref.step_time_s * GAP
    local.layout.validate(n_lower, n_upper, pp, vpp)
    assert local.rank_times == pytest.approx([sum(s.time_s for s in local.stages[r::pp]) for r in range(pp)])


def test_vpp_memory_budget_is_per_rank():
    rng = random.Random(11)
    units = random_chain(rng, 4, 2)
    free = plan(units, 2, num_microbatches=4, vpp=2)
    budget = max(free.rank_memory) * 0.9
    ref = _brute_vpp(units, 2, 2, 4, budget)
    if ref is None:
        with pytest.raises(ValueError, match="fits the memory budget"):
            plan(units, 2, memory_budget=budget, num_microbatches=4, vpp=2)
    else:
        got = plan(units, 2, memory_budget=budget, num_microbatches=4, vpp=2)
        assert got.fits and max(got.rank_memory) <= budget
        assert got.step_time_s == pytest.approx(ref.step_time_s, rel=1e-12)


def test_vpp_needs_a_multiple_of_pp_microbatches():
    units = random_chain(random.Random(1), 4, 2)
    with pytest.raises(ValueError, match="multiple of pipeline_model_parallel_size"):
        plan(units, 2, num_microbatches=3, vpp=2)


# ---- the CLI acceptance numbers ----------------------------------------------------------------
def _cli(*args):
    r = subprocess.run([sys.executable, str(ROOT / "tools" / "plan_pipeline.py"), "--config", CFG, "--json", *args],
                       capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-2000:]
    return json.loads(r.stdout)


def test_pp16_head_stage_plan_at_4096():
    d = _cli("--pp", "16", "--seq-length", "4096")
    assert d["setup"]["vpp"] == 1 and d["planned"]["vpp"] == 1
    assert d["planned"]["bottleneck_over_ideal"] <= 1.20
    assert d["planned"]["layout"].endswith("|H")  # the head alone on the last stage
    assert d["params_balanced"]["bottleneck_over_ideal"] > 2.0  # the head + a 70B layer


RANK_BALANCED_8192 = "E|L2|L1|L2|L1|L2|L3|-|L1|L1|-|-|L1|-|L1|-|L4|L2|L3|L2|L3|L2|L1|A,U1|U1|U1|U1|U1|U1|U1|U1|H"


@pytest.mark.slow
def test_pp16_interleaved_plan_at_8192():
    """Summed per rank, interleaving reaches the acceptance ratio (RANK_BALANCED_8192: 1.127, the
    head alone bounds 1.071, the best contiguous split is 1.226), but Megatron's interleaved
    order stalls on unbalanced chunks: that split's simulated step is far slower than the
    non-interleaved plan's, and the planner (minimising the simulated step) prefers neither."""
    flat = _cli("--pp", "16", "--seq-length", "8192")["planned"]
    assert flat["bottleneck_over_ideal"] > 1.20
    d = _cli("--pp", "16", "--seq-length", "8192", "--vpp", "2")
    p = d["planned"]
    assert d["setup"]["vpp"] == 2 and p["vpp"] == 2 and p["fits"]
    lay = PipelineLayout.parse(p["layout"])
    assert lay.pp == 32 and str(lay.stages[-1]) == "H"
    lay.validate(32, 8, 16, vpp=2)
    assert max(p["rank_times_s"]) == pytest.approx(p["bottleneck_time_s"])
    balanced = _cli("--pp", "16", "--seq-length", "8192", "--vpp", "2", "--layout", RANK_BALANCED_8192)["explicit"]
    assert 1.071 <= balanced["bottleneck_over_ideal"] <= 1.20
    assert p["step_time_s"] < balanced["step_time_s"]
    assert flat["step_time_s"] < balanced["step_time_s"]


def test_empty_chunks_only_in_interleaved_layouts():
    PipelineLayout.parse("L1|-|L1,A|U2,H").validate(2, 2, 2, vpp=2)
    with pytest.raises(ValueError, match="stage 1 is empty"):
        PipelineLayout.parse("L1|-|L1,A,U2").validate(2, 2, 3)
    with pytest.raises(ValueError, match="stage 0 is empty"):
        PipelineLayout.parse("-|L2,A|U1|U1").validate(2, 2, 2, vpp=2)


def test_layout_search_with_virtual_stages():
    from splitllama.pipeline.search import search
    from tests.unit.test_layout_search import GB, GPUS, SEQ, TINY, jittered_source

    source = jittered_source(0)
    flat = search(TINY, GPUS, SEQ, GB, 1e12, top=40, units_source=source)
    both = search(TINY, GPUS, SEQ, GB, 1e12, top=40, units_source=source, vpp_options=(1, 2))
    assert all(c.vpp == 1 for c in flat)
    assert both[0].step_time_s <= flat[0].step_time_s * (1 + 1e-9)
    inter = [c for c in both if c.vpp == 2]
    assert inter, [c.to_dict() for c in both[:5]]
    for c in inter:  # chunks of pp x 2, costed again to the same step, Megatron's m condition
        lay = PipelineLayout.parse(c.layout)
        lay.validate(TINY.num_layers_lower, TINY.num_layers_upper, c.pp, vpp=2)
        assert c.plan.num_microbatches % c.pp == 0
        again = evaluate(lay, source(TINY, SEQ, c.micro_batch_size, c.tp, c.dp, c.recompute,
                                     sequence_parallel=c.tp > 1), c.pp, None, c.plan.num_microbatches, vpp=2)
        assert again.step_time_s == pytest.approx(c.step_time_s, rel=1e-12)
        assert "parallel.virtual_pipeline_model_parallel_size=2" in c.overrides()
