"""Choose this run's pipeline layout: one stage at PP=1, else the planner's choice
(explicit `parallel.pipeline_layout`, or `parallel.pipeline_split` cost | uniform | params).
`parallel.memory_budget_gb` is checked at PP=1 too: a single stage over budget is refused."""
from __future__ import annotations

from splitllama.config.job import JobConfig
from splitllama.model.build import single_stage_layout
from splitllama.pipeline.layout import PipelineLayout
from splitllama.pipeline.cost import units_for_job
from splitllama.pipeline.plan import GiB, plan, plan_for_job


def choose_layout(job: JobConfig, dp: int) -> PipelineLayout:
    m = job.model
    par = job.parallel
    pp = par.pipeline_model_parallel_size
    if pp == 1 and not par.pipeline_layout:
        layout = single_stage_layout(m)
        if par.memory_budget_gb:  # raises, naming the need, when the one stage does not fit
            tr = job.train
            plan(units_for_job(job, dp), 1, "1f1b", par.memory_budget_gb * GiB,
                 max(1, tr.global_batch_size // (tr.micro_batch_size * dp)))
    else:
        layout = plan_for_job(job, dp=dp)
    layout.validate(m.num_layers_lower, m.num_layers_upper, pp)
    return layout
