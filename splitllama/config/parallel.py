"""Parallel layout settings (names follow Megatron-LM's flags)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional


@dataclass
class ParallelConfig:
    """Parallel layout: tensor, pipeline, sequence and data parallelism (Megatron-LM's names)."""

    tensor_model_parallel_size: int = field(default=1, metadata={"ge": 1})
    """Tensor-parallel size (GPUs that split each layer's matrices)."""
    pipeline_model_parallel_size: int = field(default=1, metadata={"ge": 1})
    """Pipeline stages; data-parallel size = world size / (tensor x pipeline)."""
    sequence_parallel: bool = False
    """Shard activations along the sequence in norms/dropout (needs tensor_model_parallel_size > 1)."""
    pipeline_layout: Optional[str] = None
    """Explicit stage plan, e.g. "L3|L1,A,U1|U2" (lower layers, Adapter, Upper layers per stage); null: chosen by pipeline_split."""
    pipeline_split: str = field(default="cost", metadata={"choices": ("cost", "uniform", "params", "profile")})
    """How stages are split when pipeline_layout is null: cost (the planner over analytic costs), uniform (Megatron's), params, or profile (the planner over the measured unit times of profile_file)."""
    use_distributed_optimizer: bool = True
    """Shard optimizer state across data-parallel ranks (ZeRO-1)."""
    overlap_grad_reduce: bool = False
    """Overlap the data-parallel gradient reduction with the backward pass."""
    memory_budget_gb: Optional[float] = field(default=None, metadata={"gt": 0})
    """Per-GPU memory budget (GiB) the planner must respect; null: no memory constraint."""
    profile_file: Optional[str] = None
    """JSON unit profile (tools/plan_pipeline.py --profile --profile-out FILE) used by pipeline_split=profile; with pipeline_split=cost it calibrates the analytic model. Its shapes, dtype and versions must match the job's."""
    profile_if_missing: bool = False
    """With pipeline_split=profile: take a fresh profile into profile_file when the file does not exist (TP=1 jobs; else profile first under torchrun)."""

    def validate(self, world_size: Optional[int] = None) -> None:
        tp, pp = self.tensor_model_parallel_size, self.pipeline_model_parallel_size
        if tp < 1 or pp < 1:
            raise ValueError(f"parallel sizes must be >= 1, got tp={tp} pp={pp}")
        if self.sequence_parallel and tp == 1:
            raise ValueError("parallel.sequence_parallel=true needs tensor_model_parallel_size > 1")
        if self.pipeline_split not in ("cost", "uniform", "params", "profile"):
            raise ValueError(f"parallel.pipeline_split must be cost|uniform|params|profile, "
                             f"got '{self.pipeline_split}'")
        if self.pipeline_split == "profile" and not self.profile_file:
            raise ValueError("parallel.pipeline_split=profile needs parallel.profile_file (take one with "
                             "tools/plan_pipeline.py --profile --profile-out FILE)")
        if self.profile_if_missing and not self.profile_file:
            raise ValueError("parallel.profile_if_missing=true needs parallel.profile_file (where to write it)")
        if world_size is not None and world_size % (tp * pp):
            raise ValueError(f"world size {world_size} is not divisible by tp*pp = {tp * pp}")
