"""Entry point of ``pretrain_splitllama.py`` / ``splitllama-train``.

Parses the command line and sets up logging before Megatron-Core is imported: ``--help`` is
answered without it, and its import-time warnings are filtered at the default verbosity.
"""
from __future__ import annotations

from typing import Optional

from splitllama.config.cli import dry_run_request, parse_train_args
from splitllama import logs
from splitllama.errors import cli_main
from splitllama.platform.lifecycle import die_with_launcher
from splitllama.training import signals


def main(argv: Optional[list[str]] = None) -> int:
    """Bad input (also a bad command line or config file): one `error: ...` line from rank 0,
    exit 2 (see splitllama.errors)."""
    return cli_main(_main, argv)


def _main(argv: Optional[list[str]]) -> int:
    die_with_launcher()  # under torchrun / the SLURM task wrapper: never outlive it
    dry = dry_run_request(argv)
    if dry is not None:  # no training: splitllama.dryrun (fake tensors, one process per stage)
        from splitllama.dryrun import run as dry_run

        logs.setup("-v" in (argv or []) or "--verbose" in (argv or []))
        return dry_run.run(*dry)
    preemption = signals.install()  # first: a signal during start-up is honoured at the first step
    job = parse_train_args(argv)
    logs.setup(job.logging.verbose)
    from splitllama.training import app  # Megatron-Core is imported here

    return app.run_job(job, preemption)
