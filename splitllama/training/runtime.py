"""Build the run's machinery from a resolved `RunPlan`: process groups (on the plan's device),
this rank's model stage (the plan's layout, precision, layer implementation and attention
backend), DDP, optimizer, LR schedule; the data iterators are `training.app.setup_data`'s.
Megatron-Core only, no megatron/training."""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Iterator, Optional

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
from megatron.core.distributed.finalize_model_grads import finalize_model_grads
from megatron.core.optimizer import OptimizerConfig as McoreOptimizerConfig
from megatron.core.optimizer import get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

from splitllama.config.job import JobConfig
from splitllama.preflight.resolve import RunPlan
from splitllama.model.build import attention_summary, build_stage
from splitllama.model.megatron_config import Numerics
from splitllama.model.model import SplitLlamaModel
from splitllama.pipeline.layout import PipelineLayout
from splitllama.platform.device import device as local_device
from splitllama.platform.dist import init_distributed
from splitllama.platform.compat import optim as optim_compat
from splitllama.training.freeze import apply_freeze
from splitllama.training.state import TrainState

log = logging.getLogger("splitllama")


@dataclass
class Runtime:
    plan: RunPlan  # what the run was resolved to (splitllama.preflight.resolve)
    ddp: DistributedDataParallel
    inner: SplitLlamaModel
    optimizer: object
    scheduler: OptimizerParamScheduler
    dp_rank: int
    trainable_params: int
    frozen_params: int
    trainable_params_global: int
    state: TrainState = field(default_factory=TrainState)
    train_iter: Optional[Iterator] = None

    @property
    def job(self) -> JobConfig:
        return self.plan.job

    @property
    def on_cpu(self) -> bool:
        return self.plan.on_cpu

    @property
    def layout(self) -> PipelineLayout:
        return self.plan.layout

    @property
    def dp_size(self) -> int:
        return self.plan.dp

    @property
    def num_microbatches(self) -> int:
        return self.plan.num_microbatches

    @property
    def is_last_stage(self) -> bool:
        return self.inner.post_process

    @property
    def is_first_stage(self) -> bool:
        return self.inner.pre_process


def build_runtime(plan: RunPlan) -> Runtime:
    """Start torch.distributed for `plan` (resolved before, from the job and the launcher's
    world size) and build the model stage, DDP, optimizer and LR schedule."""
    job = plan.job
    par, tr = job.parallel, job.train
    on_cpu = init_distributed(par, seed=tr.seed, on_cpu=plan.on_cpu)
    if dist.get_world_size() != plan.world_size or on_cpu != plan.on_cpu:
        raise RuntimeError(f"the run was resolved for {plan.world_size} process(es) on "
                           f"{'cpu' if plan.on_cpu else 'cuda'}, but torch.distributed started "
                           f"{dist.get_world_size()} on {'cpu' if on_cpu else 'cuda'}")
    layout, bf16 = plan.layout, plan.bf16
    numerics = Numerics(params_dtype=torch.bfloat16 if bf16 else torch.float32, bf16=bf16,
                        use_cpu_initialization=on_cpu,
                        recompute_granularity=plan.recompute.granularity,
                        recompute_method=plan.recompute.method,
                        recompute_num_layers=plan.recompute.num_layers)
    built = build_stage(job.model, par, numerics, layout, impl=plan.transformer_impl,
                        backend=plan.attention_backend)
    inner = built.model
    if dist.get_rank() == 0:
        print(attention_summary(built, plan.tp), flush=True)
    if not on_cpu:
        inner.cuda(torch.cuda.current_device())
    trainable, frozen = apply_freeze(inner, job.model.freeze)
    inner.set_no_grad_prefix(_upstream_frozen(inner, layout))

    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, overlap_grad_reduce=par.overlap_grad_reduce,
        use_distributed_optimizer=par.use_distributed_optimizer,
        check_for_nan_in_grad=False, bucket_size=None if on_cpu else 40_000_000)
    ddp = DistributedDataParallel(config=inner.config, ddp_config=ddp_config, module=inner)
    opt = job.optimizer
    optimizer = get_megatron_optimizer(
        McoreOptimizerConfig(optimizer=opt.optimizer, lr=opt.lr, min_lr=opt.min_lr,
                             weight_decay=opt.weight_decay, adam_beta1=opt.adam_beta1,
                             adam_beta2=opt.adam_beta2, adam_eps=opt.adam_eps,
                             clip_grad=opt.clip_grad, bf16=bf16, params_dtype=numerics.params_dtype,
                             use_distributed_optimizer=par.use_distributed_optimizer),
        [ddp])
    optim_compat.tolerate_step(optimizer)
    iters = tr.total_iters()
    decay = opt.lr_decay_iters or iters
    warmup = min(opt.lr_warmup_iters, max(decay - 1, 0))
    if warmup != opt.lr_warmup_iters and dist.get_rank() == 0:
        print(f"note: optimizer.lr_warmup_iters={opt.lr_warmup_iters} >= {decay} decay iterations; "
              f"warming up over {warmup} instead", flush=True)
    scheduler = OptimizerParamScheduler(
        optimizer, init_lr=0.0, max_lr=opt.lr, min_lr=opt.min_lr,
        lr_warmup_steps=warmup * tr.global_batch_size,
        lr_decay_steps=decay * tr.global_batch_size, lr_decay_style=opt.lr_decay_style,
        start_wd=opt.weight_decay, end_wd=opt.weight_decay,
        wd_incr_steps=decay * tr.global_batch_size, wd_incr_style="constant")

    cfg = inner.config  # the config the schedule reads
    cfg.no_sync_func = ddp.no_sync
    cfg.finalize_model_grads_func = finalize_model_grads
    cfg.grad_scale_func = optimizer.scale_loss
    total = torch.tensor([float(trainable)], device=local_device())
    dist.all_reduce(total)
    return Runtime(plan=plan, ddp=ddp, inner=inner, optimizer=optimizer, scheduler=scheduler,
                   dp_rank=ps.get_data_parallel_rank(), trainable_params=trainable, frozen_params=frozen,
                   trainable_params_global=int(total.item()))


def _upstream_frozen(inner: SplitLlamaModel, layout: PipelineLayout) -> bool:
    """True when nothing before this stage's adapter (or its output, if the adapter is
    later) trains — on this stage or any earlier one — so that part needs no backward."""
    local = not any(p.requires_grad for n, p in inner.named_parameters()
                    if n.startswith(("embedding.", "lower.")))
    group = ps.get_pipeline_model_parallel_group()
    flag = torch.tensor([0.0 if local else 1.0], device=local_device())
    if ps.get_pipeline_model_parallel_world_size() > 1:
        # a stage's prefix is frozen iff this and every earlier stage's pre-adapter part is
        flags = [torch.zeros(1, device=local_device()) for _ in range(ps.get_pipeline_model_parallel_world_size())]
        dist.all_gather(flags, flag, group=group)
        return all(f.item() == 0.0 for f in flags[: inner.stage + 1])
    return local
