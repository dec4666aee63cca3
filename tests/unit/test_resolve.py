"""The resolve step (splitllama/preflight/resolve.py): pure (no process group, the job unchanged),
the derived values (dp, micro-batch count, layout, precision, recompute, effective vocab) and
the same error messages as the checks it gathers."""
from __future__ import annotations

import copy
import dataclasses
import re
from pathlib import Path

import pytest

from splitllama.config.job import JobConfig, load_job_config
from splitllama.preflight.resolve import RunPlan, num_microbatches, resolve
from splitllama.pipeline.cost import units_for
from splitllama.pipeline.plan import plan

TINY = str(Path(__file__).resolve().parents[2] / "configs" / "tiny.yaml")


def tiny(*overrides: str) -> JobConfig:
    return load_job_config(TINY, list(overrides))


def test_resolve_is_pure(monkeypatch):
    import torch.distributed as dist
    from megatron.core import parallel_state

    from splitllama.platform import cpu

    def forbidden(*a, **k):
        raise AssertionError("resolve started something")

    monkeypatch.setattr(dist, "init_process_group", forbidden)
    monkeypatch.setattr(parallel_state, "initialize_model_parallel", forbidden)
    monkeypatch.setattr(cpu, "enable", forbidden)
    job = tiny("data.vocab_size=null", "parallel.pipeline_model_parallel_size=2", "train.micro_batch_size=1")
    before, deep = job.to_dict(), copy.deepcopy(job)
    p = resolve(job, 4)
    assert job.to_dict() == before and job == deep and job.explicit == deep.explicit  # the job is unchanged
    assert job.data.vocab_size is None and p.job.data.vocab_size == 512
    assert p.job.model is job.model and p.job.train is job.train  # only the differing section is new
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.dp = 3  # type: ignore[misc]


def test_parallel_sizes_and_microbatches():
    p = resolve(tiny(), 1, on_cpu=True)
    assert (p.world_size, p.tp, p.pp, p.dp, p.num_microbatches) == (1, 1, 1, 1, 2)  # 8 / (4 x 1)
    assert str(p.layout) == "L2,A,U3" and p.stage_plan is None and p.job.parallel.sequence_parallel is False
    p = resolve(tiny(), 2, on_cpu=True)
    assert (p.dp, p.num_microbatches) == (2, 1)
    p = resolve(tiny("parallel.pipeline_model_parallel_size=2", "train.micro_batch_size=1"), 4, on_cpu=True)
    assert (p.pp, p.dp, p.num_microbatches) == (2, 2, 4)
    ref = plan(units_for(p.job.model, 64, 1, 1, 2, None, 2, True, sequence_parallel=False), 2,
               num_microbatches=4)  # the planner on the same units (bf16 model of the target)
    assert p.stage_plan is not None and p.stage_plan.layout == p.layout == ref.layout
    assert p.stage_plan.num_microbatches == p.num_microbatches
    p = resolve(tiny("parallel.tensor_model_parallel_size=2", "parallel.sequence_parallel=true"), 2, on_cpu=True)
    assert (p.tp, p.dp, p.job.parallel.sequence_parallel) == (2, 1, True)
    assert num_microbatches(tiny().train, 16) == 1  # never below one (the planning tool's case)


def test_explicit_layout_and_memory_budget():
    p = resolve(tiny("parallel.pipeline_model_parallel_size=3", "parallel.pipeline_layout=L2|A,U1|U2",
                     "train.micro_batch_size=1"), 3, on_cpu=True)
    assert str(p.layout) == "L2|A,U1|U2" and p.stage_plan.method == "explicit"
    p = resolve(tiny("parallel.memory_budget_gb=1"), 1, on_cpu=True)  # PP=1 costed under a budget
    assert p.stage_plan is not None and p.stage_plan.fits and p.stage_plan.layout == p.layout
    with pytest.raises(ValueError, match=r"no 1-stage pipeline plan fits the memory budget"):
        resolve(tiny("parallel.memory_budget_gb=0.0001"), 1, on_cpu=True)


def test_precision_and_recompute():
    assert resolve(tiny(), 1, on_cpu=True).bf16 is False  # fp32 on CPU
    assert resolve(tiny(), 1, on_cpu=False).bf16 is True  # bf16 on GPU
    assert resolve(tiny("train.bf16=false"), 1, on_cpu=False).bf16 is False
    assert resolve(tiny("train.bf16=true"), 1, on_cpu=True).bf16 is True
    r = resolve(tiny("train.recompute_granularity=full"), 1, on_cpu=True).recompute
    assert (r.granularity, r.method, r.num_layers) == ("full", "uniform", 1)  # Megatron's defaults
    r = resolve(tiny("train.recompute_granularity=full", "train.recompute_method=block",
                     "train.recompute_num_layers=2"), 1, on_cpu=True).recompute
    assert (r.method, r.num_layers) == ("block", 2)
    r = resolve(tiny("train.recompute_granularity=selective", "train.recompute_method=block"), 1, on_cpu=True).recompute
    assert (r.granularity, r.method, r.num_layers) == ("selective", None, None)
    assert resolve(tiny(), 1, on_cpu=True).recompute.granularity is None


@pytest.mark.parametrize("overrides, world, message", [
    (["parallel.tensor_model_parallel_size=2"], 3, "world size 3 is not divisible by tp*pp = 2"),
    (["parallel.pipeline_model_parallel_size=7"], 7,
     "parallel.pipeline_model_parallel_size 7 is more than the 6 pipeline units of this model (2 lower "
     "layers + adapter + 3 upper layers; every stage needs one): use 1..6"),
    ([], 4, "train.global_batch_size 8 is not divisible by micro_batch_size 4 x data-parallel size 4"),
    (["parallel.sequence_parallel=true"], 1, "parallel.sequence_parallel=true needs tensor_model_parallel_size > 1"),
    (["parallel.pipeline_model_parallel_size=2", "parallel.pipeline_layout=L2,A,U3", "train.micro_batch_size=1"], 2,
     "pipeline layout 'L2,A,U3' has 1 stages, pipeline_model_parallel_size is 2"),
    (["data.seq_length=512"], 1, "data.seq_length 512 is longer than model.lower.max_position_embeddings 256"),
    (["data.packed_sequences=true", "model.attention_backend=sdpa"], 1, "data.packed_sequences needs train.micro_batch_size=1"),
])
def test_errors_name_the_problem(overrides, world, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        resolve(tiny(*overrides), world, on_cpu=True)


def test_runplan_fields_are_documented():
    import splitllama.preflight.resolve as mod

    for f in dataclasses.fields(RunPlan):
        assert f"``{f.name}``" in mod.__doc__, f"RunPlan.{f.name} is not listed in the module docstring"


def test_compute_decisions_are_made_once_into_the_plan():
    """Device, precision, layer implementation and attention backend: `compute_choices` decides,
    the plan carries them, and the profile key is made of the same decisions."""
    from splitllama.preflight.compute import compute_choices
    from splitllama.preflight.profile_source import environment_key

    p = resolve(tiny(), 1, on_cpu=True)  # no Transformer Engine here: auto -> local + sdpa; CPU -> fp32
    assert (p.on_cpu, p.bf16, p.transformer_impl, p.attention_backend) == (True, False, "local", "sdpa")
    p = resolve(tiny("model.attention_backend=local", "train.bf16=true"), 1, on_cpu=True)
    assert (p.bf16, p.attention_backend) == (True, "local")
    assert resolve(tiny(), 1, on_cpu=False).bf16 is True  # null: bf16 on GPU
    with pytest.raises(ValueError, match="attention_backend=transformer_engine needs"):
        resolve(tiny("model.attention_backend=transformer_engine", "model.transformer_impl=local"), 1)
    c, key = compute_choices(tiny()), environment_key(tiny())
    assert (key["device"] == "cpu") == c.on_cpu and key["dtype"] == ("bf16" if c.bf16 else "fp32")
    assert (key["transformer_impl"], key["attention_backend"]) == (c.transformer_impl, c.attention_backend)
