"""Training-side sections: train loop, optimizer, checkpointing, logging."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from splitllama.config.validate import check_fields


@dataclass
class TrainConfig:
    """Training loop: length, batch sizes, evaluation, recomputation, numerics."""

    train_iters: Optional[int] = field(default=100, metadata={"ge": 1})
    """Optimizer steps to train for (global batches)."""
    train_samples: Optional[int] = field(default=None, metadata={"ge": 1})
    """Alternative to train_iters: samples to train on (train_iters = ceil(samples / global_batch_size))."""
    micro_batch_size: int = field(default=4, metadata={"ge": 1})
    """Samples per forward/backward on one data-parallel rank."""
    global_batch_size: int = field(default=8, metadata={"ge": 1})
    """Samples per optimizer step over all data-parallel ranks (gradient accumulation fills the rest)."""
    seed: int = field(default=1234, metadata={"ge": 0})
    """Random seed (initialisation, data shuffling, dropout); +100 per pipeline stage."""
    eval_interval: int = field(default=50, metadata={"ge": 0})
    """Evaluate on the validation split every this many iterations (0: never)."""
    eval_iters: int = field(default=4, metadata={"ge": 0})
    """Global batches per evaluation."""
    eval_only: bool = False
    """Evaluate checkpoint.load on the validation split, print {"eval_loss": ...} and exit."""
    recompute_granularity: Optional[str] = field(default=None, metadata={"choices": ("full", "selective")})
    """Activation recomputation: null (none), full or selective."""
    recompute_method: Optional[str] = field(default=None, metadata={"choices": ("uniform", "block")})
    """With full recomputation: uniform or block (Megatron's --recompute-method); null: uniform."""
    recompute_num_layers: Optional[int] = field(default=None, metadata={"ge": 1})
    """With full recomputation: layers per recomputed chunk (uniform) or recomputed layers per stage (block)."""
    bf16: Optional[bool] = None
    """bf16 parameters and compute; null: bf16 on GPU, fp32 on CPU."""
    max_consecutive_skipped: int = field(default=5, metadata={"ge": 1})
    """Stop after this many iterations in a row with NaN/inf loss or gradients (each one is skipped)."""
    exit_after_iters: Optional[int] = field(default=None, metadata={"ge": 1})
    """Stop (with a checkpoint when checkpoint.save is set) after this many iterations of this run."""

    def check_values(self) -> None:
        """The fields (types, ranges: their metadata) and their relations (no parallel layout needed)."""
        check_fields(self, "train")
        if self.train_iters is None and self.train_samples is None:
            raise ValueError("set train.train_iters or train.train_samples")
        if self.recompute_granularity != "full":
            for name in ("recompute_method", "recompute_num_layers"):
                if getattr(self, name) is not None:
                    raise ValueError(f"train.{name}={getattr(self, name)!r} needs "
                                     f"train.recompute_granularity=full (got {self.recompute_granularity!r})")

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

    optimizer: str = field(default="adam", metadata={"choices": ("adam", "sgd")})
    """adam (AdamW: decoupled weight decay) or sgd."""
    lr: float = field(default=3e-3, metadata={"gt": 0})
    """Peak learning rate, reached after the warmup."""
    min_lr: float = field(default=3e-4, metadata={"ge": 0})
    """Learning rate at the end of the decay."""
    lr_warmup_iters: int = field(default=10, metadata={"ge": 0})
    """Iterations of linear warmup from 0 to lr."""
    lr_decay_style: str = field(default="cosine", metadata={"choices": ("cosine", "linear", "constant")})
    """Decay from lr to min_lr after the warmup: cosine, linear or constant."""
    lr_decay_iters: Optional[int] = field(default=None, metadata={"ge": 1})
    """Iterations over which the learning rate decays; null: the training length."""
    weight_decay: float = field(default=0.01, metadata={"ge": 0})
    """Decoupled weight decay coefficient."""
    adam_beta1: float = field(default=0.9, metadata={"ge": 0, "lt": 1})
    """Adam beta1."""
    adam_beta2: float = field(default=0.95, metadata={"ge": 0, "lt": 1})
    """Adam beta2."""
    adam_eps: float = field(default=1e-8, metadata={"gt": 0})
    """Adam epsilon."""
    clip_grad: float = field(default=1.0, metadata={"ge": 0})
    """Clip the global gradient norm to this value (0: no clipping)."""

    def check_values(self) -> None:
        """Relations of the fields: min_lr <= lr."""
        if self.min_lr > self.lr:
            raise ValueError(f"optimizer.min_lr={self.min_lr} is above optimizer.lr={self.lr}: "
                             f"the decay goes from lr down to min_lr (need min_lr <= lr)")


@dataclass
class CheckpointConfig:
    """Saving and loading checkpoints (torch_dist, reshardable to any TP/PP/DP)."""

    save: Optional[str] = None
    """Directory to save checkpoints to (iter_NNNNNNN subdirectories and a 'latest' file); null: no saving."""
    save_interval: Optional[int] = field(default=None, metadata={"ge": 1})
    """Save every this many iterations; a final checkpoint is saved at the end either way."""
    load: Optional[str] = None
    """Checkpoint root or iter_ directory to resume from (equal to save: resume if present, else start)."""
    finetune: bool = False
    """With load: take the weights only (fresh optimizer, iteration 0)."""
    async_save: bool = False
    """Write checkpoints in a background process while training continues."""
    keep_last: Optional[int] = field(default=None, metadata={"ge": 1})
    """Keep only the newest this many complete checkpoints in checkpoint.save; null: keep all
    (the one 'latest' names is never pruned)."""
    save_on_signal: bool = True
    """On SIGTERM / SIGUSR1 (preemption): save a checkpoint (when save is set) and exit 0."""
    override_opt_param_scheduler: bool = False
    """On resume: apply this run's learning-rate schedule (optimizer.lr, min_lr, warmup, decay, weight_decay, train.global_batch_size) where it differs from the checkpoint's (Megatron's --override-opt_param-scheduler); false: such a difference is refused, naming each key."""
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

    log_interval: int = field(default=10, metadata={"ge": 1})
    """Print (and record) an iteration line every this many iterations."""
    metrics_file: Optional[str] = None
    """Append one JSON object per logged iteration and evaluation to this file (rank 0)."""
    tensorboard_dir: Optional[str] = None
    """Write TensorBoard scalars here (needs the tensorboard package: pip install -e '.[logging]')."""
    wandb_project: Optional[str] = None
    """Log to this Weights & Biases project (needs wandb: pip install -e '.[logging]')."""
    wandb_mode: str = field(default="offline", metadata={"choices": ("offline", "online", "disabled")})
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
