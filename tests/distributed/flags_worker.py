"""Worker for test_document_flags: the real data path (GPTDataset with Megatron's reset flags,
the sampler, the training step) into the real runtime at PP=3 (so a middle stage must get the
document layout too), one forward-only micro-batch; the last stage writes per-token losses.

Usage: torchrun --nproc-per-node 3 flags_worker.py SPEC.json
SPEC: {"cases": [{"name", "prefix", "seq", "backend", "reset": bool, "out"}]}
"""
from __future__ import annotations

import sys

import torch
from safetensors.torch import save_file


def run_case(case: dict) -> None:
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from splitllama.config.job import JobConfig
    from splitllama.training.app import setup_data
    from splitllama.training.loop import _schedule_kwargs
    from splitllama.preflight.launch import run_plan
    from splitllama.training.runtime import build_runtime
    from splitllama.training.step import forward_step

    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    job = JobConfig()
    job.model.transformer_impl = "local"
    job.model.attention_backend = case["backend"]
    job.parallel.pipeline_model_parallel_size = 3
    job.parallel.pipeline_layout = "L2|A,U1|U2"
    d = job.data
    d.mock, d.data_path, d.split, d.seq_length, d.vocab_size = False, [case["prefix"]], "1,0,0", case["seq"], 512
    d.reset_position_ids = d.reset_attention_mask = case["reset"]
    job.train.micro_batch_size = job.train.global_batch_size = 1
    job.train.train_iters, job.train.eval_interval = 1, 0
    rt = build_runtime(run_plan(job))
    setup_data(rt)
    if not (rt.is_first_stage or rt.is_last_stage):
        assert rt.train_iter is not None or not case["reset"], "middle stage got no data iterator"
    with torch.no_grad():
        out = get_forward_backward_func()(
            forward_step_func=lambda it, m: (forward_step(it, m)[0], lambda o: (o.sum() * 0, {"loss": o})),
            data_iterator=rt.train_iter, model=[rt.ddp], num_microbatches=1, forward_only=True,
            **_schedule_kwargs(rt))
    if rt.is_last_stage:
        save_file({"loss": out[0]["loss"].contiguous()}, case["out"])


if __name__ == "__main__":
    from tests.distributed.pp_worker import run_spec

    run_spec(run_case, sys.argv[1])
