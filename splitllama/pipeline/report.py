"""Text tables and JSON for `StagePlan`s (pure Python)."""
from __future__ import annotations

from typing import Mapping, Optional

from splitllama.pipeline.plan import GiB, StagePlan

MEMORY_KINDS = ("params", "grads", "optimizer", "activations")


def plan_to_dict(p: StagePlan) -> dict:
    """A JSON-ready summary: layout, ratios, schedule estimates and per-stage rows (GiB)."""
    return {
        "method": p.method, "layout": str(p.layout), "vpp": p.vpp, "fits": p.fits,
        "bottleneck_over_ideal": p.bottleneck_over_ideal,
        "bottleneck_time_s": p.bottleneck_time, "total_time_s": p.total_time,
        "num_microbatches": p.num_microbatches, "bubble_fraction": p.bubble_fraction,
        "step_time_s": p.step_time_s, "pipeline_efficiency": p.pipeline_efficiency,
        "memory_budget_gib": None if p.memory_budget is None else p.memory_budget / GiB,
        "rank_times_s": p.rank_times, "rank_memory_gib": [x / GiB for x in p.rank_memory],
        "stages": [{"index": s.index, "units": s.units, "params": s.params, "gflops": s.gflops,
                    "time_s": s.time_s, "time_share": s.time_share, "in_flight": s.in_flight,
                    "fwd_s": s.fwd_s, "bwd_s": s.bwd_s, "overhead_s": s.overhead_s, "p2p_s": s.p2p_s,
                    "fits": s.fits, "memory_gib": {k: s.memory[k] / GiB for k in MEMORY_KINDS},
                    "memory_total_gib": s.memory_total / GiB} for s in p.stages],
    }


def _fmt_params(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.0f}M"


def summary_line(p: StagePlan) -> str:
    parts = [f"{p.method:<16} {str(p.layout):<28} bottleneck/ideal {p.bottleneck_over_ideal:5.3f}"]
    if p.step_time_s is not None:
        parts.append(f"bubble {p.bubble_fraction:6.2%}  step {p.step_time_s:8.2f} s  "
                     f"efficiency {p.pipeline_efficiency:6.2%}")
    parts.append("fits" if p.fits else "DOES NOT FIT")
    return "  ".join(parts)


def format_side_by_side(plans: Mapping[str, StagePlan]) -> str:
    """One row per stage; per plan: units, time share, memory (GiB), fits."""
    names = list(plans)
    cell = 36
    head = f"{'stage':>5} | " + " | ".join(f"{n:<{cell}}" for n in names)
    sub = f"{'':>5} | " + " | ".join(f"{'units':<14}{'time':>6}{'mem GiB':>9}{'fits':>7}" for _ in names)
    lines = [head, sub, "-" * len(head)]
    for k in range(max(len(p.stages) for p in plans.values())):
        cells = []
        for n in names:
            s = plans[n].stages[k] if k < len(plans[n].stages) else None
            cells.append(f"{'':<{cell}}" if s is None else
                         f"{s.units:<14}{s.time_share:>6.1%}{s.memory_total / GiB:>9.1f}"
                         f"{'yes' if s.fits else 'NO':>7}")
        lines.append(f"{k:>5} | " + " | ".join(c.ljust(cell) for c in cells))
    return "\n".join(lines)


def format_plan(p: StagePlan) -> str:
    """Detailed per-stage table of one plan: params, GFLOPs, time, memory by kind."""
    budget: Optional[str] = None if p.memory_budget is None else f"{p.memory_budget / GiB:.1f} GiB"
    cols = f"{'stage':>5} {'units':<16}{'params':>8}{'GFLOP/mb':>10}{'ms/mb':>8}{'share':>7}" \
           f"{'in-fl':>6}" + "".join(f"{k[:6]:>8}" for k in MEMORY_KINDS) + f"{'total':>8}  fits"
    lines = [f"[{p.method}] layout {p.layout}   (memory in GiB per GPU, budget {budget or 'none'})",
             cols, "-" * len(cols)]
    for s in p.stages:
        mem = "".join(f"{s.memory[k] / GiB:>8.2f}" for k in MEMORY_KINDS)
        lines.append(f"{s.index:>5} {s.units:<16}{_fmt_params(s.params):>8}{s.gflops:>10.0f}"
                     f"{s.time_s * 1e3:>8.1f}{s.time_share:>7.1%}{s.in_flight:>6}{mem}"
                     f"{s.memory_total / GiB:>8.2f}  {'yes' if s.fits else 'NO'}")
    return "\n".join(lines)
