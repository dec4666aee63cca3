"""Training with parallel.pipeline_split=profile at PP=2 (torchrun, 2 processes): the app builds the
layout the planner makes over the profile's measured units, reading the profile file (no
re-profiling), and a profile taken at another sequence length is one `error:` naming the key."""
from __future__ import annotations

import os
import re

import pytest

from tests import apprun
from tests.launch import REPO

pytestmark = pytest.mark.distributed

# upper layers cost 10x a lower layer: the profile plan moves upper layers to stage 0
TIMES = {"embedding": (0.001, 0.001), "lower": (0.001, 0.002), "adapter": (0.001, 0.001),
         "upper": (0.010, 0.020), "head": (0.005, 0.010)}


def _write_profile(path: str, **key_over) -> str:
    from splitllama.config.job import load_job_config
    from splitllama.pipeline.measured import (Profile, StepCosts, UnitTiming, job_key, stage_overhead,
                                              units_from_profile, write_profile)
    from splitllama.pipeline.plan import plan
    from splitllama.preflight.profile_source import environment_key

    job = load_job_config(str(REPO / "configs" / "tiny.yaml"), ["parallel.pipeline_model_parallel_size=2"])
    key = {**job_key(job), **environment_key(job), "threads": 1, **key_over}  # apprun: OMP_NUM_THREADS=1
    prof = Profile(key, {k: UnitTiming(f, b) for k, (f, b) in TIMES.items()},
                   StepCosts(1e-9, 1e-9, 1e-4, 1e-4, 1e-9), {"synthetic": True})
    write_profile(prof, path)
    m = job.train.global_batch_size // job.train.micro_batch_size
    return str(plan(units_from_profile(prof, job.model), 2, "1f1b", None, m, stage_overhead=stage_overhead(prof)).layout)


def test_app_trains_with_profile_split(tmp_path):
    path = str(tmp_path / "profile.json")
    layout = _write_profile(path)
    assert layout != "L2,A,U1|U2"  # not the uniform split: the measured costs decide
    mtime = os.path.getmtime(path)
    p = apprun.run(2, ["parallel.pipeline_model_parallel_size=2", "parallel.pipeline_split=profile",
                       f"parallel.profile_file={path}", "train.train_iters=2"])
    assert f"pipeline layout: {layout} |" in p.stdout, p.stdout[-3000:]
    assert "profiling" not in p.stdout and os.path.getmtime(path) == mtime


def test_app_refuses_profile_of_other_seq_length(tmp_path):
    path = str(tmp_path / "profile.json")
    _write_profile(path, seq_length=32)
    p = apprun.run(2, ["parallel.pipeline_model_parallel_size=2", "parallel.pipeline_split=profile",
                       f"parallel.profile_file={path}", "train.train_iters=2"], check=False)
    # torchrun exits 1 when a child fails; the child's own status (2: bad input) is in its summary
    assert p.returncode != 0 and re.search(r"exitcode\s*:\s*2\b", p.stderr), p.stderr[-3000:]
    errors = [ln for ln in p.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "key 'seq_length' is 32 in the profile but 64 here" in errors[0], p.stderr[-3000:]


def test_profile_if_missing_under_torchrun(tmp_path):
    """``parallel.profile_if_missing=true`` in a torchrun launch: rank 0 profiles in a fresh
    one-process helper (which measures host contention with a helper of its own), the other
    rank waits for the file, and both train with the profile plan. The helpers must not
    inherit torchrun's agent-store variables: with TORCHELASTIC_USE_AGENT_STORE=True a
    one-process init_process_group waits forever for a store nobody serves (seen: the launch
    hung)."""
    import json

    path = str(tmp_path / "taken.json")
    p = apprun.run(2, ["parallel.pipeline_model_parallel_size=2", "parallel.pipeline_split=profile",
                       f"parallel.profile_file={path}", "parallel.profile_if_missing=true",
                       "train.train_iters=2"], timeout=300)
    assert "profiling the job's units into" in p.stdout and "pipeline layout:" in p.stdout, p.stdout[-3000:]
    with open(path) as f:
        costs = json.load(f)["costs"]
    assert costs["contention_procs"] == 2 and "measured" in costs["contention_source"], costs
