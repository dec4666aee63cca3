"""Where and how a job computes, decided once before torch.distributed starts: the device (on
CPU: gloo and the CPU harness), the precision, the layer implementation (Transformer Engine or
local) and the core attention backend. `resolve` puts them into the `RunPlan`; the profile key
(`profile_source.environment_key`) is made of the same decisions."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from splitllama.config.job import JobConfig


@dataclass(frozen=True)
class ComputeChoices:
    """Where and how a job computes (see `compute_choices`)."""

    on_cpu: bool
    bf16: bool
    transformer_impl: str
    attention_backend: str


def compute_choices(job: JobConfig, on_cpu: Optional[bool] = None) -> ComputeChoices:
    """THE place that decides the device (``on_cpu`` None: `splitllama.platform.cpu.wanted`,
    nothing enabled), the precision, the layer implementation and the attention backend."""
    from splitllama.model.attention import resolve_backend
    from splitllama.model.spec import resolve_impl

    if on_cpu is None:
        from splitllama.platform import cpu

        on_cpu = cpu.wanted()
    impl = resolve_impl(job.model.transformer_impl)
    return ComputeChoices(on_cpu, job.train.bf16 if job.train.bf16 is not None else not on_cpu, impl,
                          resolve_backend(job.model.attention_backend, impl))
