"""The live pipeline balance report of a training run (PP > 1, ``logging.pipeline_balance``).

Every stage times its own forward / backward compute (`stage_timers`, plugged into
Megatron-Core's schedules); once per log interval the stages' busy seconds are all-gathered
over the pipeline group (one tiny collective) and analysed by the pure
`splitllama.pipeline.balance.analyze` on global rank 0, which prints the line; the metrics
record gets the ``pipeline_balance`` object. Cost per log interval: the all-gather plus one exact
plan (about 1 ms for the tiny chain, 45 / 85 ms for N=32 + M=8 at PP=4 / 8 on this CPU box)."""
from __future__ import annotations

import time
from dataclasses import replace
from typing import Optional

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps

from splitllama.pipeline.balance import BalanceReport, analyze
from splitllama.pipeline.plan import evaluate
from splitllama.platform.device import device as local_device
from splitllama.training.stage_timers import StageTimers
from splitllama.training.runtime import Runtime


class BalanceMonitor:
    def __init__(self, rt: Runtime) -> None:
        """The run's unit costs are those its pipeline split was chosen on (``rt.plan.split``,
        with the profile's per-stage costs when ``parallel.pipeline_split=profile``)."""
        split = rt.plan.split
        self.pp = ps.get_pipeline_model_parallel_world_size()
        self.layout = rt.layout
        self.num_microbatches = rt.num_microbatches
        self.units, self.overhead, self.budget = list(split.units), split.stage_overhead, split.memory_budget
        self.predicted_step_s = evaluate(self.layout, self.units, self.pp, self.budget,
                                         self.num_microbatches,
                                         stage_overhead=self.overhead).step_time_s
        self.timers = StageTimers(cuda=not rt.on_cpu)
        rt.inner.config.timers = self.timers  # the config Megatron's schedules read

    def stage_busy_s(self, iterations: int) -> list[float]:
        """Each stage's forward + backward compute seconds per step since the last call
        (collective over the pipeline group)."""
        times = self.timers.read()
        mine = torch.tensor([times["forward-compute"][0] + times["backward-compute"][0]],
                            dtype=torch.float64, device=local_device())
        out = [torch.zeros_like(mine) for _ in range(self.pp)]
        dist.all_gather(out, mine, group=ps.get_pipeline_model_parallel_group())
        return [t.item() / max(iterations, 1) for t in out]

    def collect(self, iterations: int, measured_step_s: float) -> Optional[BalanceReport]:
        """The report over the last ``iterations`` steps: call on every rank; analysed and
        returned on global rank 0 only (None elsewhere). Its ``report_s``: the seconds this call
        took (all-gather, waiting for the other stages included, + analysis)."""
        t0 = time.perf_counter()
        busy = self.stage_busy_s(iterations)
        if dist.get_rank() != 0:
            return None
        r = analyze(self.units, self.layout, busy, self.num_microbatches,
                    memory_budget=self.budget, stage_overhead=self.overhead,
                    predicted_step_s=self.predicted_step_s,
                    measured_step_s=measured_step_s)
        return replace(r, report_s=time.perf_counter() - t0)


def start(rt: Runtime) -> Optional[BalanceMonitor]:
    """A monitor when the run is pipelined and ``logging.pipeline_balance`` is on, else None."""
    if not rt.job.logging.pipeline_balance or ps.get_pipeline_model_parallel_world_size() == 1:
        return None
    return BalanceMonitor(rt)
