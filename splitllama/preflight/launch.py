"""The job checks that need no process group, run before torch.distributed starts (so that a
bad config is one `error:` line, not a traceback per rank): the resolve step for the
launcher's world size."""
from __future__ import annotations

import os

from splitllama.config.job import JobConfig
from splitllama.preflight.resolve import RunPlan, resolve


def world_size() -> int:
    """The number of processes the launcher starts (torchrun / SLURM env://; 1 alone)."""
    return int(os.environ.get("WORLD_SIZE", "1") or 1)


def run_plan(job: JobConfig) -> RunPlan:
    """Validate every section against the parallel layout of this launch; the run's plan."""
    return resolve(job, world_size())
