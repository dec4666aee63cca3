"""Pipeline balance of SplitLlama (LLaMA-3-8B lower + LLaMA-3-70B upper): planned vs baselines.

Parts:
  (a) predicted — bottleneck stage time over ideal (total / pp) from the analytic cost model for
      the cost planner, Megatron's uniform split and DeepSpeed's params-balanced split, at
      PP in {2, 4, 8, 16} and seq in {4096, 8192} (N=32, M=8, TP=8 + SP, micro-batch 1,
      selective recompute, no memory budget: this measures balance only).
  (b) TODO part_b(): measured CPU per-unit forward+backward timings (tiny and scaled-down shapes),
      compared with the cost model's per-unit predictions.
  (c) TODO part_c(): measured CPU step time of a real pipeline run (planned vs uniform layout).
  Parts (b) and (c) are not implemented yet; this script reports nothing for them (no numbers
  are invented).

Usage:
    PYTHONPATH=. python benchmarks/pipeline_balance.py [--out benchmarks/results/pipeline_balance.json]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Optional

if __package__ in (None, ""):  # allow running without PYTHONPATH
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from splitllama.config.model import ModelConfig  # noqa: E402
from splitllama.pipeline.cost import units_for  # noqa: E402
from splitllama.pipeline.plan import params_balanced, plan, uniform  # noqa: E402

PPS = (2, 4, 8, 16)
SEQS = (4096, 8192)
SETUP = {"lower": "llama3_8b", "upper": "llama3_70b", "num_layers_lower": 32, "num_layers_upper": 8,
         "mlp": False, "tp": 8, "sequence_parallel": True, "dp": 1, "micro_batch_size": 1,
         "recompute": "selective", "memory_budget": None}


def part_a() -> dict:
    """Predicted bottleneck/ideal for planned, uniform and params-balanced splits."""
    model = ModelConfig(lower=SETUP["lower"], upper=SETUP["upper"], num_layers_lower=SETUP["num_layers_lower"],
                        num_layers_upper=SETUP["num_layers_upper"], mlp=SETUP["mlp"])
    rows = []
    for seq in SEQS:
        units = units_for(model, seq, SETUP["micro_batch_size"], SETUP["tp"], SETUP["dp"], SETUP["recompute"],
                          sequence_parallel=SETUP["sequence_parallel"])
        for pp in PPS:
            t0 = time.perf_counter()
            planned = plan(units, pp)
            plan_ms = (time.perf_counter() - t0) * 1e3
            uni, par = uniform(units, pp), params_balanced(units, pp)
            rows.append({"pp": pp, "seq": seq, "plan_ms": plan_ms,
                         **{f"{k}_bottleneck_over_ideal": p.bottleneck_over_ideal
                            for k, p in (("planned", planned), ("uniform", uni), ("params_balanced", par))},
                         **{f"{k}_layout": str(p.layout)
                            for k, p in (("planned", planned), ("uniform", uni), ("params_balanced", par))},
                         "uniform_over_planned": uni.bottleneck_time / planned.bottleneck_time})
    return {"setup": SETUP, "rows": rows}


def part_b() -> Optional[dict]:
    """TODO(part_b): measure per-unit CPU fwd+bwd time and compare with the cost model."""
    return None


def part_c() -> Optional[dict]:
    """TODO(part_c): measure CPU pipeline step time for planned vs uniform layouts."""
    return None


def format_part_a(a: dict) -> str:
    cols = f"{'seq':>6} {'pp':>3} {'planned':>8} {'uniform':>8} {'params':>8} {'uni/plan':>9}  planned layout"
    lines = ["(a) predicted bottleneck / ideal (1.0 = perfect balance)", cols, "-" * (len(cols) + 30)]
    for r in a["rows"]:
        lines.append(f"{r['seq']:>6} {r['pp']:>3} {r['planned_bottleneck_over_ideal']:>8.3f} "
                     f"{r['uniform_bottleneck_over_ideal']:>8.3f} {r['params_balanced_bottleneck_over_ideal']:>8.3f} "
                     f"{r['uniform_over_planned']:>9.2f}  {r['planned_layout']}")
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="benchmarks/results/pipeline_balance.json")
    args = ap.parse_args(argv)
    result = {"part_a": part_a(), "part_b": part_b(), "part_c": part_c()}
    print(format_part_a(result["part_a"]))
    for name in ("part_b", "part_c"):
        if result[name] is None:
            print(f"({name[-1]}) not implemented yet (TODO {name}())")
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
