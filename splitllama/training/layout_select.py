"""Choose this run's pipeline layout: one stage at PP=1, else the planner's choice
(explicit `parallel.pipeline_layout`, or `parallel.pipeline_split` cost | uniform | params)."""
from __future__ import annotations

from splitllama.config.job import JobConfig
from splitllama.model.build import single_stage_layout
from splitllama.pipeline.layout import PipelineLayout
from splitllama.pipeline.plan import plan_for_job


def choose_layout(job: JobConfig, dp: int) -> PipelineLayout:
    m = job.model
    pp = job.parallel.pipeline_model_parallel_size
    if pp == 1 and not job.parallel.pipeline_layout:
        layout = single_stage_layout(m)
    else:
        layout = plan_for_job(job, dp=dp)
    layout.validate(m.num_layers_lower, m.num_layers_upper, pp)
    return layout
