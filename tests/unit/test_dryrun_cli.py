"""`tools/plan_pipeline.py --memory-from dryrun` hands the chosen layout and the job's world size
to the dry run and judges the budget by its peaks (the measurement itself, minutes of CPU, is
replaced here by a recorder; tests/integration/test_dryrun.py runs the real one)."""
from __future__ import annotations

import json

from splitllama.dryrun import run as dry_run


def _fake_stages(peaks):
    def measure(argv, world_size, pp, python=None):
        measure.calls.append((list(argv), world_size, pp))
        return [{"params": 1, "params_gib": 0.0, "grads_gib": 0.0, "optimizer_gib": 0.0,
                 "activations_gib": p, "peak_gib": p, "in_flight": pp - k, "rank": k,
                 "p2p": {"recv": None, "send": None}, "shards": {}} for k, p in enumerate(peaks)]
    measure.calls = []
    return measure


def test_plan_pipeline_memory_from_dryrun(monkeypatch, capsys):
    from tools.plan_pipeline import main

    fake = _fake_stages([30.0, 20.0, 10.0, 5.0])
    monkeypatch.setattr(dry_run, "measure_stages", fake)
    base = ["--config", "configs/llama3_8b_70b.yaml", "--pp", "4", "--tp", "8", "--dp", "2",
            "--layout", "L18|L14,A,U1|U4|U3", "--memory-from", "dryrun", "--json"]
    assert main(base) == 0
    (argv, world, pp), = fake.calls
    assert world == 64 and pp == 4 and "parallel.pipeline_layout=L18|L14,A,U1|U4|U3" in argv
    doc = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert doc["layout"] == "L18|L14,A,U1|U4|U3" and [s["peak_gib"] for s in doc["stages"]] == [30, 20, 10, 5]
    assert all(s["planner_peak_gib"] > 0 for s in doc["stages"])
    monkeypatch.setattr(dry_run, "measure_stages", _fake_stages([90.0, 20.0, 10.0, 5.0]))
    assert main(base) == 1  # stage 0 over the config's 80 GiB by the dry run's peak
    assert "error: pipeline stage 0" in capsys.readouterr().err


def test_plan_pipeline_search_refuses_memory_from(capsys):
    from tools.plan_pipeline import main

    assert main(["--config", "configs/llama3_8b_70b.yaml", "--gpus", "64", "--memory-from", "dryrun"]) == 2
    assert capsys.readouterr().err.startswith("error: --memory-from is an option of a single plan")
