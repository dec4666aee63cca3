"""Exact pipeline-stage planner over the unit chain of `splitllama.pipeline.cost` (pure Python).

A plan cuts the core units (lower layers, adapter, upper layers) into ``pp`` contiguous,
non-empty stages; the embedding rides on stage 0 and the head on the last stage. Stage time is
its units' fwd+bwd time per microbatch; under 1F1B stage ``i`` keeps up to ``min(pp - i, m)``
microbatches of activations (``m`` microbatches per step). `plan` minimises the bottleneck
stage time exactly (DP, O(pp * n^2) states) subject to every stage fitting the memory budget.
Ties are broken deterministically: among plans with the optimal bottleneck, the one with the
smallest sum of squared stage times wins, then the one whose last cut points come earliest.

Per-stage costs that do not scale with micro-batches (`StageOverhead`: optimizer step and
gradient finalisation per local parameter, a fixed per-stage cost, p2p latency + bytes per
boundary message) are optional. Without them a plan's step time is the classic
``(m + pp - 1) x bottleneck``; with them it is the makespan of Megatron's 1F1B schedule
(`one_f_one_b_makespan`: warm-up forwards, steady 1F1B, cool-down backwards, p2p delay on each
boundary; with a profile's host contention, `simulate_1f1b`) plus the slowest stage's overhead,
and `plan` minimises that predicted step time.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from itertools import combinations
from typing import Callable, Optional, Sequence

from splitllama.pipeline.cost import Unit
from splitllama.pipeline.layout import PipelineLayout
from splitllama.pipeline.schedule import one_f_one_b_makespan, simulate_1f1b  # noqa: F401 (one_f_one_b_makespan re-exported)

GiB = float(2 ** 30)


@dataclass(frozen=True)
class StageStats:
    index: int
    units: str  # layout text of the stage, with E / H marking the embedding / head
    params: int  # full (unsharded) parameter count
    gflops: float  # per GPU per microbatch, forward + backward
    time_s: float  # per microbatch, forward + backward
    time_share: float  # of the whole chain's time
    memory: dict  # bytes per GPU: params, grads, optimizer, activations
    in_flight: int  # microbatches of activations held under 1F1B
    fits: bool
    fwd_s: float = 0.0  # per microbatch
    bwd_s: float = 0.0  # per microbatch
    overhead_s: float = 0.0  # per step (StageOverhead), 0 without one
    p2p_s: float = 0.0  # per message over the boundary after this stage (0 for the last)

    @property
    def memory_total(self) -> float:
        return sum(self.memory.values())


@dataclass(frozen=True)
class StageOverhead:
    """Per-step, per-stage costs that do not move with the micro-batches (measured by a profile,
    `splitllama.pipeline.measured`). Local parameters of a stage = its units' ``param_bytes /
    dtype_bytes``; the optimizer's share is divided by ``optimizer_shards`` (DP size under the
    distributed optimizer)."""

    optimizer_s_per_param: float = 0.0
    grad_finalize_s_per_param: float = 0.0
    fixed_s: float = 0.0  # per stage per step (schedule set-up, loss/finite-check all-reduces)
    p2p_latency_s: float = 0.0  # per message
    p2p_s_per_byte: float = 0.0
    dtype_bytes: float = 2.0
    optimizer_shards: int = 1
    # Host contention (`splitllama.pipeline.schedule.simulate_1f1b`): each stage runs
    # ``host_contention`` times slower while ``contention_procs`` stage processes compute at once
    # (they share one host's cores: CPU); 1.0 when each stage has its own device.
    host_contention: float = 1.0
    contention_procs: int = 2

    def stage_seconds(self, group: Sequence[Unit]) -> float:
        local = sum(u.param_bytes for u in group) / self.dtype_bytes
        return (self.fixed_s + local * self.grad_finalize_s_per_param
                + local * self.optimizer_s_per_param / max(1, self.optimizer_shards))

    def p2p_seconds(self, nbytes: float) -> float:
        return self.p2p_latency_s + nbytes * self.p2p_s_per_byte


@dataclass(frozen=True)
class StagePlan:
    method: str
    layout: PipelineLayout
    stages: tuple[StageStats, ...]
    num_microbatches: Optional[int]
    memory_budget: Optional[float]  # bytes per GPU
    overhead: Optional[StageOverhead] = field(default=None, compare=False)

    @property
    def total_time(self) -> float:
        return sum(s.time_s for s in self.stages)

    @property
    def bottleneck_time(self) -> float:
        return max(s.time_s for s in self.stages)

    @property
    def bottleneck_over_ideal(self) -> float:
        return self.bottleneck_time * len(self.stages) / self.total_time

    @property
    def fits(self) -> bool:
        return all(s.fits for s in self.stages)

    @property
    def bubble_fraction(self) -> Optional[float]:
        """1F1B schedule bubble (pp - 1) / (m + pp - 1) of a balanced pipeline."""
        m, pp = self.num_microbatches, len(self.stages)
        return None if m is None else (pp - 1) / (m + pp - 1)

    @property
    def step_time_s(self) -> Optional[float]:
        """Without an overhead: bottleneck-paced 1F1B step, (m + pp - 1) * bottleneck stage time.
        With one: the simulated 1F1B makespan (p2p included) + the largest stage overhead (the
        loss / finite-check / grad-norm all-reduces make every stage wait for the slowest)."""
        m = self.num_microbatches
        if m is None:
            return None
        if self.overhead is None:
            return (m + len(self.stages) - 1) * self.bottleneck_time
        span = self.simulate()[0]
        return span + max(s.overhead_s for s in self.stages)

    def simulate(self) -> tuple[float, list[float], list[float]]:
        """`simulate_1f1b` of this plan's stages (needs ``num_microbatches``): makespan, per-stage
        finish time and per-stage compute seconds as experienced (host contention included)."""
        o = self.overhead or StageOverhead()
        return simulate_1f1b([s.fwd_s for s in self.stages], [s.bwd_s for s in self.stages],
                             [s.p2p_s for s in self.stages], self.num_microbatches,
                             o.host_contention, o.contention_procs)

    @property
    def pipeline_efficiency(self) -> Optional[float]:
        """Ideal step (m * total / pp, no bubble, perfect balance) over the predicted step."""
        m = self.num_microbatches
        return None if m is None else m * self.total_time / len(self.stages) / self.step_time_s


def microbatches_per_step(global_batch: int, micro_batch: int, dp: int) -> int:
    """Micro-batches per step on one data-parallel rank: THE formula (the resolve step and the
    layout search call it); at least 1, since the planning tool may be asked about a global batch
    smaller than micro_batch x dp."""
    return max(1, global_batch // (micro_batch * dp))


# ---- chain helpers ----------------------------------------------------------------------------
def _split_chain(units: Sequence[Unit]) -> tuple[list[Unit], int, int]:
    """Core units and (N, M); checks the chain is embedding, L*, adapter, U*, head."""
    kinds = [u.kind for u in units]
    if len(units) < 3 or kinds[0] != "embedding" or kinds[-1] != "head":
        raise ValueError(f"unit chain must start with an embedding and end with a head, got {kinds[:1]}..{kinds[-1:]}")
    core = list(units[1:-1])
    kinds = [u.kind for u in core]
    n, m = kinds.count("lower"), kinds.count("upper")
    if kinds != ["lower"] * n + ["adapter"] + ["upper"] * m:
        raise ValueError("unit chain core must be lower layers, one adapter, then upper layers")
    return core, n, m


def _in_flight(stage: int, pp: int, m: Optional[int]) -> int:
    return pp - stage if m is None else max(1, min(pp - stage, m))


def _stage_units(units: Sequence[Unit], core_lo: int, core_hi: int, k: int, pp: int) -> list[Unit]:
    """Units of stage k holding core units [core_lo, core_hi) (core index 0 = units[1])."""
    return ([units[0]] if k == 0 else []) + list(units[1 + core_lo:1 + core_hi]) + \
        ([units[-1]] if k == pp - 1 else [])


def _memory(group: Sequence[Unit], in_flight: int) -> dict:
    return {"params": sum(u.param_bytes for u in group), "grads": sum(u.grad_bytes for u in group),
            "optimizer": sum(u.optim_bytes for u in group),
            "activations": in_flight * sum(u.act_bytes_per_mb for u in group)
            + max((u.act_working_bytes for u in group), default=0.0)}


def _stats(plan_units: Sequence[Unit], counts: Sequence[int], m: Optional[int],
           budget: Optional[float], overhead: Optional[StageOverhead] = None) -> tuple[StageStats, ...]:
    pp, total = len(counts), sum(u.time for u in plan_units)
    out, pos = [], 0
    for k, c in enumerate(counts):
        group = _stage_units(plan_units, pos, pos + c, k, pp)
        t, fl = sum(u.time for u in group), _in_flight(k, pp, m)
        mem = _memory(group, fl)
        last = k == pp - 1
        out.append(StageStats(k, _text(group), sum(u.param_count for u in group),
                              sum(u.fwd_flops + u.bwd_flops for u in group) / 1e9, t,
                              t / total if total else 0.0, mem, fl,
                              budget is None or sum(mem.values()) <= budget,
                              sum(u.fwd_time for u in group), sum(u.bwd_time for u in group),
                              0.0 if overhead is None else overhead.stage_seconds(group),
                              0.0 if overhead is None or last else overhead.p2p_seconds(group[-1].p2p_bytes)))
        pos += c
    return tuple(out)


def _text(group: Sequence[Unit]) -> str:
    parts = ["E"] if group[0].kind == "embedding" else []
    for kind, tag in (("lower", "L"), ("upper", "U")):
        n = sum(u.kind == kind for u in group)
        if kind == "upper" and any(u.kind == "adapter" for u in group):
            parts.append("A")
        if n:
            parts.append(f"{tag}{n}")
    return ",".join(parts + (["H"] if group[-1].kind == "head" else []))


# ---- exact min-max partition -------------------------------------------------------------------
def _minmax_partition(n: int, pp: int, cost: Callable[[int, int, int], float],
                      feasible: Callable[[int, int, int], bool]) -> Optional[list[int]]:
    """Stage sizes minimising max_k cost(k, i, j) (stage k = core units [i, j)), then the sum of
    squared costs, then earliest cuts; None when no partition is feasible."""
    inf = math.inf
    f = [[inf] * (n + 1) for _ in range(pp)]
    for j in range(1, n + 1):
        if feasible(0, 0, j):
            f[0][j] = cost(0, 0, j)
    for k in range(1, pp):
        for j in range(k + 1, n + 1):
            for i in range(k, j):
                if f[k - 1][i] < inf and feasible(k, i, j):
                    f[k][j] = min(f[k][j], max(f[k - 1][i], cost(k, i, j)))
    best = f[pp - 1][n]
    if best == inf:
        return None
    cap = best * (1 + 1e-9) + 1e-300
    g = [[inf] * (n + 1) for _ in range(pp)]
    arg = [[-1] * (n + 1) for _ in range(pp)]
    for j in range(1, n + 1):
        if feasible(0, 0, j) and cost(0, 0, j) <= cap:
            g[0][j] = cost(0, 0, j) ** 2
    for k in range(1, pp):
        for j in range(k + 1, n + 1):
            for i in range(k, j):
                if g[k - 1][i] < inf and feasible(k, i, j) and cost(k, i, j) <= cap:
                    v = g[k - 1][i] + cost(k, i, j) ** 2
                    if v < g[k][j]:
                        g[k][j], arg[k][j] = v, i
    sizes, j = [], n
    for k in range(pp - 1, 0, -1):
        i = arg[k][j]
        sizes.append(j - i)
        j = i
    return [j] + sizes[::-1]


def _solve(units: Sequence[Unit], pp: int, cost: Callable[[int, int, int], float],
           feasible: Callable[[int, int, int], bool] = lambda k, i, j: True) -> Optional[list[int]]:
    core, _, _ = _split_chain(units)
    if not 1 <= pp <= len(core):
        raise ValueError(f"cannot split {len(core)} units (lower layers + adapter + upper layers) "
                         f"into {pp} non-empty pipeline stages; need 1 <= pp <= {len(core)}")
    return _minmax_partition(len(core), pp, cost, feasible)


def _weight_cost(units: Sequence[Unit], pp: int, weight: Callable[[Unit], float]) -> Callable:
    """cost(k, i, j): summed weight of stage k holding core units [i, j) (+ embedding / head)."""
    prefix = [0.0]
    for u in units:
        prefix.append(prefix[-1] + weight(u))
    return lambda k, i, j: prefix[j + 1 + (k == pp - 1)] - prefix[i + 1 - (k == 0)]


def _mem_cost(units: Sequence[Unit], pp: int, m: Optional[int]) -> Callable:
    @functools.lru_cache(maxsize=None)
    def mem(k: int, i: int, j: int) -> float:
        return sum(_memory(_stage_units(units, i, j, k, pp), _in_flight(k, pp, m)).values())
    return mem


def _result(method: str, units: Sequence[Unit], sizes: Sequence[int], m: Optional[int],
            budget: Optional[float], overhead: Optional[StageOverhead] = None) -> StagePlan:
    _, n, mm = _split_chain(units)
    return StagePlan(method, PipelineLayout.from_counts(list(sizes), n, mm),
                     _stats(units, sizes, m, budget, overhead), m, budget, overhead)


EXHAUSTIVE_LIMIT = 3000  # splits scored one by one when there are at most this many


def _step_optimal(units: Sequence[Unit], pp: int, m: int, overhead: StageOverhead,
                  feasible: Callable[[int, int, int], bool], start: list[int]) -> list[int]:
    """The split with the smallest predicted step time (1F1B makespan + slowest stage overhead).
    Exhaustive when the splits number at most EXHAUSTIVE_LIMIT; otherwise the best of the
    min-max splits of ``time + w * overhead / m`` for a range of w (and ``start``)."""
    core, _, _ = _split_chain(units)
    n = len(core)
    fwd = _weight_cost(units, pp, lambda u: u.fwd_time)
    bwd = _weight_cost(units, pp, lambda u: u.bwd_time)
    ocost = functools.lru_cache(maxsize=None)(
        lambda k, i, j: overhead.stage_seconds(_stage_units(units, i, j, k, pp)))

    def ok(sizes) -> bool:
        pos = 0
        for k, c in enumerate(sizes):
            if not feasible(k, pos, pos + c):
                return False
            pos += c
        return True

    def step(sizes) -> float:
        bounds = [0]
        for c in sizes:
            bounds.append(bounds[-1] + c)
        st = list(zip(range(pp), bounds[:-1], bounds[1:]))
        p2p = [overhead.p2p_seconds(core[j - 1].p2p_bytes) if k < pp - 1 else 0.0 for k, _, j in st]
        span = simulate_1f1b([fwd(*s) for s in st], [bwd(*s) for s in st], p2p, m,
                             overhead.host_contention, overhead.contention_procs)[0]
        return span + max(ocost(*s) for s in st)

    if math.comb(n - 1, pp - 1) <= EXHAUSTIVE_LIMIT:
        cands = ([b - a for a, b in zip((0,) + cuts, cuts + (n,))] for cuts in combinations(range(1, n), pp - 1))
    else:
        cands = [start]
        weight = _weight_cost(units, pp, lambda u: u.time)
        for w in (0.25, 0.5, 1.0, 2.0, 4.0):
            sizes = _solve(units, pp, lambda k, i, j, w=w: weight(k, i, j) + w * ocost(k, i, j) / m, feasible)
            if sizes is not None:
                cands.append(sizes)
    best, best_t = list(start), step(start)
    for sizes in cands:
        sizes = list(sizes)
        if sizes != best and ok(sizes):
            t = step(sizes)
            if t < best_t * (1 - 1e-9):
                best, best_t = sizes, t
    return best


# ---- public API -------------------------------------------------------------------------------
def plan(units: Sequence[Unit], pp: int, schedule: str = "1f1b", memory_budget: Optional[float] = None,
         num_microbatches: Optional[int] = None, *,
         stage_overhead: Optional[StageOverhead] = None) -> StagePlan:
    """The contiguous split with the smallest bottleneck stage time that fits ``memory_budget``
    (bytes per GPU; None: unconstrained). Raises ValueError when none fits or pp is too large.
    With ``stage_overhead`` (and ``num_microbatches``) the split minimises the predicted step
    time instead (see `_step_optimal`), starting from the min-max split."""
    if schedule != "1f1b":
        raise ValueError(f"schedule '{schedule}' is not supported; the planner models '1f1b'")
    mem = _mem_cost(units, pp, num_microbatches)
    sizes = _solve(units, pp, _weight_cost(units, pp, lambda u: u.time),
                   lambda k, i, j: memory_budget is None or mem(k, i, j) <= memory_budget)
    if sizes is None:
        lean = _result("min_memory", units, _solve(units, pp, mem), num_microbatches, None)
        least = max(s.memory_total for s in lean.stages)
        raise ValueError(
            f"no {pp}-stage pipeline plan fits the memory budget: the split that needs the least "
            f"memory ({lean.layout}) still needs {least / GiB:.2f} GiB on its largest stage vs a "
            f"budget of {memory_budget / GiB:.2f} GiB per GPU; raise tp / dp (distributed "
            f"optimizer), recompute activations, or add stages")
    if stage_overhead is not None and num_microbatches is not None:
        sizes = _step_optimal(units, pp, num_microbatches, stage_overhead,
                              lambda k, i, j: memory_budget is None or mem(k, i, j) <= memory_budget, sizes)
    return _result("planned", units, sizes, num_microbatches, memory_budget, stage_overhead)


def evaluate(layout: PipelineLayout | str, units: Sequence[Unit], pp: Optional[int] = None,
             memory_budget: Optional[float] = None, num_microbatches: Optional[int] = None,
             method: str = "explicit", *, stage_overhead: Optional[StageOverhead] = None) -> StagePlan:
    """Cost an explicit layout (validated against the chain; over-budget stages get fits=False)."""
    layout = PipelineLayout.parse(layout) if isinstance(layout, str) else layout
    _, n, m = _split_chain(units)
    layout.validate(n, m, pp)
    sizes = [s.lower_layers + int(s.adapter) + s.upper_layers for s in layout.stages]
    return _result(method, units, sizes, num_microbatches, memory_budget, stage_overhead)


def uniform(units: Sequence[Unit], pp: int, memory_budget: Optional[float] = None,
            num_microbatches: Optional[int] = None, *,
            stage_overhead: Optional[StageOverhead] = None) -> StagePlan:
    """Megatron's default split (`PipelineLayout.uniform`), costed."""
    _, n, m = _split_chain(units)
    return evaluate(PipelineLayout.uniform(n, m, pp), units, pp, memory_budget, num_microbatches, "uniform",
                    stage_overhead=stage_overhead)


def params_balanced(units: Sequence[Unit], pp: int, memory_budget: Optional[float] = None,
                    num_microbatches: Optional[int] = None, *,
                    stage_overhead: Optional[StageOverhead] = None) -> StagePlan:
    """DeepSpeed ``partition_method='parameters'``: contiguous split balancing parameter counts
    (embedding and head included), blind to FLOPs and memory; costed like any plan."""
    sizes = _solve(units, pp, _weight_cost(units, pp, lambda u: float(u.param_count)))
    return _result("params_balanced", units, sizes, num_microbatches, memory_budget, stage_overhead)
