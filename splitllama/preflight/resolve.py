"""The resolve step: a loaded `JobConfig` and a world size in, a frozen `RunPlan` out.

Everything a run derives from its configuration is computed and validated here, once, before
torch.distributed starts (pure: no process group, no model, and no files except the unit
profile ``parallel.profile_file`` when one is configured; the job is not modified). A `RunPlan` holds:

* ``job``: the validated sections as the run uses them. A value that must differ from the
  loaded one is set with `dataclasses.replace`, never by assignment: the null tokenizer's
  ``data.vocab_size`` defaults to the model's vocabulary;
* ``world_size``, ``tp``, ``pp``, ``dp``: the parallel layout (world = tp x pp x dp);
* ``num_microbatches``: micro-batches per step on one data-parallel rank
  (`num_microbatches` below is the one place it is computed);
* ``layout``: the `PipelineLayout` this run builds, and ``stage_plan``: the planner's
  `StagePlan` costing it (when PP > 1, an explicit layout or a memory budget is set; else None);
* ``split``: the `SplitInputs` its layout was chosen / costed on (the unit costs, analytic or
  from a profile, derived once per run; None at PP=1 without a memory budget);
* ``on_cpu``, ``bf16``, ``transformer_impl``, ``attention_backend``: where the run computes
  (on CPU: the CPU harness), the effective precision (``train.bf16`` null: bf16 on GPU, fp32 on
  CPU), the layer implementation (`resolve_impl`) and the core attention (`resolve_backend`),
  decided once by `compute_choices` (the profile key of `profile_source.environment_key` too);
  the model build, the runtime and the start-up report read them from the plan;
* ``recompute``: the effective activation recomputation (`Recompute`).

`stage_plan` (the split method of ``parallel.pipeline_layout`` / ``parallel.pipeline_split``)
and `split_inputs` (the units it costs: `split_costs` is the one branch point that picks where
unit costs come from: the analytic model, calibrated by a profile when one is set, or the
measured units and per-stage costs of a profile for ``pipeline_split=profile``) serve `tools/plan_pipeline.py` and the benchmarks too; the planner in
`splitllama.pipeline.plan` takes only those narrow arguments, never the job.

Pure but for the profile: no process group, and no torch or Megatron-Core at import (the
decisions on the layer implementation and attention backend import `splitllama.model` when
called; a missing profile with ``parallel.profile_if_missing`` is taken by a helper process,
`profile_source`).
"""
from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass
from typing import Optional

from splitllama.config.job import JobConfig
from splitllama.config.train import TrainConfig
from splitllama.pipeline.cost import Hardware, Unit, units_for
from splitllama.pipeline.layout import PipelineLayout
from splitllama.preflight.compute import compute_choices
from splitllama.pipeline.plan import (GiB, StageOverhead, StagePlan, evaluate, microbatches_per_step,
                                      params_balanced, plan, uniform)


@dataclass(frozen=True)
class Recompute:
    """Effective activation recomputation (Megatron's names; method / layers only with full)."""

    granularity: Optional[str] = None  # None | "full" | "selective"
    method: Optional[str] = None  # "uniform" | "block" with full
    num_layers: Optional[int] = None  # with full


@dataclass(frozen=True)
class SplitInputs:
    """What the pipeline planner needs, in its own narrow terms."""

    units: tuple[Unit, ...]
    pp: int
    num_microbatches: int
    memory_budget: Optional[float]  # bytes per GPU; None: unconstrained
    stage_overhead: Optional[StageOverhead] = None  # measured per-stage costs (a profile)


@dataclass(frozen=True)
class RunPlan:
    """Everything derived from a job for a world size (see the module docstring)."""

    job: JobConfig
    world_size: int
    tp: int
    pp: int
    dp: int
    num_microbatches: int
    layout: PipelineLayout
    stage_plan: Optional[StagePlan]
    split: Optional[SplitInputs]  # the unit costs the layout was chosen / costed on
    on_cpu: bool  # computes on CPU: gloo and the CPU harness
    bf16: bool
    transformer_impl: str  # "transformer_engine" | "local"
    attention_backend: str  # "sdpa" | "local" | "transformer_engine"
    recompute: Recompute


def num_microbatches(train: TrainConfig, dp: int) -> int:
    """Micro-batches per step on one data-parallel rank (`microbatches_per_step`)."""
    return microbatches_per_step(train.global_batch_size, train.micro_batch_size, dp)


def resolve(job: JobConfig, world_size: int, *, on_cpu: Optional[bool] = None,
            hardware: Optional[Hardware] = None) -> RunPlan:
    """Validate `job` for `world_size` processes and derive the run's plan (the job is left
    as it is). ``on_cpu``: whether the run computes on CPU (None: as
    `splitllama.platform.cpu.wanted` decides, without enabling anything). Raises ValueError
    naming the first problem."""
    tr = job.train
    tp, pp, dp = check_parallel(job, world_size)
    tr.validate(dp)
    job.checkpoint.validate()
    job.logging.validate()
    job.rl.validate()
    check_model(job)
    data = job.data
    if data.tokenizer_type == "null" and data.vocab_size is None:
        data = dataclasses.replace(data, vocab_size=job.model.vocab_size)  # synthetic ids span the model's vocab
    data.validate()
    effective = dataclasses.replace(job, data=data) if data is not job.data else job
    compute = compute_choices(effective, on_cpu)
    check_packing(effective, compute.attention_backend)
    layout, costed, split = _choose_layout(effective, dp, hardware)
    full = tr.recompute_granularity == "full"
    recompute = Recompute(tr.recompute_granularity, (tr.recompute_method or "uniform") if full else None,
                          (tr.recompute_num_layers or 1) if full else None)
    return RunPlan(job=effective, world_size=world_size, tp=tp, pp=pp, dp=dp,
                   num_microbatches=num_microbatches(tr, dp), layout=layout, stage_plan=costed, split=split,
                   on_cpu=compute.on_cpu, bf16=compute.bf16, transformer_impl=compute.transformer_impl,
                   attention_backend=compute.attention_backend, recompute=recompute)


# ---- checks (shared with tools/plan_pipeline.py) ---------------------------------------------
def check_parallel(job: JobConfig, world_size: int) -> tuple[int, int, int]:
    """The parallel section for `world_size` processes; returns (tp, pp, dp)."""
    par = job.parallel
    par.validate(world_size)
    tp, pp = par.tensor_model_parallel_size, par.pipeline_model_parallel_size
    return tp, pp, world_size // (tp * pp)


def check_model(job: JobConfig) -> None:
    """The model against the parallel layout and the sequence length."""
    m = job.model
    m.validate(job.parallel.tensor_model_parallel_size)
    m.check_pipeline_size(job.parallel.pipeline_model_parallel_size)
    m.check_seq_length(job.data.seq_length)


def check_packing(job: JobConfig, backend: Optional[str] = None) -> None:
    """Document masking / packing the attention backend (resolved; None: `compute_choices`
    decides) cannot honour, and packs that would not be one per micro-batch, are refused
    (ValueError naming the flag)."""
    from splitllama.model.attention import check_packing_support

    d = job.data
    backend = backend or compute_choices(job).attention_backend
    check_packing_support(backend, reset_attention_mask=d.reset_attention_mask, packed_sequences=d.packed_sequences)
    if d.packed_sequences and job.train.micro_batch_size != 1:
        raise ValueError(f"data.packed_sequences needs train.micro_batch_size=1 (one pack of "
                         f"data.seq_length tokens per micro-batch), got {job.train.micro_batch_size}")


# ---- the pipeline split -----------------------------------------------------------------------
def units_for_job(job: JobConfig, dp: int = 1, hardware: Optional[Hardware] = None) -> list[Unit]:
    """The analytic cost model's units for the job's shapes and settings (the planner models
    bf16 unless train.bf16 is false, on CPU too: it plans for the target hardware)."""
    par, tr = job.parallel, job.train
    return units_for(job.model, job.data.seq_length, tr.micro_batch_size, par.tensor_model_parallel_size,
                     dp, tr.recompute_granularity, 4 if tr.bf16 is False else 2,
                     par.use_distributed_optimizer, sequence_parallel=par.sequence_parallel,
                     hardware=hardware)


def split_costs(job: JobConfig, dp: int, hardware: Optional[Hardware] = None,
                profile=None) -> tuple[list[Unit], Optional[StageOverhead]]:
    """(units, per-stage overhead) the pipeline split is chosen on. THE branch point for their
    source: for ``pipeline_split=profile`` the measured units and per-stage costs of
    ``parallel.profile_file``; otherwise the analytic cost model, with `calibrate`d hardware when
    a profile file is set and no ``hardware`` is given (H100 defaults without one)."""
    from splitllama.pipeline import measured
    from splitllama.preflight import profile_source

    par = job.parallel
    if profile is None and par.profile_file and (par.pipeline_split == "profile" or hardware is None):
        profile = profile_source.job_profile(job)
    if par.pipeline_split == "profile":
        return (measured.units_from_profile(profile, job.model, dp, par.use_distributed_optimizer),
                measured.stage_overhead(profile, dp, par.use_distributed_optimizer))
    if hardware is None and profile is not None:
        hardware = measured.calibrate(profile, job.model)
    return units_for_job(job, dp, hardware), None


def split_inputs(job: JobConfig, dp: int, hardware: Optional[Hardware] = None) -> SplitInputs:
    par = job.parallel
    units, overhead = split_costs(job, dp, hardware)
    return SplitInputs(tuple(units), par.pipeline_model_parallel_size,
                       num_microbatches(job.train, dp),
                       par.memory_budget_gb * GiB if par.memory_budget_gb else None, overhead)


def stage_plan(job: JobConfig, dp: int, hardware: Optional[Hardware] = None) -> StagePlan:
    """Cost the job's pipeline split: ``parallel.pipeline_layout`` when set (parsed, validated,
    costed), else ``parallel.pipeline_split`` = cost (planner over analytic costs) | uniform |
    params | profile (planner over a profile's measured unit times and per-stage costs), under
    ``parallel.memory_budget_gb``. Warns (does not raise) when an explicit / uniform / params
    split exceeds the budget; the cost planner raises when no split fits."""
    return _stage_plan(job, split_inputs(job, dp, hardware))  # units: see split_costs


def _stage_plan(job: JobConfig, s: SplitInputs) -> StagePlan:
    par = job.parallel
    if par.pipeline_layout:
        result = evaluate(par.pipeline_layout, s.units, s.pp, s.memory_budget, s.num_microbatches,
                          stage_overhead=s.stage_overhead)
    elif par.pipeline_split == "profile":
        result = plan(s.units, s.pp, "1f1b", s.memory_budget, s.num_microbatches,
                      stage_overhead=s.stage_overhead)
    elif par.pipeline_split == "cost":
        result = plan(s.units, s.pp, "1f1b", s.memory_budget, s.num_microbatches)
    elif par.pipeline_split == "uniform":
        result = uniform(s.units, s.pp, s.memory_budget, s.num_microbatches)
    elif par.pipeline_split == "params":
        result = params_balanced(s.units, s.pp, s.memory_budget, s.num_microbatches)
    else:
        raise ValueError(f"parallel.pipeline_split must be cost|uniform|params|profile, got '{par.pipeline_split}'")
    if not result.fits:
        worst = max(st.memory_total for st in result.stages)
        warnings.warn(f"pipeline layout '{result.layout}' ({result.method}) is predicted to need "
                      f"{worst / GiB:.1f} GiB on its largest stage, over the budget of "
                      f"{par.memory_budget_gb} GiB per GPU")
    return result


def _choose_layout(job: JobConfig, dp: int, hardware: Optional[Hardware]
                   ) -> tuple[PipelineLayout, Optional[StagePlan], Optional[SplitInputs]]:
    """One stage at PP=1 (a memory budget is checked there too: a single stage over budget is
    refused), else the split method's layout; with the plan that costs it and its inputs (the
    unit costs are derived, and a profile read, once per run)."""
    m, par = job.model, job.parallel
    pp = par.pipeline_model_parallel_size
    if pp == 1 and not par.pipeline_layout:
        layout, costed, s = PipelineLayout.single_stage(m.num_layers_lower, m.num_layers_upper), None, None
        if par.memory_budget_gb:  # raises, naming the need, when the one stage does not fit
            s = split_inputs(job, dp, hardware)
            costed = plan(s.units, 1, "1f1b", s.memory_budget, s.num_microbatches,
                          stage_overhead=s.stage_overhead)
    else:
        s = split_inputs(job, dp, hardware)
        costed = _stage_plan(job, s)
        layout = costed.layout
    layout.validate(m.num_layers_lower, m.num_layers_upper, pp)
    return layout, costed, s
