"""Search the whole parallel layout of a stitched model on G GPUs (pure Python, no torch).

For every tensor-parallel size ``tp`` (dividing both blocks' attention heads, KV heads, MLP
width and the vocab, as `ModelConfig.validate` demands, and dividing the GPUs of one node so
that a TP group never leaves its node), pipeline size ``pp`` (1 .. N + 1 + M units, as
`ModelConfig.check_pipeline_size` demands), data-parallel size ``dp = G / (tp * pp)``,
micro-batch size ``mbs`` (``global_batch % (mbs * dp) == 0``) and activation recomputation
(none, selective, full), with sequence parallelism on whenever ``tp > 1``, it costs the unit
chain (``units_source``, by default the analytic model `pipeline.cost.units_for`), plans the
stages with the exact 1F1B planner `pipeline.plan.plan` under the per-GPU memory budget and
keeps the best split of each combination. Candidates are ranked by predicted tokens/s per GPU
``global_batch * seq / (step_time_s * G)`` where ``step_time_s`` is the plan's own prediction
(today ``(m + pp - 1) * bottleneck stage time``, ``m = global_batch / (mbs * dp)``).

How each number is estimated: stage times and memory are those of the unit source (the
analytic model: FLOPs at a fixed fraction of peak plus a bandwidth term for the embedding and
the cross-entropy; memory = weights + fp32 grads + Adam state sharded over DP by the
distributed optimizer + 1F1B in-flight activations); see `pipeline/cost.py`.

NOT modelled (each favours layouts whose real cost is higher than predicted): tensor-parallel
communication (all-reduce / reduce-scatter / all-gather per layer, so large TP looks free),
the data-parallel gradient reduce-scatter / all-reduce, the distributed optimizer's parameter
all-gather, the optimizer step, pipeline p2p transfer time and its overlap with compute,
kernel efficiency falling with smaller per-GPU GEMMs (high TP, small micro-batches), and
memory outside the model (CUDA context, NCCL buffers, allocator fragmentation: leave headroom
in the budget). Because of the first and the last, layouts whose predicted step times agree
(within a relative 1e-9) are ordered by smaller TP, then smaller PP, then larger micro-batch,
then lower peak memory.

Pruning keeps the result exact: a combination is skipped only when a lower bound of its largest
stage memory exceeds the budget, or a lower bound of its step time
(``(m + pp - 1) * max(total / pp, largest unit)``; interleaved: ``m * max(total / pp, largest
unit)``) cannot enter the top K. Plans may give the embedding or the head a stage of their own,
and with ``vpp_options`` interleave ``pp * vpp`` chunks (`plan`).
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

from splitllama.config.model import ModelConfig
from splitllama.pipeline.cost import Hardware, Unit, units_for
from splitllama.pipeline.plan import GiB, StagePlan, microbatches_per_step, plan

RECOMPUTE_OPTIONS = ("none", "selective", "full")
TIE_RTOL = 1e-9
NOT_MODELLED = ("not modelled: TP communication, DP gradient reduction, the distributed optimizer's "
                "all-gather, optimizer step, p2p time/overlap, GEMM efficiency vs shape, memory "
                "outside the model (CUDA context, NCCL buffers, fragmentation)")

# units_source(model_cfg, seq, micro_batch, tp, dp, recompute, *, sequence_parallel) -> units
# (or None when the source has no costs for these shapes: the combination is skipped)
UnitsSource = Callable[..., Optional[list]]


def analytic_units(hardware: Optional[Hardware] = None, dtype_bytes: int = 2,
                   distributed_optimizer: bool = True) -> UnitsSource:
    """The analytic cost model `units_for` as a units source."""
    return functools.partial(units_for, dtype_bytes=dtype_bytes,
                             distributed_optimizer=distributed_optimizer, hardware=hardware)


@dataclass(frozen=True)
class Candidate:
    tp: int
    pp: int
    dp: int
    micro_batch_size: int
    recompute: str  # none | selective | full
    sequence_parallel: bool
    plan: StagePlan
    tokens_per_s_per_gpu: float
    vpp: int = 1

    @property
    def layout(self) -> str:
        return str(self.plan.layout)

    @property
    def step_time_s(self) -> float:
        return self.plan.step_time_s

    @property
    def stage_memory_gib(self) -> list[float]:
        return [s.memory_total / GiB for s in self.plan.stages]

    @property
    def peak_memory_gib(self) -> float:
        return max(self.stage_memory_gib)

    def overrides(self) -> list[str]:
        """The config overrides that run this candidate (launch it on tp * pp * dp GPUs)."""
        return [f"parallel.tensor_model_parallel_size={self.tp}",
                f"parallel.pipeline_model_parallel_size={self.pp}",
                f"parallel.sequence_parallel={str(self.sequence_parallel).lower()}",
                f"parallel.pipeline_layout={self.layout}",
                *([f"parallel.virtual_pipeline_model_parallel_size={self.vpp}"] if self.vpp > 1 else []),
                f"train.micro_batch_size={self.micro_batch_size}",
                f"train.recompute_granularity={'null' if self.recompute == 'none' else self.recompute}"]

    def to_dict(self) -> dict:
        p = self.plan
        return {"tp": self.tp, "pp": self.pp, "vpp": self.vpp, "dp": self.dp, "micro_batch_size": self.micro_batch_size,
                "recompute": self.recompute, "sequence_parallel": self.sequence_parallel,
                "layout": self.layout, "predicted_tokens_per_s_per_gpu": self.tokens_per_s_per_gpu,
                "predicted_step_time_s": self.step_time_s, "num_microbatches": p.num_microbatches,
                "bottleneck_over_ideal": p.bottleneck_over_ideal, "bubble_fraction": p.bubble_fraction,
                "peak_memory_gib": self.peak_memory_gib, "stage_memory_gib": self.stage_memory_gib,
                "overrides": self.overrides()}


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def tp_sizes(model_cfg: ModelConfig, gpus: int, gpus_per_node: int) -> list[int]:
    """TP sizes the training run accepts (`ModelConfig.validate`) that stay inside one node."""
    out = []
    for tp in divisors(math.gcd(gpus, gpus_per_node)):
        try:
            model_cfg.validate(tp)
        except ValueError:
            continue
        out.append(tp)
    return out


def _memory_lower_bound(units: Sequence[Unit], pp: int, m: int) -> float:
    """A lower bound of the largest stage memory of any `pp`-stage split (1F1B, m microbatches)."""
    def mem(group: Sequence[Unit], in_flight: int) -> float:
        return sum(u.static_bytes + in_flight * u.act_bytes_per_mb for u in group) + \
            max(u.act_working_bytes for u in group)
    core = units[1:-1]
    # the embedding / head may be alone on their stage (E|..., ...|H)
    first = mem([units[0]], max(1, min(pp, m)))
    last = mem([units[-1]], 1) if pp > 1 else mem(units, max(1, min(pp, m)))
    single = max(mem([u], 1) for u in core)
    average = sum(u.static_bytes + u.act_bytes_per_mb for u in units) / pp
    return max(first, last, single, average)


def _time_lower_bound(units: Sequence[Unit], pp: int, m: int, vpp: int = 1) -> float:
    """A lower bound of the 1F1B step time (m + pp - 1) * bottleneck of any `pp`-stage split;
    interleaved (vpp > 1): m * max(total / pp, largest unit), every rank's own work."""
    core = units[1:-1]
    if vpp > 1:
        return m * max(sum(u.time for u in units) / pp, max(u.time for u in units))
    if pp == 1:
        bottleneck = sum(u.time for u in units)
    else:
        # the embedding / head may sit alone on a stage (E|..., ...|H): bound by the units alone
        bottleneck = max(sum(u.time for u in units) / pp, max(u.time for u in units))
    return (m + pp - 1) * bottleneck


def _rank_key(c: Candidate) -> tuple:
    """Best first: step time (ties within TIE_RTOL), then smaller tp, pp, vpp, larger mbs, less memory."""
    step = float(f"{c.step_time_s:.9e}")
    return (step, c.tp, c.pp, c.vpp, -c.micro_batch_size, c.peak_memory_gib, RECOMPUTE_OPTIONS.index(c.recompute))


def search(model_cfg: ModelConfig, gpus: int, seq: int, global_batch: int, memory_budget: float, *,
           gpus_per_node: int = 8, top: int = 5, units_source: Optional[UnitsSource] = None,
           recompute: Sequence[str] = RECOMPUTE_OPTIONS,
           micro_batch_sizes: Optional[Sequence[int]] = None,
           vpp_options: Sequence[int] = (1,)) -> list[Candidate]:
    """The `top` best layouts on `gpus` GPUs (memory_budget: bytes per GPU), best first.

    Raises ValueError for input the training run would refuse (sequence too long, bad sizes);
    returns [] when no layout fits the budget. ``micro_batch_sizes`` restricts the sizes tried
    (default: every divisor of global_batch / dp). ``vpp_options``: virtual pipeline sizes tried
    (interleaved 1F1B, `plan(vpp=...)`) where pp >= 2, pp * vpp <= the units and the micro-batch
    count is a multiple of pp (Megatron-Core's condition)."""
    if min(gpus, gpus_per_node, seq, global_batch, top) < 1:
        raise ValueError(f"gpus, gpus_per_node, seq, global_batch and top must be >= 1 (got {gpus}, "
                         f"{gpus_per_node}, {seq}, {global_batch}, {top})")
    if gpus > gpus_per_node and gpus % gpus_per_node:
        raise ValueError(f"--gpus {gpus} is not a multiple of --gpus-per-node {gpus_per_node}")
    bad = [r for r in recompute if r not in RECOMPUTE_OPTIONS]
    if bad:
        raise ValueError(f"recompute must be among {RECOMPUTE_OPTIONS}, got {bad}")
    model_cfg.validate(1)
    model_cfg.check_seq_length(seq)
    source = units_source or analytic_units()
    combos = []  # (time lower bound, tp, pp, dp, mbs, recompute, units, m)
    for tp in tp_sizes(model_cfg, gpus, gpus_per_node):
        for pp in range(1, model_cfg.num_pipeline_units + 1):
            if gpus % (tp * pp):
                continue
            dp = gpus // (tp * pp)
            if global_batch % dp:
                continue
            for mbs in divisors(global_batch // dp):
                if micro_batch_sizes is not None and mbs not in micro_batch_sizes:
                    continue
                m = microbatches_per_step(global_batch, mbs, dp)
                for rc in recompute:
                    units = source(model_cfg, seq, mbs, tp, dp, rc, sequence_parallel=tp > 1)
                    if units is None or _memory_lower_bound(units, pp, m) > memory_budget:
                        continue
                    for v in vpp_options:
                        if v > 1 and (pp < 2 or pp * v > model_cfg.num_pipeline_units or m < pp or m % pp):
                            continue
                        combos.append((_time_lower_bound(units, pp, m, v), tp, pp, v, dp, mbs, rc, units, m))
    combos.sort(key=lambda c: c[:7])
    tokens = global_batch * seq
    best: list[Candidate] = []
    for bound, tp, pp, v, dp, mbs, rc, units, m in combos:
        if len(best) >= top and bound > best[top - 1].step_time_s * (1 + TIE_RTOL):
            break  # sorted by bound: nothing later can enter the top
        try:
            p = plan(units, pp, "1f1b", memory_budget, m, vpp=v)
        except ValueError:
            continue  # no split fits the budget
        best.append(Candidate(tp, pp, dp, mbs, rc, tp > 1, p, tokens / (p.step_time_s * gpus), v))
        best.sort(key=_rank_key)
        del best[top:]
    return best

