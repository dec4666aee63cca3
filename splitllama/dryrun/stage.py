"""One pipeline stage of a resolved job, measured in this process on fake tensors.

This process stands for one representative rank of the stage (TP rank 0, DP rank 0) of a
``world_size``-rank job: a 'fake' process group of that size, Megatron-Core's parallel state on
it, the real SplitLlama stage built with the real shapes and dtype (`FakeTensorMode`: no storage),
the real Megatron DDP (grad buffers) and optimizer (distributed optimizer shards), and one
training step under a memory tracker.

The step is the 1F1B schedule's memory behaviour on this rank, emulated: Megatron's schedule
cannot run here (its p2p needs the neighbour stages' ranks, which do not exist), so the stage
runs the forwards of the micro-batches 1F1B holds at its peak (``min(pp - stage, m)``: the
warm-up forwards plus the first steady-state forward), keeping their activations, with the
received activations as fake tensors of the real p2p shapes, then their backwards (the
gradient from the next stage: a fake tensor of the send shape), Megatron's
`finalize_model_grads` (the DP reduce-scatter, TP norm all-reduce on the fake group) and the
optimizer step. The optimizer state is that of a step >= 2 (Megatron's dummy-value
initialisation, outside the measurement), as in a steady-state step.
"""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import Optional

MARK = "DRYRUN-JSON "  # the line prefix of a stage worker's result (splitllama.dryrun.worker)
GiB = float(2 ** 30)


@dataclass(frozen=True)
class StageMemory:
    """Bytes on the measured rank (see `measure_stage`)."""

    params: int  # parameter count on this rank (its TP shard of the stage)
    param_bytes: int
    grad_bytes: int
    optimizer_bytes: int  # fp32 master shard + Adam moments (distributed optimizer: 1/dp)
    activation_bytes: int  # at the peak: everything that is not model state
    peak_bytes: int
    in_flight: int
    recv_shape: Optional[tuple]
    send_shape: Optional[tuple]
    shards: dict  # parameter name (layer index as *) -> local shape
    rank: int

    def as_dict(self) -> dict:
        return {"params": self.params, "params_gib": self.param_bytes / GiB,
                "grads_gib": self.grad_bytes / GiB, "optimizer_gib": self.optimizer_bytes / GiB,
                "activations_gib": self.activation_bytes / GiB, "peak_gib": self.peak_bytes / GiB,
                "in_flight": self.in_flight, "rank": self.rank,
                "p2p": {"recv": list(self.recv_shape) if self.recv_shape else None,
                        "send": list(self.send_shape) if self.send_shape else None},
                "shards": {k: list(v) for k, v in self.shards.items()}}


def representative_rank(stage: int, tp: int, dp: int) -> int:
    """Global rank of TP rank 0, DP rank 0 of `stage` (Megatron's default order tp-cp-ep-dp-pp:
    the pipeline rank varies slowest)."""
    return stage * tp * dp


def upstream_frozen(freeze: str, num_layers_lower: int, lower_param_suffixes: list[str]) -> bool:
    """What the training runtime's all-gather over the pipeline answers (nothing before the
    adapter trains, on any stage), from the name-based freeze rule alone."""
    from splitllama.training.freeze import trainable_predicate

    trains = trainable_predicate(freeze)
    names = ["embedding.word_embeddings.weight"] + [
        f"lower.layers.{i}.{suffix}" for i in range(num_layers_lower) for suffix in lower_param_suffixes]
    return not any(trains(n) for n in names)


def _storage_bytes(tensors) -> int:
    seen, total = set(), 0
    for t in tensors:
        st = t.untyped_storage()
        key = id(st)
        if key not in seen:
            seen.add(key)
            total += st.nbytes()
    return total


def _shards(model) -> dict:
    out: dict = {}
    for name, p in model.named_parameters():
        out.setdefault(re.sub(r"\.layers\.\d+\.", ".layers.*.", name), tuple(p.shape))
    return out


def measure_stage(plan, stage: int) -> StageMemory:
    """Measure `stage` of `plan` (a `RunPlan` resolved for the target GPUs: bf16) in this
    process, which must not have started torch.distributed. See the module docstring."""
    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode

    from splitllama.platform import cpu
    from splitllama.platform.compat import fake

    logging.getLogger("megatron.core.tensor_parallel.random").setLevel(logging.ERROR)  # RNG-state check
    job, par = plan.job, plan.job.parallel
    tp, pp, dp = plan.tp, plan.pp, plan.dp
    rank = representative_rank(stage, tp, dp)
    fake.init_fake_group(rank, plan.world_size)
    harness = cpu.enable()  # Megatron's CUDA calls -> CPU (fake CPU tensors, real dtype)
    patches = fake.enable()
    lib = fake.register_coalesced_meta()
    try:
        from megatron.core import parallel_state as ps

        ps.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                                     create_gloo_process_groups=False)
        if ps.get_pipeline_model_parallel_rank() != stage or ps.get_tensor_model_parallel_rank() != 0:
            raise RuntimeError(f"rank {rank} is pipeline stage {ps.get_pipeline_model_parallel_rank()}, "
                               f"TP rank {ps.get_tensor_model_parallel_rank()}; expected stage {stage}, TP rank 0")
        from splitllama.platform.dist import set_seed

        set_seed(job.train.seed)
        with FakeTensorMode(allow_non_fake_inputs=True), fake.ScalarAnswers():
            return _measure(plan, stage, rank, torch, fake)
    finally:
        del lib
        patches.restore()
        harness.disable()
        import torch.distributed as dist

        dist.destroy_process_group()


def _measure(plan, stage: int, rank: int, torch, fake) -> StageMemory:
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.distributed.finalize_model_grads import finalize_model_grads
    from megatron.core.optimizer import OptimizerConfig as McoreOptimizerConfig
    from megatron.core.optimizer import get_megatron_optimizer

    from splitllama.model.build import build_stage
    from splitllama.model.megatron_config import Numerics
    from splitllama.training.freeze import apply_freeze
    from splitllama.training.step import pipeline_shapes_hook

    job, par, tr = plan.job, plan.job.parallel, plan.job.train
    dtype = torch.bfloat16 if plan.bf16 else torch.float32
    numerics = Numerics(params_dtype=dtype, bf16=plan.bf16, use_cpu_initialization=True,
                        recompute_granularity=plan.recompute.granularity,
                        recompute_method=plan.recompute.method,
                        recompute_num_layers=plan.recompute.num_layers)
    model = build_stage(job.model, par, numerics, plan.layout).model
    apply_freeze(model, job.model.freeze)
    suffixes = sorted({n.split(".", 3)[3] for n, _ in model.named_parameters() if n.startswith("lower.layers.")})
    model.set_no_grad_prefix(upstream_frozen(job.model.freeze, job.model.num_layers_lower, suffixes))
    ddp = DistributedDataParallel(
        config=model.config, module=model,
        ddp_config=DistributedDataParallelConfig(  # as splitllama.training.runtime builds it on GPU
            grad_reduce_in_fp32=True, overlap_grad_reduce=par.overlap_grad_reduce,
            use_distributed_optimizer=par.use_distributed_optimizer, check_for_nan_in_grad=False,
            bucket_size=40_000_000))
    opt = job.optimizer
    optimizer = get_megatron_optimizer(
        McoreOptimizerConfig(optimizer=opt.optimizer, lr=opt.lr, min_lr=opt.min_lr,
                             weight_decay=opt.weight_decay, adam_beta1=opt.adam_beta1,
                             adam_beta2=opt.adam_beta2, adam_eps=opt.adam_eps, clip_grad=opt.clip_grad,
                             bf16=plan.bf16, params_dtype=dtype,
                             use_distributed_optimizer=par.use_distributed_optimizer),
        [ddp], use_gloo_process_groups=False)  # gloo groups: host memory, checkpoints only
    chained = getattr(optimizer, "chained_optimizers", [optimizer])
    for o in chained:  # the state of a step >= 2
        if hasattr(o, "_init_optimizer_states_with_dummy_values"):
            o._init_optimizer_states_with_dummy_values()
        else:
            raise RuntimeError(f"the dry run supports the distributed optimizer only "
                               f"(parallel.use_distributed_optimizer=true), got {type(o).__name__}")
    cfg = model.config
    cfg.no_sync_func = ddp.no_sync
    cfg.finalize_model_grads_func = finalize_model_grads
    cfg.grad_scale_func = optimizer.scale_loss

    seq, mb = job.data.seq_length, tr.micro_batch_size
    recv_shapes, send_shapes = pipeline_shapes_hook(model, seq, mb)([], [])
    recv = None if model.pre_process else tuple(recv_shapes[0])
    send = None if model.post_process else tuple(send_shapes[0])

    grad_tensors = [b.grad_data for b in ddp.buffers] + [b.grad_data for b in getattr(ddp, "expert_parallel_buffers", [])]
    masters = [t for o in chained for g in o.shard_fp32_from_float16_groups for t in g]
    masters += [t for o in chained for g in getattr(o, "shard_fp32_groups", []) for t in g]
    states = [v for o in chained for s in o.optimizer.state.values() for v in s.values()
              if isinstance(v, torch.Tensor)]
    params = list(model.parameters())
    param_bytes = _storage_bytes(params)
    grad_bytes = _storage_bytes(grad_tensors)
    optimizer_bytes = _storage_bytes(masters + states)

    tracker = fake.PeakTracker()
    tracker.track_external(model, *[o.optimizer for o in chained], *grad_tensors, *masters)
    in_flight = max(1, min(plan.pp - stage, plan.num_microbatches))
    with tracker:
        outputs = []
        for _ in range(in_flight):  # warm-up forwards + the first steady-state forward
            tracker.reset_mod_stats()
            x = None
            if recv is not None:
                x = torch.empty(recv, dtype=dtype, requires_grad=True)
            model.set_input_tensor(x)
            tokens = torch.zeros((mb, seq), dtype=torch.long) if model.pre_process else None
            labels = torch.zeros((mb, seq), dtype=torch.long) if model.post_process else None
            out = model(tokens, labels=labels)
            if send is not None and tuple(out.shape) != send:
                raise RuntimeError(f"stage {stage} sends {tuple(out.shape)}, but the schedule's "
                                   f"p2p shape is {send}")
            if model.post_process:  # the loss function of splitllama.training.step
                out = torch.sum(out.view(-1).float() * torch.ones(mb * seq))
            outputs.append(out)
        while outputs:  # backwards, oldest first (1F1B order)
            out = outputs.pop(0)
            if model.post_process:
                out.backward()
            else:
                out.backward(torch.empty_like(out))
            del out
        finalize_model_grads([ddp])
        optimizer.step()
        optimizer.zero_grad()
    peak = tracker.get_tracker_snapshot("peak")
    total = int(sum(snap["Total"] for snap in peak.values()))
    return StageMemory(params=sum(p.numel() for p in params), param_bytes=param_bytes,
                       grad_bytes=grad_bytes, optimizer_bytes=optimizer_bytes,
                       activation_bytes=total - param_bytes - grad_bytes - optimizer_bytes,
                       peak_bytes=total, in_flight=in_flight, recv_shape=recv, send_shape=send,
                       shards=_shards(model), rank=rank)
