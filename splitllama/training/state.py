"""Progress counters saved with every checkpoint (as JSON, never pickled)."""
from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass
class TrainState:
    iteration: int = 0
    consumed_train_samples: int = 0
    skipped_iterations: int = 0
    consecutive_skipped: int = 0
    floating_point_operations: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainState":
        """Keys this class does not know are ignored: train_state.json also holds the scheduler
        and layout, and older checkpoints hold `consumed_valid_samples` (never advanced)."""
        return cls(**{k: d[k] for k in asdict(cls()) if k in d})
