#!/usr/bin/env python
"""The planner's predicted peak memory per pipeline stage vs the dry run's measured peak
(`pretrain_splitllama.py --dry-run`: the real stage, DDP, distributed optimizer and one 1F1B
training step on fake tensors under a memory tracker), for configs/llama3_8b_70b.yaml on
64 GPUs at TP 8: PP 4 / 2 / 1, seq 4096 / 8192, recompute none / selective.

    python benchmarks/dryrun_memory.py [--rows pp1-s8192-selective,pp4-s4096-selective] [--list]

Each row is one dry run (one process per stage, several minutes of CPU for the 40-layer model);
rows already in the results file are kept and rows run now replace theirs
(benchmarks/results/dryrun_memory.json). Prints one line per stage:
measured peak, planner peak, their difference, and the measured parts.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "dryrun_memory.json"
CONFIG = "configs/llama3_8b_70b.yaml"
WORLD, TP = 64, 8


def grid() -> dict:
    rows = {}
    for pp in (4, 2, 1):
        for seq in (4096, 8192):
            for recompute in ("none", "selective"):
                rows[f"pp{pp}-s{seq}-{recompute}"] = dict(pp=pp, seq=seq, recompute=recompute)
    return rows


def run_row(row: dict) -> dict:
    rc = "null" if row["recompute"] == "none" else row["recompute"]
    cmd = [sys.executable, "pretrain_splitllama.py", "--config", CONFIG, "--dry-run",
           "--world-size", str(WORLD), "--json", f"parallel.tensor_model_parallel_size={TP}",
           f"parallel.pipeline_model_parallel_size={row['pp']}", f"data.seq_length={row['seq']}",
           f"train.recompute_granularity={rc}"]
    t0 = time.time()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode == 2 and not proc.stdout.strip():  # refused before measuring: the
        cmd.append("parallel.memory_budget_gb=null")     # planner finds no split under 80 GB
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode not in (0, 2) or not proc.stdout.strip():  # 2: measured over budget
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    doc = json.loads(proc.stdout.strip().splitlines()[-1])
    doc["over_budget"] = proc.returncode == 2
    doc["wall_s"] = round(time.time() - t0, 1)
    doc["command"] = " ".join(cmd[1:])
    return doc


def replan(doc: dict) -> None:
    """Recompute the planner column of a stored row with the current cost model (pure Python)."""
    sys.path.insert(0, str(ROOT))
    from splitllama.config.cli import dry_run_request
    from splitllama.dryrun.run import dry_run_plan, planner_peaks

    argv, world, _ = dry_run_request(doc["command"].split()[1:])
    plan = dry_run_plan(argv, world)
    if str(plan.layout) != doc["layout"]:
        raise RuntimeError(f"the row's layout is {doc['layout']}, the planner now picks {plan.layout}")
    for s, peak in zip(doc["stages"], planner_peaks(plan)):
        s["planner_peak_gib"] = peak / 2 ** 30


def lines(name: str, doc: dict) -> list[str]:
    out = []
    for s in doc["stages"]:
        diff = (s["planner_peak_gib"] - s["peak_gib"]) / s["peak_gib"] * 100
        out.append(f"{name:22s} {doc['layout']:24s} {s['stage']:>5} {s['units']:>10} "
                   f"{s['in_flight']:>3} {s['params_gib'] + s['grads_gib'] + s['optimizer_gib']:8.2f} "
                   f"{s['activations_gib']:8.2f} {s['peak_gib']:8.2f} {s['planner_peak_gib']:8.2f} {diff:+7.1f}%")
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", default="", help="comma-separated row names (default: all)")
    p.add_argument("--list", action="store_true", help="list the row names and exit")
    p.add_argument("--replan", action="store_true",
                   help="recompute the planner column of the stored rows (no dry run)")
    args = p.parse_args(argv)
    rows = grid()
    if args.list:
        print("\n".join(rows))
        return 0
    wanted = [r for r in args.rows.split(",") if r] or list(rows)
    unknown = [r for r in wanted if r not in rows]
    if unknown:
        print(f"error: unknown rows {unknown}; see --list", file=sys.stderr)
        return 2
    results = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    for name in (n for n in rows if n in results) if args.replan else ():
        replan(results[name])
    for name in () if args.replan else wanted:
        results[name] = run_row(rows[name])
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        RESULTS.write_text(json.dumps(results, indent=1, sort_keys=True) + "\n")
    print(f"{'row':22s} {'layout':24s} {'stage':>5} {'units':>10} {'fl':>3} {'state':>8} "
          f"{'acts':>8} {'peak':>8} {'planner':>8} {'diff':>8}   (GiB per GPU)")
    for name in rows:
        if name in results:
            print("\n".join(lines(name, results[name])))
    if args.replan:
        RESULTS.write_text(json.dumps(results, indent=1, sort_keys=True) + "\n")
    missing = [n for n in rows if n not in results]
    if missing:
        print(f"not measured: {', '.join(missing)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
