"""The training application: config -> runtime -> (load) -> train or evaluate."""
from __future__ import annotations

import dataclasses
import json
import logging
from typing import Optional

import torch.distributed as dist

from splitllama.checkpoint import dcp_metadata
from splitllama.checkpoint import dirs
from splitllama.checkpoint.lock import DirLock
from splitllama.config.job import JobConfig
from splitllama.config.model import ModelConfig
from splitllama.preflight.resolve import RunPlan
from splitllama.data.datasets import build_datasets
from splitllama.data.iterator import build_data_iterator
from splitllama.data.tokenizers import build_tokenizer, check_vocab
from splitllama.launch_env import rank as launch_rank
from splitllama.pipeline.cost import units_for
from splitllama.platform.dist import shutdown
from splitllama.preflight import launch as preflight
from splitllama.training import checkpointing, report, resume
from splitllama.training.loop import evaluate, train
from splitllama.training.runtime import Runtime, build_runtime
from splitllama.training.signals import PreemptionFlag

log = logging.getLogger("splitllama")
SHAPE_FIELDS = ("lower", "upper", "num_layers_lower", "num_layers_upper", "mlp", "head")
FIELD_DEFAULTS = {"head": "lm"}  # checkpoints written before the field existed


def adopt_checkpoint_model(job: JobConfig) -> JobConfig:
    """The job with the model of the checkpoint to load: a checkpoint that holds a model config
    defines the model; an explicitly configured model section that disagrees with it is an
    error naming each differing field. (`job` itself is not changed.)"""
    if not job.checkpoint.load:
        return job
    saved = dirs.read_json(dirs.resolve(job.checkpoint.load), dirs.MODEL_CONFIG)
    if saved is None:
        return job
    try:
        ckpt_model = ModelConfig(**{k: saved[k] if k in saved else FIELD_DEFAULTS[k] for k in SHAPE_FIELDS})
    except (KeyError, TypeError) as e:
        raise ValueError(f"{job.checkpoint.load}: corrupt {dirs.MODEL_CONFIG} ({type(e).__name__}: {e})") from None
    explicit = tuple(k for k in SHAPE_FIELDS if f"model.{k}" in job.explicit)
    diffs = job.model.differences(ckpt_model, explicit)
    if diffs:
        hint = ("; make a critic from an LM checkpoint with tools/convert_checkpoint.py lm-to-critic"
                if "head" in explicit and job.model.head != ckpt_model.head else "")
        raise ValueError(f"the model section conflicts with the checkpoint {job.checkpoint.load}: "
                         f"{'; '.join(diffs)}; drop the model section to use the checkpoint's model{hint}")
    model = dataclasses.replace(job.model, **{key: getattr(ckpt_model, key) for key in SHAPE_FIELDS})
    return dataclasses.replace(job, model=model)


def flops_per_iteration(job: JobConfig) -> float:
    """Model FLOPs of one global batch (forward + backward, no recompute) from the cost model."""
    units = units_for(job.model, job.data.seq_length, 1)
    return sum(u.fwd_flops + u.bwd_flops for u in units) * job.train.global_batch_size


def setup_data(rt: Runtime, tok=None):
    job, tr = rt.job, rt.job.train
    if tok is None:
        tok = build_tokenizer(job.data)
        check_vocab(tok, job.model.vocab_size)
    iters = tr.total_iters()
    evals = (iters // tr.eval_interval + 1) * tr.eval_iters if tr.eval_interval else tr.eval_iters
    train_ds, valid_ds, _ = build_datasets(
        job.data, global_batch_size=tr.global_batch_size,
        train_samples=iters * tr.global_batch_size,
        eval_samples=max(evals, 1) * tr.global_batch_size, test_samples=0,
        seed=tr.seed, tokenizer=tok, value_targets=job.model.head == "value")
    d = job.data  # document-aware attention / RoPE: every stage needs the batch's layout
    needs_data = (rt.is_first_stage or rt.is_last_stage or d.reset_position_ids
                  or d.reset_attention_mask or d.packed_sequences)

    def make(ds, start):
        if not needs_data or ds is None:
            return None
        return build_data_iterator(ds, tr.micro_batch_size, start, rt.dp_rank, rt.dp_size,
                                   num_workers=job.data.num_workers, cyclic=True)

    rt.train_iter = make(train_ds, rt.state.consumed_train_samples)
    return (lambda: make(valid_ds, 0)) if valid_ds is not None else None


def _say(text: str) -> None:
    if launch_rank() == 0:
        print(text, flush=True)


def run(job: JobConfig, preemption: Optional[PreemptionFlag] = None, weight_consumer=None) -> int:
    """Everything that can be checked is checked before torch.distributed starts: the save
    directory's lock (rank 0), where the run starts, the config, layout, tokenizer, and the
    files of the checkpoint to load. The loaded `job` is not changed: where the run starts and
    the checkpoint's model make a new job, which the resolve step turns into the `RunPlan`."""
    if weight_consumer is not None and not job.rl.sync_interval:
        raise ValueError("a weight consumer was passed but rl.sync_interval is 0: set rl.sync_interval=K")
    c = job.checkpoint
    lock = None
    if c.save and not job.train.eval_only and launch_rank() == 0:
        lock = DirLock(c.save).acquire()
        if lock.note:
            _say(f"note: {c.save}: {lock.note}")
    try:
        c = resume.resolve_resume(c, _say)
        if not job.train.eval_only:
            resume.guard_save_dir(c)
        plan = preflight.run_plan(adopt_checkpoint_model(dataclasses.replace(job, checkpoint=c)))
        tok = build_tokenizer(plan.job.data)
        check_vocab(tok, plan.job.model.vocab_size)
        if c.load:
            dcp_metadata.verify(dirs.resolve(c.load))  # restricted read of .metadata, file sizes
        return _run(plan, tok, preemption, weight_consumer)
    finally:
        if lock is not None:
            lock.release()


def _run(plan: RunPlan, tok, preemption: Optional[PreemptionFlag], weight_consumer=None) -> int:
    rt = build_runtime(plan)
    job = rt.job
    rank0 = dist.get_rank() == 0
    stages = report.stage_params(rt)  # collective
    if rank0:
        print(report.startup(rt, stages), flush=True)
    if job.checkpoint.load:
        checkpointing.load(rt, job.checkpoint.load, finetune=job.checkpoint.finetune)
    make_valid = setup_data(rt, tok)
    if job.train.eval_only:
        if make_valid is None:
            raise ValueError("train.eval_only=true but the data split has no validation part")
        val = evaluate(rt, make_valid(), job.train.eval_iters)
        if rank0:
            print(json.dumps({"eval_loss": val}), flush=True)
        return 0
    return train(rt, flops_per_iteration(job), make_valid, preemption, weight_consumer)


def run_job(job: JobConfig, preemption: Optional[PreemptionFlag] = None, weight_consumer=None) -> int:
    """Run a parsed job (after splitllama.training.entry's process set-up) and shut down.
    `preemption`: the flag `signals.install()` returned (None: no signal is honoured).
    `weight_consumer(iteration, weights)`: an RL framework's callable, called on every rank every
    rl.sync_interval iterations with the live weights in HF export names (splitllama.rl.sync)."""
    try:
        return run(job, preemption, weight_consumer)
    finally:
        shutdown()
