"""Parallel layout settings (names follow Megatron-LM's flags)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional


@dataclass
class ParallelConfig:
    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    sequence_parallel: bool = False
    # Explicit stage plan, e.g. "L3|L1,A,U1|U2" (see splitllama.pipeline.layout). When None the
    # split is chosen by `pipeline_split`: cost (planner), uniform (Megatron default) or params.
    pipeline_layout: Optional[str] = None
    pipeline_split: str = "cost"
    use_distributed_optimizer: bool = True
    overlap_grad_reduce: bool = False  # DP grad reduce overlapped with backward (checked: same losses at DP=2)
    # Per-GPU memory budget the planner must respect (GiB); None: no memory constraint.
    memory_budget_gb: Optional[float] = None

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
