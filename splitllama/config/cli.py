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
over the defaults listed below."""


def config_parser(description: str, **kwargs) -> argparse.ArgumentParser:
    """An ArgumentParser whose --help ends with the config reference."""
    return argparse.ArgumentParser(description=description, epilog=config_reference(),
                                   formatter_class=argparse.RawDescriptionHelpFormatter, **kwargs)


def train_parser() -> argparse.ArgumentParser:
    p = config_parser(TRAIN_USAGE, prog="pretrain_splitllama.py")
    p.add_argument("--config", default=None, help="YAML file of overrides (e.g. configs/tiny.yaml)")
    p.add_argument("-v", "--verbose", action="store_true",
                   help="print library diagnostics too (same as logging.verbose=true)")
    p.add_argument("--dry-run", action="store_true",
                   help="do not train: build each pipeline stage's model, DDP and optimizer on fake "
                        "tensors for --world-size GPUs and report its memory per GPU (no GPU needed)")
    p.add_argument("--world-size", type=int, default=None,
                   help="with --dry-run: the job's number of GPUs (TP x PP x DP)")
    p.add_argument("--json", action="store_true", help="with --dry-run: print the report as JSON")
    return p


DRY_RUN_FLAGS = ("--dry-run", "--world-size", "--json")


def dry_run_request(argv: Optional[list[str]] = None) -> Optional[tuple[list[str], Optional[int], bool]]:
    """(training argv without the dry-run flags, world size, json) when the command line asks for
    ``--dry-run``, else None; ``--world-size`` / ``--json`` without ``--dry-run`` are refused."""
    argv = normalize_argv(list(sys.argv[1:] if argv is None else argv))
    args, _ = train_parser().parse_known_args(argv)
    if not args.dry_run:
        if args.world_size is not None or args.json:
            raise ValueError("--world-size and --json are options of --dry-run")
        return None
    rest, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--world-size":
            skip = True
        elif a not in DRY_RUN_FLAGS and not a.startswith("--world-size="):
            rest.append(a)
    return rest, args.world_size, args.json


def parse_train_args(argv: Optional[list[str]] = None) -> JobConfig:
    """The job config of a training command line (``--help`` prints and exits here)."""
    args, rest = train_parser().parse_known_args(
        normalize_argv(list(sys.argv[1:] if argv is None else argv)))
    if args.verbose:
        rest.append("logging.verbose=true")
    return load_job_config(args.config, rest)
