"""Where a run starts, decided before anything is built, so that no run loses checkpoints.

`checkpoint.load == checkpoint.save` is the resume-or-start idiom of preemptible jobs:
  * no checkpoint there yet (directory absent, empty, or only `.tmp` debris of a crashed first
    save): start from scratch, said on stdout;
  * `latest` names a complete checkpoint: resume from it;
  * `latest` is missing or names an incomplete checkpoint, but complete ones exist: resume from
    the newest complete one, saying so;
  * checkpoint directories but none complete: refuse (never train from scratch over them).
A run that does not resume from `checkpoint.save` (a fresh run, a finetune, a resume from
elsewhere) refuses a save directory that already holds checkpoints, and so does a resume from
an older checkpoint while newer ones exist there: its saves (and `keep_last` pruning) would
replace them. `checkpoint.overwrite=true` allows both.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Callable, Optional

from splitllama.checkpoint import dirs
from splitllama.config.train import CheckpointConfig
from splitllama.errors import UsageError


def _same(a: Optional[str], b: Optional[str]) -> bool:
    return bool(a and b) and os.path.abspath(a) == os.path.abspath(b)


def _summary(root: str) -> str:
    done = dirs.list_complete(root)
    latest = dirs.latest_name(root)
    parts = [f"{len(done)} complete checkpoint{'s' if len(done) != 1 else ''}"]
    if done:
        parts.append(f"newest {os.path.basename(done[-1][1])}")
    if latest:
        parts.append(f"latest -> {latest}")
    return ", ".join(parts)


def resolve_resume(c: CheckpointConfig, say: Callable[[str], None]) -> CheckpointConfig:
    """`c` with `load` settled for the resume-or-start idiom (see the module docstring); `c`
    itself is not changed."""
    if not _same(c.load, c.save):
        return c
    root = c.load
    if not dirs.holds_checkpoints(root):
        say(f"no checkpoint in {root} yet: starting from scratch")
        return dataclasses.replace(c, load=None)
    try:
        dirs.resolve(root)
        return c
    except (FileNotFoundError, ValueError) as e:
        problem = str(e)
    done = dirs.list_complete(root)
    if not done:
        if c.overwrite:
            say(f"{problem}; no complete checkpoint in {root}: starting from scratch "
                f"(checkpoint.overwrite=true)")
            return dataclasses.replace(c, load=None)
        raise UsageError(f"{problem}, and {root} holds no complete checkpoint to fall back to; "
                         f"refusing to train from scratch over it (move it away, or set "
                         f"checkpoint.overwrite=true)")
    say(f"warning: {problem}; resuming from the newest complete checkpoint {done[-1][1]} instead")
    return dataclasses.replace(c, load=done[-1][1])


def guard_save_dir(c: CheckpointConfig) -> None:
    """Refuse a save directory whose checkpoints this run's saves could replace."""
    if not c.save or c.overwrite or not dirs.holds_checkpoints(c.save):
        return
    save = os.path.abspath(c.save)
    resumed = None
    if c.load and not c.finetune:
        try:
            resumed = os.path.abspath(dirs.resolve(c.load))
        except (FileNotFoundError, ValueError):
            resumed = None  # reported by the load itself
    if resumed is None or os.path.dirname(resumed) != save:
        start = "starts from scratch" if not c.load else \
            (f"starts from the weights of {c.load}" if c.finetune else f"resumes from {c.load}")
        raise UsageError(
            f"checkpoint.save {c.save} already holds checkpoints of another run ({_summary(c.save)}) "
            f"and this run {start}: its saves would mix with or replace them; resume with "
            f"checkpoint.load={c.save}, choose a new checkpoint.save, or set checkpoint.overwrite=true")
    it = dirs.iteration_of(resumed)
    newer = [p for i, p in dirs.list_complete(c.save) if it is not None and i > it]
    if newer:
        raise UsageError(
            f"this run resumes from {resumed} but {c.save} holds newer checkpoints "
            f"({', '.join(os.path.basename(p) for p in newer)}) that its saves would replace; "
            f"resume from {c.save} (its latest), or set checkpoint.overwrite=true")
