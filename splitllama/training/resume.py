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
from splitllama.config.job import JobConfig
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


# ---- the resumed run's config against the checkpoint's saved job config ----------------------
SCHEDULE_KEYS = ("optimizer.lr", "optimizer.min_lr", "optimizer.lr_warmup_iters", "optimizer.lr_decay_style",
                 "optimizer.weight_decay", "train.global_batch_size")
"""What the restored LR scheduler keeps from the checkpoint unless checkpoint.override_opt_param_scheduler."""
OPTIMIZER_STATE_KEYS = ("optimizer.optimizer", "optimizer.adam_beta1", "optimizer.adam_beta2", "optimizer.adam_eps")
"""Restored with the optimizer state (its param groups): a change is refused (or a finetune)."""
SAID_SECTIONS = ("train", "optimizer", "data")
OVERRIDE = "checkpoint.override_opt_param_scheduler=true"


def _flat(d: dict) -> dict:
    return {f"{sec}.{k}": v for sec, vals in d.items() if sec in SAID_SECTIONS for k, v in vals.items()}


def _decay_iters(flat: dict) -> Optional[int]:
    if flat.get("optimizer.lr_decay_iters"):
        return flat["optimizer.lr_decay_iters"]
    if flat.get("train.train_iters") is not None:
        return flat["train.train_iters"]
    samples, gbs = flat.get("train.train_samples"), flat.get("train.global_batch_size")
    return -(-samples // gbs) if samples and gbs else None


def reconcile_with_checkpoint(job: JobConfig, say: Callable[[str], None]) -> JobConfig:
    """The job a resume runs, honest about what the checkpoint keeps. For every value that
    differs from the checkpoint's saved job config (`checkpoint.load` resolved, not a finetune):
    the LR schedule (`SCHEDULE_KEYS`) is refused unless checkpoint.override_opt_param_scheduler
    (then applied and said); a decay length that only follows a changed train length keeps the
    checkpoint's, written into optimizer.lr_decay_iters (said); optimizer-state values
    (`OPTIMIZER_STATE_KEYS`) are refused; any other train/optimizer/data value applies and is
    said, one line per key. The returned job is what runs and what the next save records."""
    c = job.checkpoint
    if not c.load or c.finetune:
        return job
    where = dirs.resolve(c.load)
    saved = dirs.read_job_config(where)
    if saved is None:
        say(f"note: {where} has no {dirs.JOB_CONFIG}: this run's values cannot be compared with the "
            f"checkpoint's; the LR schedule is the checkpoint's unless {OVERRIDE}")
        return job
    old, new = _flat(saved), _flat(job.to_dict())
    changed = [k for k in new if k in old and old[k] != new[k] and not (
        isinstance(old[k], (int, float)) and isinstance(new[k], (int, float)) and float(old[k]) == float(new[k]))]
    refused = [k for k in changed if k in OPTIMIZER_STATE_KEYS]
    if refused:
        raise UsageError(f"resuming from {where}: {'; '.join(f'{k}: checkpoint {old[k]!r}, this run {new[k]!r}' for k in refused)}"
                         f" is restored with the optimizer state and cannot change on resume; restore "
                         f"the checkpoint's value, or start with checkpoint.finetune=true (weights only, fresh optimizer)")
    schedule = [k for k in changed if k in SCHEDULE_KEYS]
    old_decay, new_decay = _decay_iters(old), _decay_iters(new)
    explicit_decay = "optimizer.lr_decay_iters" in job.explicit and old_decay != new_decay
    if (schedule or explicit_decay) and not c.override_opt_param_scheduler:
        keys = schedule + (["optimizer.lr_decay_iters"] if explicit_decay else [])
        detail = "; ".join(f"{k}: checkpoint {old.get(k)!r}, this run {new.get(k)!r}" for k in keys)
        raise UsageError(f"resuming from {where}: this run's learning-rate schedule differs from the "
                         f"checkpoint's ({detail}); the checkpoint's schedule would run while this config "
                         f"says otherwise: set {OVERRIDE} to apply this run's values, or restore them")
    for k in changed:
        how = f"applied: {OVERRIDE}" if k in SCHEDULE_KEYS else "this run's value applies"
        say(f"resume: {k} {old[k]!r} (checkpoint) -> {new[k]!r} ({how})")
    if old_decay != new_decay and old_decay is not None and not explicit_decay:
        if c.override_opt_param_scheduler:
            say(f"resume: the learning rate decays over this run's {new_decay} iterations "
                f"(checkpoint: {old_decay}; {OVERRIDE})")
        else:
            say(f"resume: the learning rate keeps the checkpoint's decay over {old_decay} iterations "
                f"(optimizer.lr_decay_iters={old_decay}); set {OVERRIDE} to decay over this run's {new_decay}")
            job = dataclasses.replace(job, optimizer=dataclasses.replace(job.optimizer, lr_decay_iters=old_decay))
    return job
