"""Process-group and model-parallel setup (gloo + CPU harness without a GPU, NCCL with one)."""
from __future__ import annotations

import datetime
import os
from typing import Optional

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

from splitllama.config.parallel import ParallelConfig
from splitllama.platform import cpu

# The CPU harness this module enabled (init_distributed), released by shutdown().
_harness: "cpu.Harness | None" = None


def init_distributed(parallel: ParallelConfig, seed: int = 1234, timeout_min: int = 10,
                     on_cpu: Optional[bool] = None) -> bool:
    """Initialise torch.distributed (env:// from torchrun/SLURM, or a 1-process group) and
    Megatron's model-parallel groups. Returns True when running on CPU. `parallel` is taken as
    validated (the training run's `splitllama.preflight.resolve.resolve` did it for this world
    size; Megatron-Core refuses sizes that do not divide it). ``on_cpu``: the plan's decision
    (`RunPlan.on_cpu`); None: `cpu.wanted` decides (callers without a plan)."""
    global _harness
    on_cpu = cpu.wanted() if on_cpu is None else on_cpu
    if on_cpu and _harness is None:
        _harness = cpu.enable()
    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(29500 + os.getpid() % 1000))
        os.environ.setdefault("RANK", "0")
        os.environ.setdefault("WORLD_SIZE", "1")
        if not on_cpu:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("gloo" if on_cpu else "nccl",
                                timeout=datetime.timedelta(minutes=timeout_min))
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=parallel.tensor_model_parallel_size,
            pipeline_model_parallel_size=parallel.pipeline_model_parallel_size,
            create_gloo_process_groups=True)
    set_seed(seed)
    return on_cpu


def set_seed(seed: int) -> None:
    """Megatron-LM's convention: every RNG seeded, offset by 100 per pipeline stage; the
    CUDA (or CPU stand-in) model-parallel tracker gets per-TP-rank streams."""
    import random

    import numpy

    seed = seed + 100 * parallel_state.get_pipeline_model_parallel_rank()
    random.seed(seed)
    numpy.random.seed(seed)
    torch.manual_seed(seed)
    model_parallel_cuda_manual_seed(seed)


def shutdown() -> None:
    """Tear down the model-parallel groups and the process group, then restore what the CPU
    harness patched (torch and Megatron are as before `init_distributed`)."""
    global _harness
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
    if _harness is not None:
        _harness.disable()
        _harness = None
