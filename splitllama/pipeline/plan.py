"""Exact pipeline-stage planner over the unit chain of `splitllama.pipeline.cost` (pure Python).

A plan cuts the whole chain (embedding, lower layers, adapter, upper layers, head) into ``pp``
contiguous, non-empty stages; the embedding is on stage 0 and the head on the last, either
beside layers or alone (an ``E`` / ``H`` stage; ``end_stages=False`` forbids that). Stage time is
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
import itertools
import math
from dataclasses import dataclass, field
from itertools import combinations
from typing import Callable, Optional, Sequence

from splitllama.pipeline.cost import Unit
from splitllama.pipeline.layout import PipelineLayout
from splitllama.pipeline.schedule import (check_interleaved, one_f_one_b_makespan,  # noqa: F401 (re-exported)
                                         peak_in_flight, pipeline_makespan, simulate_1f1b, simulate_pipeline)

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
    """A costed layout. ``stages`` are its chunks in chain order (with ``vpp == 1`` the stages);
    chunk ``c`` runs on pipeline rank ``c % pp``. Times, memory and fits are judged per rank:
    a rank's time is the sum of its chunks', its memory the sum of its chunks' (each chunk's
    activations counted at the rank's peak in the schedule's order)."""

    method: str
    layout: PipelineLayout
    stages: tuple[StageStats, ...]
    num_microbatches: Optional[int]
    memory_budget: Optional[float]  # bytes per GPU
    overhead: Optional[StageOverhead] = field(default=None, compare=False)
    vpp: int = 1

    @property
    def pp(self) -> int:
        return len(self.stages) // self.vpp

    @property
    def rank_times(self) -> list[float]:
        out = [0.0] * self.pp
        for c, s in enumerate(self.stages):
            out[c % self.pp] += s.time_s
        return out

    @property
    def rank_memory(self) -> list[float]:
        out = [0.0] * self.pp
        for c, s in enumerate(self.stages):
            out[c % self.pp] += s.memory_total
        return out

    @property
    def total_time(self) -> float:
        return sum(s.time_s for s in self.stages)

    @property
    def bottleneck_time(self) -> float:
        return max(self.rank_times)

    @property
    def bottleneck_over_ideal(self) -> float:
        return self.bottleneck_time * self.pp / self.total_time

    @property
    def fits(self) -> bool:
        return all(s.fits for s in self.stages)

    @property
    def bubble_fraction(self) -> Optional[float]:
        """1F1B schedule bubble (pp - 1) / (m + pp - 1) of a balanced pipeline; interleaved with
        vpp virtual stages (pp - 1) / (vpp * m + pp - 1) (Narayanan et al. 2021)."""
        m, pp = self.num_microbatches, self.pp
        return None if m is None else (pp - 1) / (self.vpp * m + pp - 1)

    @property
    def step_time_s(self) -> Optional[float]:
        """Without an overhead: bottleneck-paced 1F1B step, (m + pp - 1) * bottleneck stage time
        (interleaved: the simulated makespan without p2p time). With one: the simulated
        makespan (p2p included) + the largest rank overhead (the loss / finite-check /
        grad-norm all-reduces make every stage wait for the slowest)."""
        m = self.num_microbatches
        if m is None:
            return None
        if self.overhead is None and self.vpp == 1:
            return (m + self.pp - 1) * self.bottleneck_time
        span = self.simulate()[0]
        return span + max(self.rank_overheads)

    @property
    def rank_overheads(self) -> list[float]:
        out = [0.0] * self.pp
        for c, s in enumerate(self.stages):
            out[c % self.pp] += s.overhead_s
        return out

    def simulate(self) -> tuple[float, list[float], list[float]]:
        """`simulate_pipeline` of this plan's chunks (needs ``num_microbatches``): makespan,
        per-rank finish time and per-rank compute seconds as experienced (host contention
        included)."""
        o = self.overhead or StageOverhead()
        return simulate_pipeline([s.fwd_s for s in self.stages], [s.bwd_s for s in self.stages],
                                 [s.p2p_s for s in self.stages], self.num_microbatches, self.pp,
                                 o.host_contention, o.contention_procs)

    @property
    def pipeline_efficiency(self) -> Optional[float]:
        """Ideal step (m * total / pp, no bubble, perfect balance) over the predicted step."""
        m = self.num_microbatches
        return None if m is None else m * self.total_time / self.pp / self.step_time_s


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


def _schedule_m(pp: int, vpp: int, m: Optional[int]) -> int:
    """Micro-batches the in-flight count is taken at (without m: enough for the steady state)."""
    return m if m is not None else 2 * pp * vpp


def _memory(group: Sequence[Unit], in_flight: int) -> dict:
    return {"params": sum(u.param_bytes for u in group), "grads": sum(u.grad_bytes for u in group),
            "optimizer": sum(u.optim_bytes for u in group),
            "activations": in_flight * sum(u.act_bytes_per_mb for u in group)
            + max((u.act_working_bytes for u in group), default=0.0)}


def _bounds(counts: Sequence[int]) -> list[tuple[int, int]]:
    out, pos = [], 0
    for c in counts:
        out.append((pos, pos + c))
        pos += c
    return out


def _chunk_in_flight(units: Sequence[Unit], counts: Sequence[int], pp: int, vpp: int,
                     m: Optional[int]) -> list[int]:
    """Micro-batches of activations each chunk holds at its rank's peak."""
    if vpp == 1:
        return [_in_flight(k, pp, m) for k in range(pp)]
    act = [sum(u.act_bytes_per_mb for u in units[i:j]) for i, j in _bounds(counts)]
    peaks = peak_in_flight(pp, vpp, _schedule_m(pp, vpp, m), act)
    return [peaks[c % pp][1][c // pp] for c in range(pp * vpp)]


def _stats(plan_units: Sequence[Unit], counts: Sequence[int], m: Optional[int],
           budget: Optional[float], overhead: Optional[StageOverhead] = None,
           vpp: int = 1) -> tuple[StageStats, ...]:
    """Per-chunk stats of the whole-chain split ``counts`` (units per chunk, embedding and head
    counted). With vpp > 1 a chunk's overhead leaves out the per-stage fixed cost except on
    the rank's first chunk (a rank's overhead is the sum of its chunks')."""
    n_chunks = len(counts)
    pp = n_chunks // vpp
    total = sum(u.time for u in plan_units)
    flights = _chunk_in_flight(plan_units, counts, pp, vpp, m)
    groups = [list(plan_units[i:j]) for i, j in _bounds(counts)]
    mems = [_memory(g, f) for g, f in zip(groups, flights)]
    rank_mem = [0.0] * pp
    for c, mem in enumerate(mems):
        rank_mem[c % pp] += sum(mem.values())
    out = []
    bounds = _bounds(counts)
    for k, (group, fl, mem) in enumerate(zip(groups, flights, mems)):
        t = sum(u.time for u in group)
        last = k == n_chunks - 1
        over = 0.0
        if overhead is not None:
            over = overhead.stage_seconds(group) - (overhead.fixed_s if k >= pp else 0.0)
        # an empty chunk passes on what it receives: the message of the unit before it
        sent = plan_units[bounds[k][1] - 1].p2p_bytes
        out.append(StageStats(k, _text(group), sum(u.param_count for u in group),
                              sum(u.fwd_flops + u.bwd_flops for u in group) / 1e9, t,
                              t / total if total else 0.0, mem, fl,
                              budget is None or rank_mem[k % pp] <= budget,
                              sum(u.fwd_time for u in group), sum(u.bwd_time for u in group),
                              over, 0.0 if overhead is None or last else overhead.p2p_seconds(sent)))
    return tuple(out)


def _text(group: Sequence[Unit]) -> str:
    if not group:
        return "-"
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
    """Stage sizes minimising max_k cost(k, i, j) (stage k = chain units [i, j)), then the sum of
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


def _ends_ok(n: int, pp: int, end_stages: bool) -> Callable[[int, int, int], bool]:
    """Without ``end_stages`` no stage may hold the embedding or the head alone."""
    if end_stages or pp == 1:
        return lambda k, i, j: True
    return lambda k, i, j: not ((i, j) == (0, 1) or (i, j) == (n - 1, n))


def _solve(units: Sequence[Unit], pp: int, cost: Callable[[int, int, int], float],
           feasible: Callable[[int, int, int], bool] = lambda k, i, j: True,
           end_stages: bool = True) -> Optional[list[int]]:
    """Whole-chain stage sizes (embedding and head counted)."""
    core, _, _ = _split_chain(units)
    if not 1 <= pp <= len(core):
        raise ValueError(f"cannot split {len(core)} units (lower layers + adapter + upper layers) "
                         f"into {pp} non-empty pipeline stages; need 1 <= pp <= {len(core)}")
    ends = _ends_ok(len(units), pp, end_stages)
    return _minmax_partition(len(units), pp, cost, lambda k, i, j: ends(k, i, j) and feasible(k, i, j))


def _weight_cost(units: Sequence[Unit], weight: Callable[[Unit], float]) -> Callable:
    """cost(k, i, j): summed weight of chain units [i, j)."""
    prefix = [0.0]
    for u in units:
        prefix.append(prefix[-1] + weight(u))
    return lambda k, i, j: prefix[j] - prefix[i]


def _mem_cost(units: Sequence[Unit], pp: int, m: Optional[int]) -> Callable:
    @functools.lru_cache(maxsize=None)
    def mem(k: int, i: int, j: int) -> float:
        return sum(_memory(units[i:j], _in_flight(k, pp, m)).values())
    return mem


def _result(method: str, units: Sequence[Unit], sizes: Sequence[int], m: Optional[int],
            budget: Optional[float], overhead: Optional[StageOverhead] = None, vpp: int = 1) -> StagePlan:
    _, n, mm = _split_chain(units)
    return StagePlan(method, PipelineLayout.from_chain_counts(list(sizes), n, mm, allow_empty=vpp > 1),
                     _stats(units, sizes, m, budget, overhead, vpp), m, budget, overhead, vpp)


EXHAUSTIVE_LIMIT = 3000  # splits scored one by one when there are at most this many


def _compositions(n: int, parts: int, ok: Callable[[list[int]], bool]):
    for cuts in combinations(range(1, n), parts - 1):
        sizes = [b - a for a, b in zip((0,) + cuts, cuts + (n,))]
        if ok(sizes):
            yield sizes


def _sizes_ok(feasible: Callable[[int, int, int], bool]) -> Callable[[Sequence[int]], bool]:
    def ok(sizes) -> bool:
        return all(feasible(k, i, j) for k, (i, j) in enumerate(_bounds(sizes)))
    return ok


def _step_optimal(units: Sequence[Unit], pp: int, m: int, overhead: StageOverhead,
                  feasible: Callable[[int, int, int], bool], start: list[int]) -> list[int]:
    """The split with the smallest predicted step time (1F1B makespan + slowest stage overhead).
    Exhaustive when the splits number at most EXHAUSTIVE_LIMIT; otherwise the best of the
    min-max splits of ``time + w * overhead / m`` for a range of w (and ``start``)."""
    n = len(units)
    fwd = _weight_cost(units, lambda u: u.fwd_time)
    bwd = _weight_cost(units, lambda u: u.bwd_time)
    ocost = functools.lru_cache(maxsize=None)(lambda k, i, j: overhead.stage_seconds(units[i:j]))
    ok = _sizes_ok(feasible)

    def step(sizes) -> float:
        st = [(k, i, j) for k, (i, j) in enumerate(_bounds(sizes))]
        p2p = [overhead.p2p_seconds(units[j - 1].p2p_bytes) if k < pp - 1 else 0.0 for k, _, j in st]
        span = simulate_1f1b([fwd(*s) for s in st], [bwd(*s) for s in st], p2p, m,
                             overhead.host_contention, overhead.contention_procs)[0]
        return span + max(ocost(*s) for s in st)

    if math.comb(n - 1, pp - 1) <= EXHAUSTIVE_LIMIT:
        cands = _compositions(n, pp, ok)
    else:
        cands = [start]
        weight = _weight_cost(units, lambda u: u.time)
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


# ---- interleaved (virtual) stages --------------------------------------------------------------
def _vpp_scorer(units: Sequence[Unit], pp: int, vpp: int, m: Optional[int], budget: Optional[float],
                overhead: Optional[StageOverhead]):
    """(time key, fits) of a whole-chain split into pp * vpp chunks: the time key is (bottleneck
    rank time or, with an overhead and m, the predicted step; sum of squared rank times)."""
    prefix = [0.0]
    for u in units:
        prefix.append(prefix[-1] + u.time)

    fpre, bpre = [0.0], [0.0]
    for u in units:
        fpre.append(fpre[-1] + u.fwd_time)
        bpre.append(bpre[-1] + u.bwd_time)
    m_sim = min(m, 2 * pp) if m is not None else 2 * pp

    def time_key(sizes: Sequence[int]) -> tuple:
        ranks = [0.0] * pp
        b = _bounds(sizes)
        for c, (i, j) in enumerate(b):
            ranks[c % pp] += prefix[j] - prefix[i]
        if overhead is not None and m is not None:
            primary = _result("", units, sizes, m, None, overhead, vpp).step_time_s
        else:  # the interleaved makespan (the order stalls on unbalanced chunks, not only ranks)
            primary = pipeline_makespan([fpre[j] - fpre[i] for i, j in b], [bpre[j] - bpre[i] for i, j in b],
                                        [0.0] * len(b), m_sim, pp)[0]
        return (float(f"{primary:.12e}"), max(ranks), sum(r * r for r in ranks))

    def fits(sizes: Sequence[int]) -> bool:
        return budget is None or max(_result("", units, sizes, m, None, None, vpp).rank_memory) <= budget
    return time_key, fits


VPP_MOVES = (-3, -2, -1, 1, 2, 3)


def _vpp_search(units: Sequence[Unit], pp: int, vpp: int, m: Optional[int], budget: Optional[float],
                overhead: Optional[StageOverhead], end_stages: bool, limit: int) -> list[int]:
    """Chunk sizes of the best split into pp * vpp chunks (chunk c on rank c % pp; a middle chunk
    may be empty): fitting the budget, then the smallest time key (`_vpp_scorer`). Every split
    when there are at most ``limit``; otherwise a local search: from each start (the min-max
    contiguous split into pp * vpp stages, and the split with the head chunk's rank holding
    nothing else) move one cut, or a run of neighbouring cuts together, by up to 3 units while
    the score improves. Exact in the first case only (tests compare the second with brute force)."""
    n, c = len(units), pp * vpp
    time_key, fits = _vpp_scorer(units, pp, vpp, m, budget, overhead)

    def valid(sizes) -> bool:
        if sizes[0] < 1 or sizes[-1] < 1 or min(sizes) < 0:
            return False
        return end_stages or not (sizes[0] == 1 or sizes[-1] == 1)

    def sizes_of(cuts) -> list[int]:
        return [b - a for a, b in zip([0] + list(cuts), list(cuts) + [n])]

    if math.comb(n - 1 + c - 2, c - 1) <= limit:
        cands = (sizes_of(cuts) for cuts in itertools.combinations_with_replacement(range(1, n), c - 1))
        scored = [((not fits(sz), time_key(sz)), sz) for sz in cands if valid(sz)]
        if not scored:
            raise ValueError(f"cannot split {n} units into {c} chunks")
        return min(scored)[1]
    weight = _weight_cost(units, lambda u: u.time)
    starts = [s for s in (_solve(units, c, weight, end_stages=end_stages),) if s is not None]
    # the head chunk alone on its rank: that rank's other chunks empty, the other cuts even
    cuts = [round(i * (n - 1) / (c - vpp)) for i in range(1, c - vpp + 1)]
    alone = []
    k = 0
    for ch in range(c - 1):
        if ch % pp == pp - 1:  # the last rank's chunks before the head: empty
            alone.append(alone[-1] if alone else 1)
        else:
            alone.append(cuts[min(k, len(cuts) - 1)])
            k += 1
    alone = sorted(min(max(x, 1), n - 1) for x in alone)
    starts.append(sizes_of(alone))
    best, best_k = None, None
    for sizes in starts:
        if not valid(sizes):
            continue
        cuts = list(itertools.accumulate(sizes))[:-1]
        cur = ((not fits(sizes)), time_key(sizes))
        improved = True
        while improved:
            improved = False
            moves = [((a,), d) for a in range(len(cuts)) for d in VPP_MOVES]
            moves += [(tuple(range(a, a + w)), d) for w in (2, 3, pp) for a in range(len(cuts) - w + 1)
                      for d in (-1, 1)]
            for who, d in moves:
                new = list(cuts)
                for a in who:
                    new[a] += d
                if any(b < a for a, b in zip(new, new[1:])) or new[0] < 1 or new[-1] > n - 1:
                    continue
                sz = sizes_of(new)
                if not valid(sz):
                    continue
                tk = time_key(sz)
                if cur[0] is False and tk >= cur[1]:
                    continue  # not faster: skip the memory check
                k2 = (not fits(sz), tk)
                if k2 < cur:
                    cuts, cur, improved = new, k2, True
        if best_k is None or cur < best_k:
            best, best_k = sizes_of(cuts), cur
    return best


# ---- public API -------------------------------------------------------------------------------
def plan(units: Sequence[Unit], pp: int, schedule: str = "1f1b", memory_budget: Optional[float] = None,
         num_microbatches: Optional[int] = None, *,
         stage_overhead: Optional[StageOverhead] = None, vpp: int = 1,
         end_stages: bool = True, exhaustive_limit: int = EXHAUSTIVE_LIMIT) -> StagePlan:
    """The contiguous split with the smallest bottleneck stage time that fits ``memory_budget``
    (bytes per GPU; None: unconstrained). Raises ValueError when none fits or pp is too large.
    With ``stage_overhead`` (and ``num_microbatches``) the split minimises the predicted step
    time instead (see `_step_optimal`), starting from the min-max split. ``end_stages``: the
    embedding and the head may get a stage of their own (``E|...``, ``...|H``).

    ``vpp > 1``: interleaved 1F1B, the chain cut into ``pp * vpp`` chunks, chunk c on rank
    ``c % pp``; the split minimises the bottleneck rank's summed chunk time (with an overhead:
    the simulated interleaved step) subject to every rank's memory (`_vpp_search`)."""
    if schedule != "1f1b":
        raise ValueError(f"schedule '{schedule}' is not supported; the planner models '1f1b'")
    if vpp < 1:
        raise ValueError(f"vpp must be >= 1, got {vpp}")
    if vpp > 1:
        core, _, _ = _split_chain(units)
        if pp < 2 or pp * vpp > len(core):
            raise ValueError(f"cannot split {len(core)} units (lower layers + adapter + upper layers) "
                             f"into {pp} x {vpp} chunks; interleaving needs pp >= 2 and pp * vpp <= {len(core)}")
        if num_microbatches is not None:
            check_interleaved(pp, vpp, num_microbatches)
        sizes = _vpp_search(units, pp, vpp, num_microbatches, memory_budget, stage_overhead,
                            end_stages, exhaustive_limit)
        got = _result("planned", units, sizes, num_microbatches, memory_budget, stage_overhead, vpp)
        if not got.fits:
            raise ValueError(f"no {pp} x {vpp}-chunk interleaved plan found fits the memory budget: the "
                             f"best found ({got.layout}) needs {max(got.rank_memory) / GiB:.2f} GiB on "
                             f"its largest rank vs a budget of {memory_budget / GiB:.2f} GiB per GPU")
        return got
    mem = _mem_cost(units, pp, num_microbatches)
    sizes = _solve(units, pp, _weight_cost(units, lambda u: u.time),
                   lambda k, i, j: memory_budget is None or mem(k, i, j) <= memory_budget, end_stages)
    if sizes is None:
        lean = _result("min_memory", units, _solve(units, pp, mem, end_stages=end_stages), num_microbatches, None)
        least = max(s.memory_total for s in lean.stages)
        raise ValueError(
            f"no {pp}-stage pipeline plan fits the memory budget: the split that needs the least "
            f"memory ({lean.layout}) still needs {least / GiB:.2f} GiB on its largest stage vs a "
            f"budget of {memory_budget / GiB:.2f} GiB per GPU; raise tp / dp (distributed "
            f"optimizer), recompute activations, or add stages")
    if stage_overhead is not None and num_microbatches is not None:
        ends = _ends_ok(len(units), pp, end_stages)
        sizes = _step_optimal(units, pp, num_microbatches, stage_overhead,
                              lambda k, i, j: ends(k, i, j) and (memory_budget is None or mem(k, i, j) <= memory_budget),
                              sizes)
    return _result("planned", units, sizes, num_microbatches, memory_budget, stage_overhead)


def evaluate(layout: PipelineLayout | str, units: Sequence[Unit], pp: Optional[int] = None,
             memory_budget: Optional[float] = None, num_microbatches: Optional[int] = None,
             method: str = "explicit", *, stage_overhead: Optional[StageOverhead] = None,
             vpp: int = 1) -> StagePlan:
    """Cost an explicit layout (validated against the chain; over-budget stages get fits=False).
    With ``vpp > 1`` the layout lists pp * vpp chunks (``pp``: the pipeline ranks; None: the
    layout's chunk count / vpp)."""
    layout = PipelineLayout.parse(layout) if isinstance(layout, str) else layout
    _, n, m = _split_chain(units)
    if layout.pp % vpp:
        raise ValueError(f"pipeline layout '{layout}' has {layout.pp} chunks, not a multiple of "
                         f"virtual_pipeline_model_parallel_size {vpp}")
    layout.validate(n, m, pp, vpp)
    if vpp > 1 and num_microbatches is not None:
        check_interleaved(layout.pp // vpp, vpp, num_microbatches)
    return _result(method, units, layout.chain_counts(), num_microbatches, memory_budget, stage_overhead, vpp)


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
    (embedding and head included, never alone on a stage), blind to FLOPs and memory; costed
    like any plan."""
    sizes = _solve(units, pp, _weight_cost(units, lambda u: float(u.param_count)), end_stages=False)
    return _result("params_balanced", units, sizes, num_microbatches, memory_budget, stage_overhead)
