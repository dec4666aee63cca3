"""Choose this run's pipeline layout: explicit, or planned (cost / uniform / params)."""
from __future__ import annotations

from splitllama.config.job import JobConfig
from splitllama.pipeline.layout import PipelineLayout


def choose_layout(job: JobConfig, dp: int) -> PipelineLayout:
    m, par = job.model, job.parallel
    pp = par.pipeline_model_parallel_size
    if pp == 1:
        layout = PipelineLayout.parse(f"L{m.num_layers_lower},A,U{m.num_layers_upper}")
    elif par.pipeline_layout:
        layout = PipelineLayout.parse(par.pipeline_layout)
    elif par.pipeline_split == "uniform":
        layout = PipelineLayout.uniform(m.num_layers_lower, m.num_layers_upper, pp)
    else:
        from splitllama.pipeline.plan import plan_for_job

        layout = plan_for_job(job, dp)
    layout.validate(m.num_layers_lower, m.num_layers_upper, pp)
    return layout
