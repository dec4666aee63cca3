"""The job checks that need no process group, run before torch.distributed starts (so that a
bad config is one `error:` line, not a traceback per rank)."""
from __future__ import annotations

import os
from typing import Optional

from splitllama.config.job import JobConfig
from splitllama.model.attention import check_packing_support, resolve_backend
from splitllama.model.spec import resolve_impl
from splitllama.pipeline.layout import PipelineLayout
from splitllama.training.layout_select import choose_layout


def world_size() -> int:
    """The number of processes the launcher starts (torchrun / SLURM env://; 1 alone)."""
    return int(os.environ.get("WORLD_SIZE", "1") or 1)


def validate_job(job: JobConfig, world: Optional[int] = None) -> PipelineLayout:
    """Validate every section against the parallel layout; returns the pipeline layout."""
    par = job.parallel
    world = world_size() if world is None else world
    par.validate(world)
    tp, pp = par.tensor_model_parallel_size, par.pipeline_model_parallel_size
    dp = world // (tp * pp)
    job.train.validate(dp)
    job.checkpoint.validate()
    job.logging.validate()
    job.model.validate(tp)
    job.model.check_pipeline_size(pp)
    job.model.check_seq_length(job.data.seq_length)
    if job.data.tokenizer_type == "null" and job.data.vocab_size is None:
        job.data.vocab_size = job.model.vocab_size  # synthetic ids span the model's vocab
    job.data.validate()
    check_packing(job)
    return choose_layout(job, dp)


def check_packing(job: JobConfig) -> None:
    """Document masking / packing the attention backend cannot honour, and packs that would not
    be one per micro-batch, are refused (ValueError naming the flag)."""
    d = job.data
    backend = resolve_backend(job.model.attention_backend, resolve_impl(job.model.transformer_impl))
    check_packing_support(backend, reset_attention_mask=d.reset_attention_mask, packed_sequences=d.packed_sequences)
    if d.packed_sequences and job.train.micro_batch_size != 1:
        raise ValueError(f"data.packed_sequences needs train.micro_batch_size=1 (one pack of "
                         f"data.seq_length tokens per micro-batch), got {job.train.micro_batch_size}")
