"""The training application: config -> runtime -> (load) -> train or evaluate."""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from typing import Optional

import torch.distributed as dist

from splitllama.checkpoint import layout as ck
from splitllama.config.job import JobConfig, load_job_config, normalize_argv
from splitllama.config.model import ModelConfig
from splitllama.data.datasets import build_datasets
from splitllama.data.iterator import build_data_iterator
from splitllama.data.tokenizers import build_tokenizer, check_vocab
from splitllama.pipeline.cost import units_for
from splitllama.platform.dist import shutdown
from splitllama.training import checkpoint, signals
from splitllama.training.loop import evaluate, train
from splitllama.training.runtime import Runtime, build_runtime

log = logging.getLogger("splitllama")
SHAPE_FIELDS = ("lower", "upper", "num_layers_lower", "num_layers_upper", "mlp")


def parse_args(argv: Optional[list[str]] = None) -> JobConfig:
    p = argparse.ArgumentParser(description="Train a SplitLlama model on Megatron-Core. "
                                "Overrides: section.key=value or --section.key value")
    p.add_argument("--config", default=None, help="YAML file of overrides (e.g. configs/tiny.yaml)")
    args, rest = p.parse_known_args(normalize_argv(list(sys.argv[1:] if argv is None else argv)))
    return load_job_config(args.config, rest)


def resolve_resume(job: JobConfig) -> None:
    """`checkpoint.load` equal to `checkpoint.save` is the resume-or-start idiom of preemptible
    jobs: with no complete checkpoint there yet, start from scratch (said on stdout)."""
    c = job.checkpoint
    if c.load and c.save and os.path.abspath(c.load) == os.path.abspath(c.save):
        try:
            ck.resolve(c.load)
        except (FileNotFoundError, ValueError):
            if int(os.environ.get("RANK", "0")) == 0:
                print(f"no checkpoint in {c.load} yet: starting from scratch", flush=True)
            c.load = None


def adopt_checkpoint_model(job: JobConfig) -> None:
    """A checkpoint that holds a model config defines the model; an explicitly configured
    model section that disagrees with it is an error."""
    if not job.checkpoint.load:
        return
    saved = ck.read_json(ck.resolve(job.checkpoint.load), ck.MODEL_CONFIG)
    if saved is None:
        return
    ckpt_model = ModelConfig(**{k: saved[k] for k in SHAPE_FIELDS})
    for key in SHAPE_FIELDS:
        mine, theirs = getattr(job.model, key), getattr(ckpt_model, key)
        if f"model.{key}" in job.explicit and mine != theirs:
            raise ValueError(f"model.{key} in the config ({_short(mine)}) conflicts with the "
                             f"checkpoint {job.checkpoint.load} ({_short(theirs)}); drop the model "
                             f"section to use the checkpoint's model")
        setattr(job.model, key, theirs)


def _short(v) -> str:
    return f"hidden {v.hidden_size}, {v.num_hidden_layers} layers" if hasattr(v, "hidden_size") else repr(v)


def flops_per_iteration(job: JobConfig) -> float:
    """Model FLOPs of one global batch (forward + backward, no recompute) from the cost model."""
    units = units_for(job.model, job.data.seq_length, 1)
    return sum(u.fwd_flops + u.bwd_flops for u in units) * job.train.global_batch_size


def setup_data(rt: Runtime):
    job, tr = rt.job, rt.job.train
    tok = build_tokenizer(job.data)
    check_vocab(tok, job.model.vocab_size)
    iters = tr.total_iters()
    evals = (iters // tr.eval_interval + 1) * tr.eval_iters if tr.eval_interval else tr.eval_iters
    train_ds, valid_ds, _ = build_datasets(
        job.data, global_batch_size=tr.global_batch_size,
        train_samples=iters * tr.global_batch_size,
        eval_samples=max(evals, 1) * tr.global_batch_size, test_samples=0,
        seed=tr.seed, tokenizer=tok)
    d = job.data  # document-aware attention / RoPE: every stage needs the batch's layout
    needs_data = (rt.is_first_stage or rt.is_last_stage or d.reset_position_ids
                  or d.reset_attention_mask or d.packed_sequences)

    def make(ds, start):
        if not needs_data or ds is None:
            return None
        return build_data_iterator(ds, tr.micro_batch_size, start, rt.dp_rank, rt.dp_size,
                                   num_workers=job.data.num_workers, cyclic=True)

    rt.train_ds, rt.valid_ds = train_ds, valid_ds
    rt.train_iter = make(train_ds, rt.state.consumed_train_samples)
    return (lambda: make(valid_ds, 0)) if valid_ds is not None else None


def run(job: JobConfig) -> int:
    resolve_resume(job)
    adopt_checkpoint_model(job)
    rt = build_runtime(job)
    rank0 = dist.get_rank() == 0
    if rank0:
        print("resolved config:\n" + job.to_yaml(), flush=True)
        print(f"pipeline layout: {rt.layout} | tp={job.parallel.tensor_model_parallel_size} "
              f"pp={job.parallel.pipeline_model_parallel_size} dp={rt.dp_size} | "
              f"micro-batches/step {rt.num_microbatches}", flush=True)
    if job.checkpoint.load:
        checkpoint.load(rt, job.checkpoint.load, finetune=job.checkpoint.finetune)
    make_valid = setup_data(rt)
    if job.train.eval_only:
        if make_valid is None:
            raise ValueError("train.eval_only=true but the data split has no validation part")
        val = evaluate(rt, make_valid(), job.train.eval_iters)
        if rank0:
            print(json.dumps({"eval_loss": val}), flush=True)
        return 0
    return train(rt, flops_per_iteration(job), make_valid)


def main(argv: Optional[list[str]] = None) -> int:
    signals.install()  # first: a preemption signal during start-up is honoured at the first step
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    job = parse_args(argv)
    try:
        return run(job)
    finally:
        shutdown()
