"""Adapter-only warmup checks inside the real runtime (run under torchrun).

Usage: torchrun --nproc-per-node W warmup_worker.py OUT.json [key=value overrides...]
Writes (rank 0 gathers): per rank — trainable/frozen counts, names of params changed by
training, names of params in DDP grad buffers, optimizer state element count, and whether
the lower block / embedding ran with autograd enabled.
"""
from __future__ import annotations

import json
import sys

import torch
import torch.distributed as dist


def main() -> None:
    from splitllama.config.job import load_job_config
    from splitllama.training.app import setup_data
    from splitllama.training.loop import train_step
    from splitllama.preflight.launch import run_plan
    from splitllama.training.runtime import build_runtime

    out, overrides = sys.argv[1], sys.argv[2:]
    job = load_job_config("configs/tiny.yaml", ["model.freeze=all_but_adapter", "train.train_iters=5",
                                                "train.eval_interval=0", *overrides])
    rt = build_runtime(run_plan(job))
    setup_data(rt)
    before = {n: p.detach().clone() for n, p in rt.inner.named_parameters()}
    grad_modes = []
    for name in ("embedding", "lower"):
        if hasattr(rt.inner, name):
            getattr(rt.inner, name).register_forward_pre_hook(
                lambda m, a, _n=name: grad_modes.append((_n, torch.is_grad_enabled())))
    applied = [train_step(rt)[2] for _ in range(5)]
    changed = sorted(n for n, p in rt.inner.named_parameters() if not torch.equal(p, before[n]))
    in_buffers = sorted(n for n, p in rt.inner.named_parameters()
                        if any(p in buf.param_index_map for buf in rt.ddp.buffers))
    opt_elems = 0
    for opt in getattr(rt.optimizer, "chained_optimizers", [rt.optimizer]):
        inner = getattr(opt, "optimizer", None)
        if inner is not None:
            opt_elems += sum(p.numel() for g in inner.param_groups for p in g["params"])
    record = {"rank": dist.get_rank(), "stage": rt.inner.stage, "applied": applied,
              "trainable": rt.trainable_params, "frozen": rt.frozen_params,
              "adapter_numel": sum(p.numel() for n, p in rt.inner.named_parameters() if n.startswith("adapter.")),
              "changed": changed, "in_buffers": in_buffers, "optimizer_elements": opt_elems,
              "grad_modes": sorted(set(grad_modes)), "no_grad_prefix": rt.inner.no_grad_prefix,
              "dp": rt.dp_size}
    records = [None] * dist.get_world_size()
    dist.all_gather_object(records, record)
    if dist.get_rank() == 0:
        with open(out, "w") as f:
            json.dump(records, f)


if __name__ == "__main__":
    from splitllama.platform.dist import shutdown

    try:
        main()
    finally:
        shutdown()
