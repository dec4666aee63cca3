"""Training-side sections: train loop, optimizer, checkpointing, logging."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional


@dataclass
class TrainConfig:
    """Training loop: length, batch sizes, evaluation, recomputation, numerics."""

    train_iters: Optional[int] = 100
    """Optimizer steps to train for (global batches)."""
    train_samples: Optional[int] = None
    """Alternative to train_iters: samples to train on (train_iters = ceil(samples / global_batch_size))."""
    micro_batch_size: int = 4
    """Samples per forward/backward on one data-parallel rank."""
    global_batch_size: int = 8
    """Samples per optimizer step over all data-parallel ranks (gradient accumulation fills the rest)."""
    seed: int = 1234
    """Random seed (initialisation, data shuffling, dropout); +100 per pipeline stage."""
    eval_interval: int = 50
    """Evaluate on the validation split every this many iterations (0: never)."""
    eval_iters: int = 4
    """Global batches per evaluation."""
    eval_only: bool = False
    """Evaluate checkpoint.load on the validation split, print {"eval_loss": ...} and exit."""
    recompute_granularity: Optional[str] = None
    """Activation recomputation: null (none), full or selective."""
    recompute_method: Optional[str] = None
    """With full recomputation: uniform or block (Megatron's --recompute-method); null: uniform."""
    recompute_num_layers: Optional[int] = None
    """With full recomputation: layers per recomputed chunk (uniform) or recomputed layers per stage (block)."""
    bf16: Optional[bool] = None
    """bf16 parameters and compute; null: bf16 on GPU, fp32 on CPU."""
    max_consecutive_skipped: int = 5
    """Stop after this many iterations in a row with NaN/inf loss or gradients (each one is skipped)."""
    exit_after_iters: Optional[int] = None
    """Stop (with a checkpoint when checkpoint.save is set) after this many iterations of this run."""

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
    """Optimizer and learning-rate schedule (Megatron-Core's distributed optimizer)."""

    optimizer: str = "adam"
    """adam (AdamW: decoupled weight decay) or sgd."""
    lr: float = 3e-3
    """Peak learning rate, reached after the warmup."""
    min_lr: float = 3e-4
    """Learning rate at the end of the decay."""
    lr_warmup_iters: int = 10
    """Iterations of linear warmup from 0 to lr."""
    lr_decay_style: str = "cosine"
    """Decay from lr to min_lr after the warmup: cosine, linear or constant."""
    lr_decay_iters: Optional[int] = None
    """Iterations over which the learning rate decays; null: the training length."""
    weight_decay: float = 0.01
    """Decoupled weight decay coefficient."""
    adam_beta1: float = 0.9
    """Adam beta1."""
    adam_beta2: float = 0.95
    """Adam beta2."""
    adam_eps: float = 1e-8
    """Adam epsilon."""
    clip_grad: float = 1.0
    """Clip the global gradient norm to this value (0: no clipping)."""


@dataclass
class CheckpointConfig:
    """Saving and loading checkpoints (torch_dist, reshardable to any TP/PP/DP)."""

    save: Optional[str] = None
    """Directory to save checkpoints to (iter_NNNNNNN subdirectories and a 'latest' file); null: no saving."""
    save_interval: Optional[int] = None
    """Save every this many iterations; a final checkpoint is saved at the end either way."""
    load: Optional[str] = None
    """Checkpoint root or iter_ directory to resume from (equal to save: resume if present, else start)."""
    finetune: bool = False
    """With load: take the weights only (fresh optimizer, iteration 0)."""
    async_save: bool = False
    """Write checkpoints in a background process while training continues."""
    keep_last: Optional[int] = None
    """Keep only the newest this many complete checkpoints in checkpoint.save; null: keep all
    (the one 'latest' names is never pruned)."""
    save_on_signal: bool = True
    """On SIGTERM / SIGUSR1 (preemption): save a checkpoint (when save is set) and exit 0."""
    overwrite: bool = False
    """Allow a run that does not resume from checkpoint.save to write into a directory that already holds checkpoints (its saves and pruning may replace them)."""

    def validate(self) -> None:
        for name in ("save_interval", "keep_last"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"checkpoint.{name} must be >= 1, got {value}")


@dataclass
class LoggingConfig:
    """Where the numbers go and how much is printed."""

    log_interval: int = 10
    """Print (and record) an iteration line every this many iterations."""
    metrics_file: Optional[str] = None
    """Append one JSON object per logged iteration and evaluation to this file (rank 0)."""
    tensorboard_dir: Optional[str] = None
    """Write TensorBoard scalars here (needs the tensorboard package: pip install -e '.[logging]')."""
    wandb_project: Optional[str] = None
    """Log to this Weights & Biases project (needs wandb: pip install -e '.[logging]')."""
    wandb_mode: str = "offline"
    """WANDB_MODE when not set in the environment: offline, online or disabled."""
    progress: bool = True
    """Show the ETA (time left) on each iteration line."""
    pipeline_balance: bool = True
    """PP > 1: every stage times its forward/backward compute; each log interval prints a [pipeline balance] line (busy share per stage, bottleneck/ideal, predicted vs measured step, a parallel.pipeline_layout= predicted >= 5% faster) and adds pipeline_balance to the metrics file. No effect at PP = 1."""
    verbose: bool = False
    """Also print library diagnostics (Megatron's config dumps, bucket lists, TE/Apex fallback warnings) and the full YAML config; -v on the command line."""

    def validate(self) -> None:
        if self.log_interval < 1:
            raise ValueError(f"logging.log_interval must be >= 1, got {self.log_interval}")
