"""Worker for the pipeline tests: for each case (TP, PP, layout) builds the real training
runtime (DDP + distributed optimizer + 1F1B with per-rank p2p widths), loads HF split weights
through the mapping table, runs one forward/backward over a fixed global batch, and writes:
  - last stage, TP rank 0: per-micro-batch logits (full vocab; a critic's: values [1, s]) and
    per-token losses (a critic's targets: the "values" tensor of the tokens file)
  - every stage, TP rank 0: gradients (un-sharded, HF names) of the parameters it owns
  - every rank: the global names and sizes of the parameters it built
Usage: torchrun --nproc-per-node W pp_worker.py SPEC.json
SPEC: {"cases": [{"name", "hf_dir", "tokens", "out_dir", "tp", "pp", "layout", "sp", "backend",
                  "packed": null | "mask" | "thd" | "positions" | "plain"}]}
With "packed", "tokens" holds one packed sample (splitllama.data.packing.pack_sample, batched,
plus its block-diagonal "attention_mask"); it is fed as one micro-batch in that form.
"""
from __future__ import annotations

import json
import os
import sys

from functools import partial
from typing import Callable

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

from splitllama.data.packing import packed_seq_params


def run_case(case: dict) -> None:
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from splitllama.config.job import JobConfig
    from splitllama.config.model import ModelConfig
    from splitllama.convert.live import global_name, load_full_weights
    from splitllama.convert.mapping import hf_to_mcore, mappings, mcore_to_hf
    from splitllama.training.loop import _schedule_kwargs
    from splitllama.preflight.launch import run_plan
    from splitllama.training.runtime import build_runtime
    from splitllama.training.step import forward_step

    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    with open(f"{case['hf_dir']}/config.json") as f:
        model_cfg = ModelConfig.from_seed_dict(json.load(f))
    model_cfg.transformer_impl = "local"
    model_cfg.attention_backend = case.get("backend", "local")
    data = load_file(case["tokens"])
    critic = model_cfg.head == "value"
    # None | "mask" (position ids + document mask) | "thd" (cu_seqlens) | "positions" (position
    # ids only) | "plain" (the pack as one causal sequence)
    packed = case.get("packed")
    if packed:  # one packed sample (pack_sample's dict, batched): one micro-batch
        n_mb, seq = 1, data["tokens"].shape[1]
    else:
        tokens = data["tokens"]
        n_mb, seq = tokens.shape[0], tokens.shape[1] - 1
    job = JobConfig(model=model_cfg)
    job.parallel.tensor_model_parallel_size = case["tp"]
    job.parallel.pipeline_model_parallel_size = case["pp"]
    job.parallel.pipeline_layout = case.get("layout")
    job.parallel.sequence_parallel = case.get("sp", False)
    job.train.micro_batch_size, job.train.global_batch_size = 1, n_mb
    job.data.seq_length = seq
    rt = build_runtime(run_plan(job))
    for blk in (getattr(rt.inner, b) for b in ("lower", "upper") if hasattr(rt.inner, b)):
        core = type(blk.layers[0].self_attention.core_attention).__name__
        assert core == {"local": "DotProductAttention", "sdpa": "SDPAttention"}[model_cfg.attention_backend], core
    tp_rank, stage = ps.get_tensor_model_parallel_rank(), rt.inner.stage
    full = hf_to_mcore(load_file(f"{case['hf_dir']}/model.safetensors"), model_cfg)
    load_full_weights(rt.inner, full, model_cfg, rt.layout, stage, case["tp"], tp_rank)

    def batches():
        if packed:
            b = {k: data[k] for k in ("tokens", "labels", "loss_mask")}  # "plain": one causal sequence
            if packed == "positions":  # reset_position_ids without reset_attention_mask
                b.update(position_ids=data["position_ids"])
            elif packed == "mask":
                b.update(position_ids=data["position_ids"], attention_mask=data["attention_mask"])
            elif packed == "thd":
                b.update(position_ids=data["position_ids"], cu_seqlens=data["cu_seqlens"])
            yield b
            return
        for i in range(n_mb):
            b = {"tokens": tokens[i:i + 1, :-1], "labels": tokens[i:i + 1, 1:],
                 "loss_mask": torch.ones(1, seq), "position_ids": torch.arange(seq)[None]}
            if critic:
                b["value_targets"] = data["values"][i:i + 1]
            yield b

    fb = get_forward_backward_func()
    kw = _schedule_kwargs(rt)
    rt.ddp.zero_grad_buffer()
    losses = fb(forward_step_func=forward_step, data_iterator=batches(), model=[rt.ddp],
                num_microbatches=n_mb, forward_only=False, **kw)

    tp_group = ps.get_tensor_model_parallel_group()

    def gather(t: torch.Tensor) -> list[torch.Tensor]:
        parts = [torch.empty_like(t) for _ in range(case["tp"])]
        dist.all_gather(parts, t.contiguous(), group=tp_group)
        return parts

    by_name = {e.mcore: e for e in mappings(model_cfg)}
    grads, owned = {}, {}
    for local, p in rt.inner.named_parameters():
        name = global_name(local, rt.layout, stage)
        owned[name] = p.numel()
        grads[name] = by_name[name].unshard(gather(p.main_grad.detach().clone()))
    out_dir = case["out_dir"]
    os.makedirs(out_dir, exist_ok=True)
    with open(f"{out_dir}/params_rank{dist.get_rank()}.json", "w") as f:
        json.dump({"stage": stage, "tp_rank": tp_rank, "params": owned}, f)
    if tp_rank == 0 and ps.get_data_parallel_rank() == 0:
        hf_grads = mcore_to_hf(grads, model_cfg, partial=True)
        save_file({k: v.contiguous() for k, v in hf_grads.items()}, f"{out_dir}/grads_stage{stage}.safetensors")

    # forward-only passes collecting, on the last stage, the logits of every micro-batch and
    # (the training step's own forward) the per-token losses
    def output_step(data_iterator, model, labels=False):
        from splitllama.training.step import forward_step, get_batch, unwrap

        if labels:
            out, _ = forward_step(data_iterator, model)
            return out, lambda o: (o.sum() * 0, {"out": o.detach().clone()})
        inner = unwrap(model)
        b = get_batch(data_iterator, inner)
        cu = b.get("cu_seqlens")
        out = model(b["tokens"] if inner.pre_process else None, position_ids=b.get("position_ids"),
                    attention_mask=b.get("attention_mask"),
                    packed_seq_params=packed_seq_params(cu) if cu is not None else None)
        return out, lambda o: (o.sum() * 0, {"out": o.detach().clone()})

    with torch.no_grad():
        outs = fb(forward_step_func=output_step, data_iterator=batches(), model=[rt.ddp],
                  num_microbatches=n_mb, forward_only=True, **kw)
        token_losses = fb(forward_step_func=partial(output_step, labels=True), data_iterator=batches(),
                          model=[rt.ddp], num_microbatches=n_mb, forward_only=True, **kw)
    if rt.is_last_stage:
        logits = torch.cat([o["out"] if critic else torch.cat(gather(o["out"]), dim=-1) for o in outs])
        loss = torch.stack([d["lm loss"] for d in losses])  # [mb, (sum, tokens)]
        per_token = torch.cat([d["out"] for d in token_losses])  # [mb, s]
        if tp_rank == 0:
            save_file({"logits": logits, "loss_sum_tokens": loss, "token_loss": per_token},
                      f"{out_dir}/outputs.safetensors")
    dist.barrier()


def run_spec(run: Callable[[dict], None], path: str) -> None:
    """Run every case of the SPEC.json at `path` with `run`."""
    with open(path) as f:
        spec = json.load(f)
    for case in spec["cases"]:
        run(case)


if __name__ == "__main__":
    run_spec(run_case, sys.argv[1])
