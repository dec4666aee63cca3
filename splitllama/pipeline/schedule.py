"""Simulated step of Megatron's non-interleaved 1F1B schedule (pure Python, no torch).

``one_f_one_b_makespan``: each stage's operations take fixed times (one device per stage).

``simulate_1f1b`` adds **host contention**: when the stage processes share one host's compute
(a CPU box: 2 processes x 1 thread on 2 vCPUs measured every unit 22-36 % slower while both
computed), a stage computing while ``a`` stages compute runs ``slowdown(a)`` times slower, with
``slowdown(1) = 1`` and ``slowdown(procs) = contention`` (measured by the profile with ``procs``
processes computing at once), linear in between and beyond. It is an event-driven simulation:
the busy set changes only when an operation starts or ends, and between those instants every
busy stage progresses at the same rate. ``contention == 1`` gives exactly
``one_f_one_b_makespan``, which is kept as the fast path: it is O(pp * m) per split, and the
planner scores up to 3000 splits; the event-driven loop costs a factor pp more. Per stage it also returns the compute seconds as experienced (what the
live balance report measures), which exceed the solo times by the slowdown during overlap.
"""
from __future__ import annotations

from typing import Sequence


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


def one_f_one_b_makespan(fwd: Sequence[float], bwd: Sequence[float], p2p: Sequence[float],
                         m: int) -> tuple[float, list[float]]:
    """Makespan of Megatron's non-interleaved 1F1B schedule
    (``forward_backward_pipelining_without_interleaving``) and each stage's finish time: F(k, j)
    waits for F(k-1, j) plus ``p2p[k-1]``, B(k, j) for B(k+1, j) plus ``p2p[k]`` (the blocking
    send/recv pairs wait on exactly these)."""
    pp = len(fwd)
    orders = one_f_one_b_orders(pp, m)
    done: dict = {}
    pos, clock = [0] * pp, [0.0] * pp
    remaining = pp * 2 * m
    while remaining:
        progressed = False
        for k in range(pp):
            while pos[k] < len(orders[k]):
                op, j = orders[k][pos[k]]
                if op == "F":
                    dep = None if k == 0 else done.get(("F", k - 1, j))
                    if k and dep is None:
                        break
                    start = max(clock[k], dep + p2p[k - 1] if k else 0.0)
                    clock[k] = start + fwd[k]
                else:
                    dep = None if k == pp - 1 else done.get(("B", k + 1, j))
                    if k < pp - 1 and dep is None:
                        break
                    start = max(clock[k], dep + p2p[k] if k < pp - 1 else 0.0)
                    clock[k] = start + bwd[k]
                done[(op, k, j)] = clock[k]
                pos[k] += 1
                remaining -= 1
                progressed = True
        if not progressed:  # cannot happen for 1F1B; guard against an endless loop
            raise RuntimeError("1F1B simulation deadlocked")
    return max(clock), clock


def slowdown(busy: int, contention: float, procs: int) -> float:
    """How much slower each of ``busy`` concurrently computing stages runs."""
    if busy <= 1 or contention == 1.0 or procs <= 1:
        return 1.0
    return 1.0 + (contention - 1.0) * (busy - 1) / (procs - 1)


def simulate_1f1b(fwd: Sequence[float], bwd: Sequence[float], p2p: Sequence[float], m: int,
                  contention: float = 1.0, procs: int = 2) -> tuple[float, list[float], list[float]]:
    """(makespan, per-stage finish time, per-stage compute seconds as experienced) of 1F1B with
    host contention (see the module docstring); ``fwd``/``bwd`` are solo times per micro-batch."""
    pp = len(fwd)
    if contention == 1.0:
        span, finish = one_f_one_b_makespan(fwd, bwd, p2p, m)
        return span, finish, [m * (f + b) for f, b in zip(fwd, bwd)]
    if contention <= 0:
        raise ValueError(f"host contention must be > 0, got {contention}")
    orders = one_f_one_b_orders(pp, m)
    done: dict = {}
    pos, finish, busy_s = [0] * pp, [0.0] * pp, [0.0] * pp
    running: list = [None] * pp  # [op, j, solo seconds left]
    t, eps = 0.0, 1e-12

    def ready_at(k: int):
        op, j = orders[k][pos[k]]
        if op == "F":
            if k == 0:
                return 0.0
            d = done.get(("F", k - 1, j))
            return None if d is None else d + p2p[k - 1]
        if k == pp - 1:
            return 0.0
        d = done.get(("B", k + 1, j))
        return None if d is None else d + p2p[k]

    while True:
        waiting = []
        for k in range(pp):
            if running[k] is None and pos[k] < len(orders[k]):
                r = ready_at(k)
                if r is not None and r <= t + eps:
                    op, j = orders[k][pos[k]]
                    running[k] = [op, j, fwd[k] if op == "F" else bwd[k]]
                elif r is not None:
                    waiting.append(r)
        active = [k for k in range(pp) if running[k] is not None]
        if not active:
            if not waiting:
                if any(pos[k] < len(orders[k]) for k in range(pp)):
                    raise RuntimeError("1F1B simulation deadlocked")
                break
            t = min(waiting)
            continue
        rate = 1.0 / slowdown(len(active), contention, procs)
        t_next = min([t + running[k][2] / rate for k in active] + waiting)
        dt = t_next - t
        for k in active:
            running[k][2] -= dt * rate
            busy_s[k] += dt
            if running[k][2] <= eps * max(1.0, fwd[k] + bwd[k]):
                op, j, _ = running[k]
                done[(op, k, j)] = finish[k] = t_next
                pos[k] += 1
                running[k] = None
        t = t_next
    return max(finish), finish, busy_s
