"""Simulated step of Megatron's 1F1B schedules, non-interleaved and interleaved (pure Python).

``one_f_one_b_makespan``: each stage's operations take fixed times (one device per stage).
``pipeline_makespan`` generalises it to interleaved 1F1B (virtual stages): ``pp * vpp`` model
chunks, chunk ``c`` on rank ``c % pp``, each rank running its operations in the order of
Megatron-Core's ``forward_backward_pipelining_with_interleaving`` (`interleaved_orders`).

``simulate_1f1b`` / ``simulate_pipeline`` add **host contention**: when the stage processes
share one host's compute (a CPU box: 2 processes x 1 thread on 2 vCPUs measured every unit
22-36 % slower while both computed), a rank computing while ``a`` ranks compute runs
``slowdown(a)`` times slower, with ``slowdown(1) = 1`` and ``slowdown(procs) = contention``
(measured by the profile with ``procs`` processes computing at once), linear in between and
beyond. It is an event-driven simulation: the busy set changes only when an operation starts or
ends, and between those instants every busy rank progresses at the same rate. ``contention ==
1`` gives exactly the fixed-time makespan, which is kept as the fast path: it is O(ops) per
split, and the planner scores up to 3000 splits; the event-driven loop costs a factor pp more.
Per rank it also returns the compute seconds as experienced (what the live balance report
measures), which exceed the solo times by the slowdown during overlap.

Dependencies (what the blocking send/recv pairs wait on): the forward of chunk ``c`` for
micro-batch ``j`` waits for chunk ``c - 1``'s forward of ``j`` plus ``p2p[c - 1]``; the backward
of chunk ``c`` waits for chunk ``c + 1``'s backward of ``j`` plus ``p2p[c]``.
"""
from __future__ import annotations

from typing import Sequence

Op = tuple[str, int, int]  # ("F" | "B", chunk, micro-batch)


def one_f_one_b_orders(pp: int, m: int) -> list[list[tuple[str, int]]]:
    """Per stage, its operations in Megatron's order: ``min(pp - k - 1, m)`` warm-up forwards,
    then (forward, backward) pairs, then the remaining backwards."""
    orders = []
    for k in range(pp):
        w = min(pp - k - 1, m)
        ops = [("F", j) for j in range(w)]
        for i in range(m - w):
            ops += [("F", w + i), ("B", i)]
        ops += [("B", j) for j in range(m - w, m)]
        orders.append(ops)
    return orders


def schedule_table(m: int, vpp: int, group: int) -> list[tuple[int, int]]:
    """Megatron-Core's ``get_schedule_table``: (micro-batch, virtual stage) of each virtual
    micro-batch id: groups of ``group`` micro-batches run through every virtual stage in turn."""
    table = []
    for lo in range(0, m, group):
        hi = m if lo + group >= m else lo + group
        table += [(j, v) for v in range(vpp) for j in range(lo, hi)]
    return table


def check_interleaved(pp: int, vpp: int, m: int) -> None:
    """Megatron-Core's condition on the micro-batch count for the interleaved schedule (with its
    default ``microbatch_group_size_per_vp_stage = pp``: at least pp micro-batches, and a last
    group of 0 or >= pp, i.e. a multiple of pp)."""
    if vpp > 1 and pp > 1 and (m < pp or m % pp):
        raise ValueError(f"interleaved 1F1B (virtual_pipeline_model_parallel_size={vpp}) needs the "
                         f"number of micro-batches per step ({m}) to be a multiple of "
                         f"pipeline_model_parallel_size ({pp}) (Megatron-Core's condition)")


def interleaved_orders(pp: int, vpp: int, m: int) -> list[list[Op]]:
    """Per rank, its operations (op, global chunk, micro-batch) in Megatron-Core's order; with
    ``vpp == 1`` the non-interleaved 1F1B order."""
    if vpp == 1:
        return [[(op, k, j) for op, j in ops] for k, ops in enumerate(one_f_one_b_orders(pp, m))]
    if pp == 1:
        raise ValueError("interleaved 1F1B needs pipeline_model_parallel_size > 1")
    table = schedule_table(m, vpp, pp)
    total = m * vpp
    orders = []
    for r in range(pp):
        warm = min((pp - r - 1) * 2 + (vpp - 1) * pp, total)
        fwd = [("F", v * pp + r, j) for j, v in table]
        bwd = [("B", (vpp - 1 - v) * pp + r, j) for j, v in table]
        ops = fwd[:warm]
        for k in range(total - warm):
            ops += [fwd[warm + k], bwd[k]]
        ops += bwd[total - warm:]
        orders.append(ops)
    return orders


def _deps(op: Op, n_chunks: int, p2p: Sequence[float]):
    """(dependency op, delay) or None for the first chunk's forwards / last chunk's backwards."""
    kind, c, j = op
    if kind == "F":
        return None if c == 0 else (("F", c - 1, j), p2p[c - 1])
    return None if c == n_chunks - 1 else (("B", c + 1, j), p2p[c])


def pipeline_makespan(fwd: Sequence[float], bwd: Sequence[float], p2p: Sequence[float], m: int,
                      pp: int) -> tuple[float, list[float]]:
    """Makespan of (interleaved) 1F1B over ``len(fwd) = pp * vpp`` chunks (times per chunk and
    micro-batch; ``p2p[c]``: the message after chunk c) and each rank's finish time."""
    n = len(fwd)
    if n % pp:
        raise ValueError(f"{n} chunks cannot be spread over {pp} pipeline ranks")
    orders = interleaved_orders(pp, n // pp, m)
    done: dict = {}
    pos, clock = [0] * pp, [0.0] * pp
    remaining = sum(len(o) for o in orders)
    while remaining:
        progressed = False
        for r in range(pp):
            while pos[r] < len(orders[r]):
                op = orders[r][pos[r]]
                dep = _deps(op, n, p2p)
                if dep is not None and dep[0] not in done:
                    break
                start = max(clock[r], done[dep[0]] + dep[1] if dep else 0.0)
                clock[r] = start + (fwd if op[0] == "F" else bwd)[op[1]]
                done[op] = clock[r]
                pos[r] += 1
                remaining -= 1
                progressed = True
        if not progressed:  # cannot happen for Megatron's orders; guard against an endless loop
            raise RuntimeError("pipeline schedule simulation deadlocked")
    return max(clock), clock


def one_f_one_b_makespan(fwd: Sequence[float], bwd: Sequence[float], p2p: Sequence[float],
                         m: int) -> tuple[float, list[float]]:
    """Makespan of Megatron's non-interleaved 1F1B schedule
    (``forward_backward_pipelining_without_interleaving``) and each stage's finish time: F(k, j)
    waits for F(k-1, j) plus ``p2p[k-1]``, B(k, j) for B(k+1, j) plus ``p2p[k]``."""
    return pipeline_makespan(fwd, bwd, p2p, m, len(fwd))


def peak_in_flight(pp: int, vpp: int, m: int, act: Sequence[float]) -> list[tuple[float, list[int]]]:
    """Per rank: (peak activation bytes kept from forward to backward, and how many micro-batches
    of each of its chunks are live at that peak), walking the rank's operations in schedule order
    (``act[c]``: bytes chunk c keeps per micro-batch)."""
    out = []
    for r, ops in enumerate(interleaved_orders(pp, vpp, m)):
        chunks = list(range(r, pp * vpp, pp))
        live = {c: 0 for c in chunks}
        best, best_live, cur = 0.0, [0] * len(chunks), 0.0
        for kind, c, _ in ops:
            if kind == "F":
                live[c] += 1
                cur += act[c]
                if cur > best or (cur == best and sum(live.values()) > sum(best_live)):
                    best, best_live = cur, [live[x] for x in chunks]
            else:
                live[c] -= 1
                cur -= act[c]
        out.append((best, best_live))
    return out


def slowdown(busy: int, contention: float, procs: int) -> float:
    """How much slower each of ``busy`` concurrently computing stages runs."""
    if busy <= 1 or contention == 1.0 or procs <= 1:
        return 1.0
    return 1.0 + (contention - 1.0) * (busy - 1) / (procs - 1)


def simulate_pipeline(fwd: Sequence[float], bwd: Sequence[float], p2p: Sequence[float], m: int,
                      pp: int, contention: float = 1.0,
                      procs: int = 2) -> tuple[float, list[float], list[float]]:
    """(makespan, per-rank finish time, per-rank compute seconds as experienced) of
    (interleaved) 1F1B over ``len(fwd)`` chunks with host contention (module docstring)."""
    n = len(fwd)
    if contention == 1.0:
        span, finish = pipeline_makespan(fwd, bwd, p2p, m, pp)
        busy = [0.0] * pp
        for c in range(n):
            busy[c % pp] += m * (fwd[c] + bwd[c])
        return span, finish, busy
    if contention <= 0:
        raise ValueError(f"host contention must be > 0, got {contention}")
    orders = interleaved_orders(pp, n // pp, m)
    done: dict = {}
    pos, finish, busy_s = [0] * pp, [0.0] * pp, [0.0] * pp
    running: list = [None] * pp  # [op, solo seconds left]
    t, eps = 0.0, 1e-12
    scale = [max(1.0, sum(fwd[c] + bwd[c] for c in range(r, n, pp))) for r in range(pp)]

    def ready_at(r: int):
        dep = _deps(orders[r][pos[r]], n, p2p)
        if dep is None:
            return 0.0
        d = done.get(dep[0])
        return None if d is None else d + dep[1]

    while True:
        waiting = []
        for r in range(pp):
            if running[r] is None and pos[r] < len(orders[r]):
                ready = ready_at(r)
                if ready is not None and ready <= t + eps:
                    op = orders[r][pos[r]]
                    running[r] = [op, (fwd if op[0] == "F" else bwd)[op[1]]]
                elif ready is not None:
                    waiting.append(ready)
        active = [r for r in range(pp) if running[r] is not None]
        if not active:
            if not waiting:
                if any(pos[r] < len(orders[r]) for r in range(pp)):
                    raise RuntimeError("pipeline schedule simulation deadlocked")
                break
            t = min(waiting)
            continue
        rate = 1.0 / slowdown(len(active), contention, procs)
        t_next = min([t + running[r][1] / rate for r in active] + waiting)
        dt = t_next - t
        for r in active:
            running[r][1] -= dt * rate
            busy_s[r] += dt
            if running[r][1] <= eps * scale[r]:
                done[running[r][0]] = finish[r] = t_next
                pos[r] += 1
                running[r] = None
        t = t_next
    return max(finish), finish, busy_s


def simulate_1f1b(fwd: Sequence[float], bwd: Sequence[float], p2p: Sequence[float], m: int,
                  contention: float = 1.0, procs: int = 2) -> tuple[float, list[float], list[float]]:
    """`simulate_pipeline` of the non-interleaved schedule (one chunk per stage)."""
    return simulate_pipeline(fwd, bwd, p2p, m, len(fwd), contention, procs)
