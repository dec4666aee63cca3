"""Training-side sections: train loop, optimizer, checkpointing, logging."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional


@dataclass
class TrainConfig:
    train_iters: Optional[int] = 100
    train_samples: Optional[int] = None  # alternative to train_iters
    micro_batch_size: int = 4
    global_batch_size: int = 8
    seed: int = 1234
    eval_interval: int = 50
    eval_iters: int = 4
    eval_only: bool = False
    recompute_granularity: Optional[str] = None  # None | full | selective
    recompute_method: Optional[str] = None
    recompute_num_layers: Optional[int] = None
    bf16: Optional[bool] = None  # None: bf16 on GPU, fp32 on CPU
    max_consecutive_skipped: int = 5  # stop after this many NaN/inf steps in a row
    exit_after_iters: Optional[int] = None  # stop (with a checkpoint) after this many iterations this run

    def check_values(self) -> None:
        """Ranges of the fields on their own (no parallel layout needed)."""
        if self.train_iters is None and self.train_samples is None:
            raise ValueError("set train.train_iters or train.train_samples")
        for name in ("train_iters", "train_samples", "micro_batch_size", "global_batch_size",
                     "max_consecutive_skipped", "exit_after_iters", "recompute_num_layers"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"train.{name} must be >= 1, got {value}")
        for name in ("eval_interval", "eval_iters"):
            if getattr(self, name) < 0:
                raise ValueError(f"train.{name} must be >= 0, got {getattr(self, name)}")

    def validate(self, dp: int) -> None:
        self.check_values()
        if self.global_batch_size % (self.micro_batch_size * dp):
            raise ValueError(f"train.global_batch_size {self.global_batch_size} is not divisible by "
                             f"micro_batch_size {self.micro_batch_size} x data-parallel size {dp}")
        if self.recompute_granularity not in (None, "full", "selective"):
            raise ValueError(f"train.recompute_granularity must be full|selective|null, "
                             f"got '{self.recompute_granularity}'")

    def total_iters(self) -> int:
        if self.train_iters is not None:
            return self.train_iters
        return -(-self.train_samples // self.global_batch_size)


@dataclass
class OptimizerConfig:
    optimizer: str = "adam"
    lr: float = 3e-3
    min_lr: float = 3e-4
    lr_warmup_iters: int = 10
    lr_decay_style: str = "cosine"  # cosine | linear | constant
    lr_decay_iters: Optional[int] = None  # default: train iters
    weight_decay: float = 0.01
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    clip_grad: float = 1.0


@dataclass
class CheckpointConfig:
    save: Optional[str] = None
    save_interval: Optional[int] = None
    load: Optional[str] = None
    finetune: bool = False  # load weights only: fresh optimizer, iteration 0
    async_save: bool = False
    keep_last: Optional[int] = None
    save_on_signal: bool = True  # SIGTERM / SIGUSR1: save then exit 0
    # A run that does not resume from `save` refuses to write into a directory that already
    # holds checkpoints (its saves and pruning would replace them) unless this is true.
    overwrite: bool = False

    def validate(self) -> None:
        for name in ("save_interval", "keep_last"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"checkpoint.{name} must be >= 1, got {value}")


@dataclass
class LoggingConfig:
    log_interval: int = 10
    metrics_file: Optional[str] = None
    tensorboard_dir: Optional[str] = None
    wandb_project: Optional[str] = None
    wandb_mode: str = "offline"
    progress: bool = True  # ETA (time left) on each iteration line

    def validate(self) -> None:
        if self.log_interval < 1:
            raise ValueError(f"logging.log_interval must be >= 1, got {self.log_interval}")
