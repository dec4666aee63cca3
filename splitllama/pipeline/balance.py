"""Live pipeline balance: measured per-stage busy times -> balance numbers and a better layout
(pure Python, no torch).

Each stage measures its own compute time per step (forward + backward of its micro-batches,
not the time spent waiting on its neighbours). From those:

* ``measured_bottleneck_over_ideal`` = max stage busy * pp / sum of stage busy (1.0 = balanced);
* the **measured costs**: the run's unit costs (analytic today, profiled when a profile is
  used; whatever the caller passes) with every unit of stage k scaled by
  ``measured busy of k / predicted time of k``, so each stage's predicted time equals its
  measured time (with a profile's host contention the prediction is the simulated schedule's
  compute time as experienced, slowdown during overlap included, since that is what the busy
  time measures). This is exact when the cost model's error is uniform inside a stage and a
  first-order correction otherwise (a rerun with the suggested layout reports again);
* the exact planner (`splitllama.pipeline.plan.plan`, 1F1B, the run's memory budget and
  micro-batch count) over the measured costs, compared with the current layout costed the
  same way (`evaluate`). A layout predicted at least ``threshold`` (default 1.05, i.e. >= 5 %)
  faster is suggested as the exact ``parallel.pipeline_layout=`` string.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional, Sequence

from splitllama.pipeline.cost import Unit
from splitllama.pipeline.layout import PipelineLayout
from splitllama.pipeline.plan import StageOverhead, evaluate, plan

SUGGEST_THRESHOLD = 1.05  # suggest a layout predicted >= 5 % faster


@dataclass(frozen=True)
class BalanceReport:
    layout: str  # the layout that ran
    stage_busy_s: tuple[float, ...]  # per step: forward + backward compute of the stage's micro-batches
    measured_bottleneck_over_ideal: Optional[float]
    predicted_step_s: Optional[float]  # the run's plan (its unit costs)
    measured_step_s: Optional[float]  # wall clock per iteration
    suggested_layout: Optional[str]  # predicted >= threshold faster over the measured costs
    suggested_speedup: Optional[float]  # current / best predicted step over the measured costs
    report_s: Optional[float] = None  # what gathering + analysing cost (set by the training loop)

    @property
    def busy_share(self) -> tuple[float, ...]:
        total = sum(self.stage_busy_s)
        return tuple(b / total if total else 0.0 for b in self.stage_busy_s)

    def to_dict(self) -> dict:
        return {"layout": self.layout, "stage_busy_s": list(self.stage_busy_s),
                "measured_bottleneck_over_ideal": self.measured_bottleneck_over_ideal,
                "predicted_step_s": self.predicted_step_s, "measured_step_s": self.measured_step_s,
                "suggested_layout": self.suggested_layout, "suggested_speedup": self.suggested_speedup,
                "report_s": self.report_s}

    def line(self, iteration: int) -> str:
        """One printed line: busy share per stage, bottleneck/ideal, predicted vs measured step
        and either the suggestion or 'balanced'."""
        share = " ".join(f"{s:.0%}" for s in self.busy_share)
        ratio = "n/a" if self.measured_bottleneck_over_ideal is None else f"{self.measured_bottleneck_over_ideal:.3f}"
        pred = "n/a" if self.predicted_step_s is None else f"{self.predicted_step_s:.4g} s"
        meas = "n/a" if self.measured_step_s is None else f"{self.measured_step_s:.4g} s"
        if self.suggested_layout:
            verdict = (f"UNBALANCED: try parallel.pipeline_layout={self.suggested_layout} "
                       f"(predicted {self.suggested_speedup:.2f}x faster at the measured costs)")
        elif self.measured_bottleneck_over_ideal is None:
            verdict = "no compute measured"
        else:
            verdict = f"balanced (no layout predicted >= {SUGGEST_THRESHOLD - 1:.0%} faster)"
        return (f"[pipeline balance] iter {iteration} | layout {self.layout} | stage busy share {share} | "
                f"bottleneck/ideal {ratio} | step predicted {pred}, measured {meas} | {verdict}")


def _layout(layout: PipelineLayout | str) -> PipelineLayout:
    return PipelineLayout.parse(layout) if isinstance(layout, str) else layout


def stage_of_units(layout: PipelineLayout | str, num_units: int) -> list[int]:
    """Stage index of every unit of the chain (embedding on stage 0, head on the last)."""
    layout = _layout(layout)
    owner = [0]
    for k, s in enumerate(layout.stages):
        owner += [k] * (s.lower_layers + int(s.adapter) + s.upper_layers)
    owner.append(layout.pp - 1)
    if len(owner) != num_units:
        raise ValueError(f"pipeline layout '{layout}' holds {len(owner)} units (embedding and head "
                         f"included), the unit chain has {num_units}")
    return owner


def measured_units(units: Sequence[Unit], layout: PipelineLayout | str,
                   busy_per_microbatch_s: Sequence[float],
                   predicted_per_microbatch_s: Optional[Sequence[float]] = None) -> list[Unit]:
    """The units with each stage's times scaled so that the stage's predicted fwd+bwd time per
    micro-batch equals its measured busy time (memory and FLOPs unchanged). The prediction is
    the units' solo time unless ``predicted_per_microbatch_s`` gives it (with host contention:
    the compute time as experienced in the simulated schedule, which the busy time measures)."""
    owner = stage_of_units(layout, len(units))
    pp = _layout(layout).pp
    if len(busy_per_microbatch_s) != pp:
        raise ValueError(f"{len(busy_per_microbatch_s)} stage times for a {pp}-stage layout")
    predicted = [0.0] * pp
    for u, k in zip(units, owner):
        predicted[k] += u.time
    if predicted_per_microbatch_s is not None:
        predicted = [float(x) for x in predicted_per_microbatch_s]
    for k, (p, b) in enumerate(zip(predicted, busy_per_microbatch_s)):
        if p <= 0 or b < 0:
            raise ValueError(f"stage {k}: cannot scale a predicted time of {p} s to a measured {b} s")
    return [replace(u, fwd_time=u.fwd_time * busy_per_microbatch_s[k] / predicted[k],
                    bwd_time=u.bwd_time * busy_per_microbatch_s[k] / predicted[k])
            for u, k in zip(units, owner)]


def analyze(units: Sequence[Unit], layout: PipelineLayout | str, stage_busy_s: Sequence[float],
            num_microbatches: int, *, memory_budget: Optional[float] = None,
            stage_overhead: Optional[StageOverhead] = None, predicted_step_s: Optional[float] = None, measured_step_s: Optional[float] = None,
            threshold: float = SUGGEST_THRESHOLD) -> BalanceReport:
    """Balance of the layout that ran, from each stage's busy seconds per step.

    ``units``: the run's unit costs (their source is the caller's choice); ``stage_busy_s``:
    per stage, forward + backward compute seconds per step (``num_microbatches`` micro-batches);
    ``memory_budget``: bytes per GPU the suggested layout must fit (None: unconstrained);
    ``stage_overhead``: the per-stage costs of a profile (step time then includes them, so the
    suggestion is what the profile planner would choose over the measured unit costs)."""
    layout = _layout(layout)
    pp = layout.pp
    busy = tuple(float(b) for b in stage_busy_s)
    total = sum(busy)
    ratio = max(busy) * pp / total if total > 0 else None
    suggestion = speedup = None
    if ratio is not None and min(busy) > 0 and pp > 1:
        experienced = None
        if stage_overhead is not None and stage_overhead.host_contention != 1.0:
            sim = evaluate(layout, units, pp, None, num_microbatches, stage_overhead=stage_overhead).simulate()
            experienced = [b / num_microbatches for b in sim[2]]
        scaled = measured_units(units, layout, [b / num_microbatches for b in busy], experienced)
        current = evaluate(layout, scaled, pp, memory_budget, num_microbatches,
                           stage_overhead=stage_overhead)
        try:
            best = plan(scaled, pp, "1f1b", memory_budget, num_microbatches,
                        stage_overhead=stage_overhead)
        except ValueError:  # nothing fits the budget: nothing to suggest
            best = None
        if best is not None:
            speedup = current.step_time_s / best.step_time_s
            if speedup >= threshold and best.layout != layout:
                suggestion = str(best.layout)
    return BalanceReport(str(layout), busy, ratio, predicted_step_s, measured_step_s, suggestion, speedup)
