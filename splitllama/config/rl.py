"""The RL hand-off section: weight syncs of the live model during a training run."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class RLConfig:
    """Weight sync for an RL rollout engine (splitllama.rl.sync; docs/serving_and_rl.md, Megatron route)."""

    sync_interval: int = 0
    """Every this many iterations, stream the live model's full weights in HF export names from all ranks
    (splitllama.convert.stream.stream_hf_weights; no rank holds the whole model) into the weight consumer an
    RL framework passed to splitllama.training.app.run_job; without one, log the tensors, bytes and a
    sha256 of the stream (equal to that of export-hf of a checkpoint of the same iteration). 0: off."""
    sync_bucket_mb: float = 64.0
    """Scratch buffer of the stream's row-parallel gathers, MiB (the stream holds at most the largest
    tensor plus this)."""

    def validate(self) -> None:
        if self.sync_interval < 0:
            raise ValueError(f"rl.sync_interval must be >= 0, got {self.sync_interval}")
        if not self.sync_bucket_mb > 0:
            raise ValueError(f"rl.sync_bucket_mb must be > 0, got {self.sync_bucket_mb}")
