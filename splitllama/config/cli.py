"""Command line of the training entry point: ``--config FILE``, ``-v`` and ``section.key=value``
overrides; ``--help`` lists every config key (generated from the config dataclasses).

Imports neither torch nor Megatron, so ``--help`` answers in a fraction of a second.
"""
from __future__ import annotations

import argparse
import sys
from typing import Optional

from splitllama.config.docs import config_reference
from splitllama.config.job import JobConfig, load_job_config, normalize_argv

TRAIN_USAGE = """\
Train a SplitLlama model on Megatron-Core (also adapter-only warmup: model.freeze=all_but_adapter).

    python pretrain_splitllama.py --config configs/tiny.yaml [section.key=value ...]
    torchrun --nproc-per-node 4 pretrain_splitllama.py --config configs/tiny.yaml \\
        parallel.pipeline_model_parallel_size=2 parallel.tensor_model_parallel_size=2

Overrides: section.key=value or --section.key value; they win over the YAML file, which wins
over the defaults listed below. Megatron-LM's common flags are aliases of the keys they mean
(--tensor-model-parallel-size 2 is parallel.tensor_model_parallel_size=2; --micro-batch-size,
--global-batch-size, --train-iters, --lr, --save, --load, --seq-length, ...); a Megatron flag
with no equivalent is refused naming the key to use."""

# Megatron-LM flag -> the key it means (a value-less switch when the key is boolean).
MEGATRON_ALIASES = {
    "--tensor-model-parallel-size": "parallel.tensor_model_parallel_size",
    "--pipeline-model-parallel-size": "parallel.pipeline_model_parallel_size",
    "--sequence-parallel": "parallel.sequence_parallel",
    "--use-distributed-optimizer": "parallel.use_distributed_optimizer",
    "--overlap-grad-reduce": "parallel.overlap_grad_reduce",
    "--micro-batch-size": "train.micro_batch_size",
    "--global-batch-size": "train.global_batch_size",
    "--train-iters": "train.train_iters",
    "--train-samples": "train.train_samples",
    "--seed": "train.seed",
    "--eval-interval": "train.eval_interval",
    "--eval-iters": "train.eval_iters",
    "--recompute-granularity": "train.recompute_granularity",
    "--recompute-method": "train.recompute_method",
    "--recompute-num-layers": "train.recompute_num_layers",
    "--bf16": "train.bf16",
    "--optimizer": "optimizer.optimizer",
    "--lr": "optimizer.lr",
    "--min-lr": "optimizer.min_lr",
    "--lr-warmup-iters": "optimizer.lr_warmup_iters",
    "--lr-decay-style": "optimizer.lr_decay_style",
    "--lr-decay-iters": "optimizer.lr_decay_iters",
    "--weight-decay": "optimizer.weight_decay",
    "--adam-beta1": "optimizer.adam_beta1",
    "--adam-beta2": "optimizer.adam_beta2",
    "--adam-eps": "optimizer.adam_eps",
    "--clip-grad": "optimizer.clip_grad",
    "--save": "checkpoint.save",
    "--load": "checkpoint.load",
    "--save-interval": "checkpoint.save_interval",
    "--finetune": "checkpoint.finetune",
    "--async-save": "checkpoint.async_save",
    "--seq-length": "data.seq_length",
    "--split": "data.split",
    "--tokenizer-model": "data.tokenizer_model",
    "--log-interval": "logging.log_interval",
    "--tensorboard-dir": "logging.tensorboard_dir",
    "--wandb-project": "logging.wandb_project",
}
SWITCHES = {"--sequence-parallel", "--use-distributed-optimizer", "--overlap-grad-reduce", "--bf16",
            "--finetune", "--async-save"}
# Megatron-LM flags that mean something here only in another form: refused, naming it.
MEGATRON_REFUSED = {
    "--data-path": "data.data_path=[PREFIX,...] (a list of IndexedDataset prefixes)",
    "--tokenizer-type": "data.tokenizer_type=... (null | sentencepiece | tiktoken | huggingface)",
    "--num-layers": "model.num_layers_lower=N model.num_layers_upper=M (the stitched model's two depths)",
    "--hidden-size": "model.lower / model.upper (the widths come from the two base models)",
    "--num-attention-heads": "model.lower / model.upper (the heads come from the two base models)",
    "--exit-interval": "train.exit_after_iters=N (stops after N iterations of this run)",
    "--fp16": "train.bf16=false (fp16 training is not supported; bf16 or fp32)",
}


def megatron_aliases(argv: list[str]) -> list[str]:
    """``--megatron-flag V`` / ``--megatron-flag=V`` / ``--switch`` -> ``section.key=V``; a known
    Megatron flag with no alias raises ValueError naming the key to use."""
    out, i = [], 0
    while i < len(argv):
        a = argv[i]
        flag, eq, value = a.partition("=")
        if flag in MEGATRON_REFUSED:
            raise ValueError(f"{flag} is Megatron-LM's; here use {MEGATRON_REFUSED[flag]}")
        key = MEGATRON_ALIASES.get(flag)
        if key is None:
            out.append(a)
        elif flag in SWITCHES:
            out.append(f"{key}={value if eq else 'true'}")
        elif eq:
            out.append(f"{key}={value}")
        elif i + 1 < len(argv):
            out.append(f"{key}={argv[i + 1]}")
            i += 1
        else:
            raise ValueError(f"{flag} needs a value (it means {key}=VALUE)")
        i += 1
    return out


def config_parser(description: str, **kwargs) -> argparse.ArgumentParser:
    """An ArgumentParser whose --help ends with the config reference."""
    return argparse.ArgumentParser(description=description, epilog=config_reference(),
                                   formatter_class=argparse.RawDescriptionHelpFormatter, **kwargs)


def train_parser() -> argparse.ArgumentParser:
    p = config_parser(TRAIN_USAGE, prog="pretrain_splitllama.py")
    p.add_argument("--config", default=None, help="YAML file of overrides (e.g. configs/tiny.yaml)")
    p.add_argument("-v", "--verbose", action="store_true",
                   help="print library diagnostics too (same as logging.verbose=true)")
    return p


def parse_train_args(argv: Optional[list[str]] = None) -> JobConfig:
    """The job config of a training command line (``--help`` prints and exits here)."""
    args, rest = train_parser().parse_known_args(
        normalize_argv(megatron_aliases(list(sys.argv[1:] if argv is None else argv))))
    if args.verbose:
        rest.append("logging.verbose=true")
    return load_job_config(args.config, rest)
