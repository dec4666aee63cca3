"""The job's unit profile before the run starts: the environment part of its key (device, dtype,
layer implementation, attention backend, threads, versions), reading and checking
``parallel.profile_file``, and, with ``parallel.profile_if_missing``, taking it first in a separate
one-process helper (``python -m splitllama.planning.profile_cli``: the profiler sits above
training/, so it is started as a process, never imported from here)."""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from typing import Callable, Optional

import torch

from splitllama.errors import UsageError
from splitllama.launch_env import rank as launch_rank
from splitllama.pipeline.measured import Profile, job_key, load_profile
from splitllama.preflight.compute import compute_choices


def _versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    try:
        mc = version("megatron-core")
    except PackageNotFoundError:
        import megatron.core

        mc = getattr(megatron.core, "__version__", "unknown")
    return {"torch": torch.__version__, "megatron_core": mc}


def environment_key(job) -> dict:
    """The environment part of a profile key, for the device this process runs on."""
    c = compute_choices(job)
    return {"device": "cpu" if c.on_cpu else "cuda",
            "device_name": _cpu_name() if c.on_cpu else torch.cuda.get_device_name(),
            "dtype": "bf16" if c.bf16 else "fp32", "transformer_impl": c.transformer_impl,
            "attention_backend": c.attention_backend,
            "threads": torch.get_num_threads() if c.on_cpu else None, **_versions()}


def _cpu_name() -> str:
    import platform

    try:
        with open("/proc/cpuinfo") as f:
            return next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")),
                        platform.processor() or "cpu")
    except OSError:
        return platform.processor() or "cpu"


LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "GROUP_WORLD_SIZE",
               "ROLE_RANK", "ROLE_WORLD_SIZE", "ROLE_NAME", "MASTER_ADDR", "MASTER_PORT")


def standalone_env(**extra: str) -> dict:
    """This process's environment without torchrun's launch variables, for a separate, one-process
    helper (a profile or a contention load) started from inside a launch. ``TORCHELASTIC_*`` go
    too: with TORCHELASTIC_USE_AGENT_STORE=True (torch 2.13's torchrun sets it) the helper's
    one-process ``init_process_group`` would wait forever for the launch agent's store."""
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARS and not k.startswith("TORCHELASTIC_")}
    env.update(extra)
    return env


def job_yaml(job, directory: str) -> str:
    """Write the job as a config file for such a helper; returns its path."""
    import yaml

    path = os.path.join(directory, "job.yaml")
    with open(path, "w") as f:
        yaml.safe_dump(job.to_dict(), f, sort_keys=False)
    return path


def take_profile_for_job(job, path: str, timeout_s: float = 1800.0) -> None:
    """``parallel.profile_if_missing``: profile in a fresh process (the job's own process group
    is not up yet) and write ``path``; other ranks of a launch wait for the file."""
    if job.parallel.tensor_model_parallel_size > 1:
        raise UsageError(f"parallel.profile_if_missing cannot profile at tensor_model_parallel_size="
                         f"{job.parallel.tensor_model_parallel_size} before the job starts; profile first: "
                         f"torchrun --nproc-per-node={job.parallel.tensor_model_parallel_size} "
                         f"tools/plan_pipeline.py --config JOB.yaml --profile --profile-out {path}")
    if launch_rank() != 0:
        t0 = time.time()
        while not os.path.isfile(path):
            if time.time() - t0 > timeout_s:
                raise TimeoutError(f"waited {timeout_s:.0f} s for rank 0 to write the profile {path}")
            time.sleep(1.0)
        return
    with tempfile.TemporaryDirectory(prefix="splitllama_profile_") as tmp:
        cfg = job_yaml(job, tmp)
        env = standalone_env()
        print(f"profiling the job's units into {path} (parallel.profile_if_missing=true) ...", flush=True)
        p = subprocess.run([sys.executable, "-m", "splitllama.planning.profile_cli", "--config", cfg,
                            "--profile-out", path], env=env, capture_output=True, text=True)
        if p.returncode != 0:
            raise RuntimeError(f"profiling failed (exit {p.returncode}):\n{p.stderr[-4000:]}")



def _expected_key(job) -> dict:
    return {**job_key(job), **environment_key(job)}


def job_profile(job, take: Optional[Callable] = None) -> Optional[Profile]:
    """The job's profile (``parallel.profile_file``) checked against its key; None when no file is
    configured. With ``parallel.profile_if_missing`` a missing file is profiled first (``take``,
    default `take_profile_for_job`)."""
    par = job.parallel
    if not par.profile_file:
        return None
    if not os.path.isfile(par.profile_file) and par.profile_if_missing:
        (take or take_profile_for_job)(job, par.profile_file)
    return load_profile(par.profile_file, _expected_key(job))
