"""Adapter-only warmup vs full training, seconds per iteration (CPU, 1 process, default threads).

Runs ``pretrain_splitllama.py --config configs/tiny.yaml`` with ``model.freeze=all_but_adapter``
(frozen) and with ``model.freeze=none`` (full), alternating frozen, full, frozen, full, ...
(``--rounds`` of each) so slow drift of a shared machine's load hits both alike; each run's
per-iteration ``step_time_s`` comes from its metrics file (``logging.log_interval=1``), the
first ``--warmup`` iterations dropped. Two conditions: ``alone`` and ``beside`` two CPU-bound
processes (busy Python loops, one per core of a 2-core box) started before and ended after the
runs. OMP_NUM_THREADS is NOT set (the user's default threads: the case that was slow).
Reported: median and p90 s/iter of each, the ratio frozen / full (target <= 1) per condition,
and the per-round ratios. Results: ``benchmarks/results/warmup_speed.json``.

Usage:
    PYTHONPATH=. python benchmarks/warmup_speed.py [--rounds 2] [--iters 40] [--warmup 5]
        [--conditions alone,beside] [--out benchmarks/results/warmup_speed.json]
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODES = {"frozen": "all_but_adapter", "full": "none"}


def _run(mode: str, iters: int, workdir: str) -> list[float]:
    metrics = os.path.join(workdir, f"{mode}.jsonl")
    if os.path.exists(metrics):
        os.remove(metrics)
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    env["PYTHONPATH"] = REPO
    cmd = [sys.executable, os.path.join(REPO, "pretrain_splitllama.py"), "--config", "configs/tiny.yaml",
           f"train.train_iters={iters}", "train.eval_interval=0", "logging.log_interval=1",
           "logging.progress=false", f"model.freeze={MODES[mode]}", f"logging.metrics_file={metrics}"]
    p = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=3600)
    if p.returncode != 0:
        raise SystemExit(f"{mode} run failed ({p.returncode}):\n{p.stdout[-2000:]}\n{p.stderr[-2000:]}")
    with open(metrics) as f:
        recs = [json.loads(line) for line in f]
    return [r["step_time_s"] for r in recs if "step_time_s" in r]


def _busy() -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", "while True: pass"])


def _p90(xs: list[float]) -> float:
    return sorted(xs)[int(0.9 * (len(xs) - 1))]


def measure(condition: str, rounds: int, iters: int, warmup: int, workdir: str) -> dict:
    load = [_busy(), _busy()] if condition == "beside" else []
    try:
        per = {m: [] for m in MODES}
        ratios = []
        for _ in range(rounds):
            med = {}
            for mode in MODES:
                steps = _run(mode, iters, workdir)[warmup:]
                per[mode].extend(steps)
                med[mode] = statistics.median(steps)
            ratios.append(med["frozen"] / med["full"])
    finally:
        for p in load:
            p.kill()
            p.wait()
    out = {m: {"median_s": statistics.median(v), "p90_s": _p90(v), "max_s": max(v), "n": len(v)}
           for m, v in per.items()}
    out["frozen_over_full"] = out["frozen"]["median_s"] / out["full"]["median_s"]
    out["round_ratios"] = ratios
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--iters", type=int, default=40)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--conditions", default="alone,beside")
    ap.add_argument("--out", default=os.path.join(REPO, "benchmarks", "results", "warmup_speed.json"))
    a = ap.parse_args()
    result = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "cpus": os.cpu_count(), "rounds": a.rounds, "iters": a.iters, "warmup": a.warmup,
              "conditions": {}}
    with tempfile.TemporaryDirectory() as d:
        for cond in a.conditions.split(","):
            result["conditions"][cond] = measure(cond, a.rounds, a.iters, a.warmup, d)
    print(f"{'condition':<10} {'frozen s/iter':>14} {'full s/iter':>12} {'frozen p90':>11} "
          f"{'full p90':>9} {'frozen/full':>12}  per round")
    for cond, r in result["conditions"].items():
        print(f"{cond:<10} {r['frozen']['median_s']:>14.4f} {r['full']['median_s']:>12.4f} "
              f"{r['frozen']['p90_s']:>11.4f} {r['full']['p90_s']:>9.4f} {r['frozen_over_full']:>12.2f}  "
              + " ".join(f"{x:.2f}" for x in r["round_ratios"]))
    os.makedirs(os.path.dirname(a.out), exist_ok=True)
    with open(a.out, "w") as f:
        json.dump(result, f, indent=1)
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
