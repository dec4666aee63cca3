"""Adapter-only warmup (model.freeze=all_but_adapter): frozen parameters stay bit-identical,
only the adapter trains, the optimizer and DDP buffers hold only adapter parameters, frozen
stages before the adapter run without autograd, and warmup checkpoints save / resume /
seed full training on a PP=2 run whose first stage is entirely frozen."""
from __future__ import annotations

import json

import pytest

from splitllama.checkpoint import dirs
from tests import apprun
from tests.launch import torchrun

pytestmark = pytest.mark.distributed
WORKER = "tests/distributed/warmup_worker.py"


def _records(tmp_path, nproc, *overrides):
    out = tmp_path / "out.json"
    torchrun(nproc, WORKER, out, *overrides)
    return json.loads(out.read_text())


def _adapter_only(rec):
    assert all(rec["applied"])
    assert rec["changed"] == ["adapter.linear.weight"]
    assert rec["in_buffers"] == ["adapter.linear.weight"]
    assert rec["trainable"] == rec["adapter_numel"]
    assert rec["optimizer_elements"] == rec["adapter_numel"] // rec["dp"]


def test_warmup_pp1(tmp_path):
    (rec,) = _records(tmp_path, 1)
    _adapter_only(rec)
    assert rec["no_grad_prefix"] and rec["grad_modes"] == [["embedding", False], ["lower", False]]


def test_warmup_dp2_shards_adapter_state(tmp_path):
    recs = _records(tmp_path, 2)
    for rec in recs:
        _adapter_only(rec)  # each DP rank holds half of the adapter's optimizer state


def test_warmup_pp2_frozen_first_stage(tmp_path):
    recs = _records(tmp_path, 2, "parallel.pipeline_model_parallel_size=2", "parallel.pipeline_layout=L2|A,U3")
    s0, s1 = sorted(recs, key=lambda r: r["stage"])
    assert s0["trainable"] == 0 and s0["changed"] == [] and s0["in_buffers"] == [] and s0["optimizer_elements"] == 0
    assert s0["grad_modes"] == [["embedding", False], ["lower", False]]  # no backward through frozen layers
    _adapter_only(s1)


def test_warmup_checkpoints_on_pp2_with_a_frozen_stage(tmp_path):
    pp2 = ["parallel.pipeline_model_parallel_size=2", "parallel.pipeline_layout=L2|A,U3"]
    warm, m1 = tmp_path / "warm", tmp_path / "m1.jsonl"
    apprun.run(2, ["model.freeze=all_but_adapter", "train.train_iters=6", "train.exit_after_iters=3",
                   f"checkpoint.save={warm}", f"checkpoint.load={warm}", f"logging.metrics_file={m1}", *pp2])
    apprun.run(2, ["model.freeze=all_but_adapter", "train.train_iters=6",
                   f"checkpoint.save={warm}", f"checkpoint.load={warm}", f"logging.metrics_file={m1}", *pp2])
    assert sorted(apprun.losses(m1)) == list(range(1, 7))  # saved at 3, resumed, no gap or repeat
    assert (warm / "latest").read_text().strip() == "iter_0000006"
    full, m2 = tmp_path / "full", tmp_path / "m2.jsonl"
    p = apprun.run(2, [f"checkpoint.load={warm}", "checkpoint.finetune=true", "train.train_iters=3",
                       f"checkpoint.save={full}", f"logging.metrics_file={m2}", *pp2])
    assert sorted(apprun.losses(m2)) == [1, 2, 3] and "finetune" in p.stderr + p.stdout
    assert dirs.is_complete(str(full / "iter_0000003"))
