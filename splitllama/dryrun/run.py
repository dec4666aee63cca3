"""``pretrain_splitllama.py ... --dry-run --world-size W [--json]``: the job resolved for W ranks
on the target GPUs (bf16 unless train.bf16=false), then for each pipeline stage one process
(`splitllama.dryrun.worker`) measuring that stage's representative rank on fake tensors
(`splitllama.dryrun.stage`), one after the other. Reports per stage the parameters on that rank,
gradients, optimizer state, activations at the peak and the peak (GiB), beside the planner's
predicted peak (`splitllama.pipeline.plan`), and the p2p and TP shard shapes met.

The dry run reads no data, tokenizer or checkpoint (``data.mock=true`` and the null tokenizer
are set for it: the vocabulary is the model's). A stage whose measured peak is over
``parallel.memory_budget_gb`` makes it exit 2 with one ``error:`` line after the report.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Optional, Sequence

from splitllama.dryrun.stage import MARK, GiB

DRY_RUN_OVERRIDES = ("data.mock=true", "data.tokenizer_type=null")
WORKER_TIMEOUT_S = 3600


def dry_run_plan(argv: Sequence[str], world_size: int):
    """The `RunPlan` the dry run measures: the training command line `argv` (without the
    dry-run flags) with `DRY_RUN_OVERRIDES`, resolved for `world_size` GPU ranks."""
    from splitllama.config.cli import parse_train_args
    from splitllama.preflight.resolve import resolve

    job = parse_train_args(list(argv) + list(DRY_RUN_OVERRIDES))
    return resolve(job, world_size, on_cpu=False)


def planner_stages(plan):
    """The planner's costing (`StagePlan`) of `plan`'s layout, on the run's own unit costs."""
    from splitllama.preflight.resolve import units_for_job
    from splitllama.pipeline.plan import evaluate

    units = plan.split.units if plan.split is not None else units_for_job(plan.job, plan.dp)
    return evaluate(plan.layout, units, plan.pp, None, plan.num_microbatches)


def planner_peaks(plan) -> list[float]:
    """The planner's predicted peak bytes per stage of `plan`'s layout."""
    return [s.memory_total for s in planner_stages(plan).stages]


def measure_stages(argv: Sequence[str], world_size: int, pp: int,
                   python: Optional[str] = None) -> list[dict]:
    """Each stage's report, each measured in its own process (one at a time)."""
    out = []
    for stage in range(pp):
        spec = json.dumps({"argv": list(argv), "world_size": world_size, "stage": stage})
        proc = subprocess.run([python or sys.executable, "-m", "splitllama.dryrun.worker", spec],
                              capture_output=True, text=True, timeout=WORKER_TIMEOUT_S,
                              env=dict(os.environ))
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(MARK)]
        if proc.returncode != 0 or not lines:
            tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-25:])
            raise RuntimeError(f"dry run of pipeline stage {stage} failed (exit {proc.returncode}):\n{tail}")
        out.append(json.loads(lines[-1][len(MARK):]))
    return out


def report(plan, stages: list[dict]) -> dict:
    """The ``--json`` document: layout, job shape and one entry per stage."""
    costed = planner_stages(plan).stages
    for k, s in enumerate(stages):  # units: the stage's layout text, E / H = embedding / head
        s.update(stage=k, units=costed[k].units, planner_peak_gib=costed[k].memory_total / GiB)
    par = plan.job.parallel
    return {"layout": str(plan.layout), "world_size": plan.world_size, "tp": plan.tp, "pp": plan.pp,
            "dp": plan.dp, "num_microbatches": plan.num_microbatches,
            "seq_length": plan.job.data.seq_length, "micro_batch_size": plan.job.train.micro_batch_size,
            "recompute": plan.recompute.granularity or "none", "sequence_parallel": plan.job.parallel.sequence_parallel,
            "dtype": "bf16" if plan.bf16 else "fp32", "memory_budget_gb": par.memory_budget_gb,
            "stages": [{"stage": s["stage"], **{k: v for k, v in s.items() if k != "stage"}} for s in stages]}


def table(doc: dict) -> str:
    """The human-readable report."""
    head = (f"dry run: layout {doc['layout']} | world {doc['world_size']} = TP{doc['tp']} x PP{doc['pp']} "
            f"x DP{doc['dp']} | seq {doc['seq_length']} x mb {doc['micro_batch_size']}, "
            f"{doc['num_microbatches']} micro-batches | recompute {doc['recompute']} | {doc['dtype']}"
            f"{' + SP' if doc['sequence_parallel'] else ''} (GiB per GPU)")
    cols = ("stage", "rank", "units", "in-flight", "params", "weights", "grads", "optimizer",
            "activations", "peak", "planner", "diff")
    rows = [cols]
    for s in doc["stages"]:
        diff = (s["planner_peak_gib"] - s["peak_gib"]) / s["peak_gib"] * 100 if s["peak_gib"] else 0.0
        rows.append((str(s["stage"]), str(s["rank"]), s["units"], str(s["in_flight"]),
                     f"{s['params'] / 1e6:.1f}M", *(f"{s[k]:.2f}" for k in (
                         "params_gib", "grads_gib", "optimizer_gib", "activations_gib", "peak_gib",
                         "planner_peak_gib")), f"{diff:+.1f}%"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(cols))]
    lines = [head] + ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in rows]
    for s in doc["stages"]:
        p2p = s["p2p"]
        lines.append(f"stage {s['stage']}: p2p recv {p2p['recv']} send {p2p['send']} "
                     f"[seq/tp if SP, micro-batch, hidden]")
        lines.append("  TP shards: " + ", ".join(f"{k} {v}" for k, v in s["shards"].items()))
    return "\n".join(lines)


def over_budget(doc: dict) -> Optional[str]:
    """The error line for the first stage whose measured peak is over the budget, or None."""
    budget = doc["memory_budget_gb"]
    if not budget:
        return None
    for s in doc["stages"]:
        if s["peak_gib"] > budget:
            return (f"pipeline stage {s['stage']} ({s['units']}) needs {s['peak_gib']:.1f} GiB per GPU "
                    f"(dry run peak), over parallel.memory_budget_gb={budget}")
    return None


def run(argv: Sequence[str], world_size: Optional[int], as_json: bool) -> int:
    """The dry run of the training command line `argv` (flags of the dry run removed)."""
    if not world_size or world_size < 1:
        raise ValueError("--dry-run needs --world-size W (the job's number of GPUs, >= 1)")
    plan = dry_run_plan(argv, world_size)
    doc = report(plan, measure_stages(argv, world_size, plan.pp))
    print(json.dumps(doc) if as_json else table(doc), flush=True)
    problem = over_budget(doc)
    if problem:
        print(f"error: {problem}", file=sys.stderr, flush=True)
        return 2
    return 0
