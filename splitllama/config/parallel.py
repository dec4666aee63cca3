"""Parallel layout settings (names follow Megatron-LM's flags)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional


@dataclass
class ParallelConfig:
    """Parallel layout: tensor, pipeline, sequence and data parallelism (Megatron-LM's names)."""

    tensor_model_parallel_size: int = 1
    """Tensor-parallel size (GPUs that split each layer's matrices)."""
    pipeline_model_parallel_size: int = 1
    """Pipeline stages; data-parallel size = world size / (tensor x pipeline)."""
    sequence_parallel: bool = False
    """Shard activations along the sequence in norms/dropout (needs tensor_model_parallel_size > 1)."""
    pipeline_layout: Optional[str] = None
    """Explicit stage plan, e.g. "L3|L1,A,U1|U2" (lower layers, Adapter, Upper layers per stage); null: chosen by pipeline_split."""
    pipeline_split: str = "cost"
    """How stages are split when pipeline_layout is null: cost (the planner), uniform (Megatron's) or params."""
    use_distributed_optimizer: bool = True
    """Shard optimizer state across data-parallel ranks (ZeRO-1)."""
    overlap_grad_reduce: bool = False
    """Overlap the data-parallel gradient reduction with the backward pass."""
    memory_budget_gb: Optional[float] = None
    """Per-GPU memory budget (GiB) the planner must respect; null: no memory constraint."""

    def validate(self, world_size: Optional[int] = None) -> None:
        tp, pp = self.tensor_model_parallel_size, self.pipeline_model_parallel_size
        if tp < 1 or pp < 1:
            raise ValueError(f"parallel sizes must be >= 1, got tp={tp} pp={pp}")
        if self.sequence_parallel and tp == 1:
            raise ValueError("parallel.sequence_parallel=true needs tensor_model_parallel_size > 1")
        if self.pipeline_split not in ("cost", "uniform", "params"):
            raise ValueError(f"parallel.pipeline_split must be cost|uniform|params, "
                             f"got '{self.pipeline_split}'")
        if world_size is not None and world_size % (tp * pp):
            raise ValueError(f"world size {world_size} is not divisible by tp*pp = {tp * pp}")
