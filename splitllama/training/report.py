"""The lines a run prints before its first iteration: resolved config (compact), layout,
parameter counts per stage, and where metrics and checkpoints go."""
from __future__ import annotations

import os
import textwrap
from dataclasses import fields

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps

from splitllama.checkpoint import dirs
from splitllama.config.model import PRESETS, LlamaBlockConfig
from splitllama.platform.device import device as local_device
from splitllama.training.runtime import Runtime

WIDTH = 120


def stage_params(rt: Runtime) -> list[tuple[int, int]]:
    """(total, trainable) parameters of each pipeline stage (collective; on every rank).

    A tensor-parallel shard counts on every TP rank, a replicated parameter (norm weights)
    once; data-parallel replicas count once."""
    tp_rank = ps.get_tensor_model_parallel_rank()
    total = trainable = 0
    for p in rt.inner.parameters():
        if getattr(p, "tensor_model_parallel", False) or tp_rank == 0:
            total += p.numel()
            trainable += p.numel() if p.requires_grad else 0
    first_dp = ps.get_data_parallel_rank() == 0
    pp = ps.get_pipeline_model_parallel_world_size()
    mine = torch.zeros(pp, 2, dtype=torch.float64, device=local_device())
    if first_dp:
        mine[ps.get_pipeline_model_parallel_rank()] = torch.tensor([total, trainable], dtype=torch.float64)
    dist.all_reduce(mine)
    return [(int(t), int(tr)) for t, tr in mine.tolist()]


def _block(blk: LlamaBlockConfig) -> str:
    name = next((k for k, v in PRESETS.items() if v == blk), None)
    shape = (f"hidden {blk.hidden_size}, ffn {blk.intermediate_size}, heads {blk.num_attention_heads}"
             f"/{blk.num_key_value_heads} kv, {blk.num_hidden_layers} layers, vocab {blk.vocab_size}, "
             f"rope {blk.rope_type}, max_pos {blk.max_position_embeddings}")
    return f"{name} ({shape})" if name else f"({shape})"


def _value(v) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, LlamaBlockConfig):
        return _block(v)
    if isinstance(v, list):
        return "[" + ", ".join(map(str, v)) + "]"
    return str(v)


def compact_config(job) -> list[str]:
    """One entry per section, every key, wrapped to WIDTH columns."""
    out = []
    for f in fields(job):
        if f.name == "explicit":
            continue
        sec = getattr(job, f.name)
        items = " ".join(f"{k.name}={_value(getattr(sec, k.name))}" for k in fields(sec))
        out.extend(textwrap.wrap(f"{f.name}: {items}", WIDTH, initial_indent="  ",
                                 subsequent_indent="      ", break_on_hyphens=False))
    return out


def _fmt(n: int) -> str:
    return f"{n:,}"


def _where(job) -> list[str]:
    c, lg = job.checkpoint, job.logging
    if c.save:
        when = f"every {c.save_interval} iterations and at the end" if c.save_interval else "at the end"
        keep = f", keeping the newest {c.keep_last}" if c.keep_last else ""
        save = f"checkpoints: {os.path.abspath(c.save)} ({when}{keep}{', asynchronously' if c.async_save else ''})"
    else:
        save = "checkpoints: none saved (set checkpoint.save=DIR)"
    if c.load:
        save += f"; loading {os.path.abspath(c.load)}{' (weights only)' if c.finetune else ''}"
    sinks = ["stdout"]
    if lg.metrics_file:
        sinks.append(f"metrics {os.path.abspath(lg.metrics_file)}")
    if lg.tensorboard_dir:
        sinks.append(f"tensorboard {os.path.abspath(lg.tensorboard_dir)}")
    if lg.wandb_project:
        sinks.append(f"wandb project {lg.wandb_project} ({os.environ.get('WANDB_MODE', lg.wandb_mode)})")
    return [save, f"logs: {', '.join(sinks)} every {lg.log_interval} iterations"]


def startup(rt: Runtime, stages: list[tuple[int, int]]) -> str:
    """The start-of-run summary (rank 0 prints it)."""
    job = rt.job
    if job.logging.verbose:
        lines = ["resolved config:", job.to_yaml().rstrip()]
    else:
        lines = [f"resolved config (full YAML with -v; saved as {dirs.JOB_CONFIG} in each checkpoint):",
                 *compact_config(job)]
    par = job.parallel
    device = "cpu (gloo, CPU harness)" if rt.on_cpu else f"cuda ({torch.cuda.get_device_name()})"
    lines.append(f"pipeline layout: {rt.layout} | tp={par.tensor_model_parallel_size} "
                 f"pp={par.pipeline_model_parallel_size} dp={rt.dp_size} | micro-batches/step "
                 f"{rt.num_microbatches} | {dist.get_world_size()} process(es) on {device}")
    total, trainable = sum(t for t, _ in stages), sum(tr for _, tr in stages)
    share = 100.0 * trainable / max(total, 1)
    lines.append(f"parameters: {_fmt(total)} total, {_fmt(trainable)} trainable "
                 f"({share:.{1 if share >= 1 or share == 0 else 3}f}%, model.freeze={job.model.freeze})")
    for i, ((t, tr), stage) in enumerate(zip(stages, rt.layout.stages)):
        lines.append(f"  stage {i} [{stage}]: {_fmt(t)} total, {_fmt(tr)} trainable")
    lines.extend(_where(job))
    return "\n".join(lines)
