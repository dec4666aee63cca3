"""Pipeline balance of SplitLlama (LLaMA-3-8B lower + LLaMA-3-70B upper): planned vs baselines.

Parts:
  (a) predicted — bottleneck stage time over ideal (total / pp) from the analytic cost model for
      the cost planner, Megatron's uniform split and DeepSpeed's params-balanced split, at
      PP in {2, 4, 8, 16} and seq in {4096, 8192} (N=32, M=8, TP=8 + SP, micro-batch 1,
      selective recompute, no memory budget: this measures balance only).
  (b) measured — forward+backward time of ONE LLaMA-3-70B-shape decoder layer vs ONE
      LLaMA-3-8B-shape decoder layer on this CPU (Megatron TransformerBlock, num_layers=1,
      our local layer spec, fp32, micro-batch 1, small seq), runs of the two interleaved, median
      after a warmup, against the cost model's predicted ratio of fwd+bwd FLOPs of an upper
      unit over a lower unit at the same seq (the hardware constants cancel in the ratio).
  (c) measured — two scaled proxies of the stitched model ("balanced" N=16, M=4, upper 512
      wide, and "unbalanced" N=4, M=4, upper 768 wide, where uniform's predicted
      bottleneck/ideal >= 1.4) trained with pretrain_splitllama.py at PP=2 on CPU (torchrun,
      2 procs x 1 thread, gloo): one unit profile per proxy taken first and reused by every
      run, plus an adjacent profile right before each run; splits uniform / cost (analytic,
      H100) / profile (planner over the measured costs) run alternately; predicted
      (measured-cost 1F1B model with per-stage costs and host contention) vs measured step
      time of every split. See benchmarks/pipeline_proxy.py.

Usage:
    PYTHONPATH=. python benchmarks/pipeline_balance.py [--parts abc] [--out benchmarks/results/pipeline_balance.json]
    (b) takes ~6-8 min and ~10 GB RAM, (c) ~9 min per round on a 2-core CPU (--c-rounds 2: ~18 min).
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
from benchmarks.results_file import write_result  # noqa: E402

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


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# ---- (b) one 70B-shape layer vs one 8B-shape layer --------------------------------------------
PART_B = {"lower": "llama3_8b", "upper": "llama3_70b", "seqs": (64, 128), "micro_batch_size": 1,
          "warmup": 1, "reps": 7, "dtype": "fp32"}


from benchmarks.pipeline_proxy import child_env as _child_env  # noqa: E402


def _machine() -> dict:
    import platform

    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")),
               platform.processor())
    return {"nproc": os.cpu_count(), "cpu": cpu, "loadavg": os.getloadavg()}


def part_b_worker(out: str, seqs: list[int], reps: int, warmup: int) -> None:
    """(b) in a child process: build one lower and one upper layer (Megatron TransformerBlock,
    num_layers=1, our local spec) and time fwd and bwd, lower and upper interleaved."""
    import statistics

    import torch
    from megatron.core.transformer.transformer_block import TransformerBlock

    from splitllama.config.parallel import ParallelConfig
    from splitllama.model.megatron_config import Numerics, block_config
    from splitllama.model.rope import build_rotary
    from splitllama.model.spec import layer_spec
    from splitllama.platform.dist import init_distributed, shutdown

    par = ParallelConfig()
    init_distributed(par, seed=1234)
    model = ModelConfig(lower=PART_B["lower"], upper=PART_B["upper"], num_layers_lower=1, num_layers_upper=1)
    layers = {}
    for which in ("lower", "upper"):
        t0 = time.perf_counter()
        cfg = block_config(model, which, par, None, Numerics(use_cpu_initialization=True))
        blk = TransformerBlock(cfg, layer_spec("local"), post_layer_norm=False, pre_process=True,
                               post_process=False)
        shape = getattr(model, which)
        layers[which] = (blk, build_rotary(shape, True), shape.hidden_size)
        print(f"(b) built {which} layer: {sum(p.numel() for p in blk.parameters()) / 1e6:.1f} M params "
              f"in {time.perf_counter() - t0:.1f} s", flush=True)
    b = PART_B["micro_batch_size"]
    result = {"threads": torch.get_num_threads(), "params": {
        k: sum(p.numel() for p in v[0].parameters()) for k, v in layers.items()}, "seqs": {}}
    for seq in seqs:
        times = {w: {"fwd": [], "bwd": [], "cpu": []} for w in layers}
        for rep in range(warmup + reps):
            for which, (blk, rope, h) in layers.items():  # interleaved: lower, upper, lower, ...
                x = torch.randn(seq, b, h, requires_grad=True)
                g = torch.randn(seq, b, h)
                pos = rope(seq)
                c0, t0 = time.process_time(), time.perf_counter()
                y = blk(x, attention_mask=None, rotary_pos_emb=pos)
                t1 = time.perf_counter()
                y.backward(g)  # weight grads accumulate into .grad (as over micro-batches)
                t2, c2 = time.perf_counter(), time.process_time()
                if rep >= warmup:
                    times[which]["fwd"].append(t1 - t0)
                    times[which]["bwd"].append(t2 - t1)
                    times[which]["cpu"].append(c2 - c0)  # CPU seconds of all threads (load-robust)
            if rep >= warmup:
                print(f"(b) seq {seq} rep {rep - warmup}: " + ", ".join(
                    f"{w} fwd {times[w]['fwd'][-1]:.2f} s + bwd {times[w]['bwd'][-1]:.2f} s "
                    f"(cpu {times[w]['cpu'][-1]:.2f} s)" for w in layers),
                    flush=True)
        res = {}
        for which in layers:
            fb = [f + bw for f, bw in zip(times[which]["fwd"], times[which]["bwd"])]
            res[which] = {"fwd_s": times[which]["fwd"], "bwd_s": times[which]["bwd"],
                          "median_fwd_s": statistics.median(times[which]["fwd"]),
                          "median_bwd_s": statistics.median(times[which]["bwd"]),
                          "median_fwd_bwd_s": statistics.median(fb), "min_fwd_bwd_s": min(fb),
                          "cpu_s": times[which]["cpu"], "median_cpu_s": statistics.median(times[which]["cpu"])}
        pair = [(uf + ub) / (lf + lb) for lf, lb, uf, ub in zip(
            times["lower"]["fwd"], times["lower"]["bwd"], times["upper"]["fwd"], times["upper"]["bwd"])]
        res["paired_ratios"] = pair
        result["seqs"][str(seq)] = res
    shutdown()
    with open(out, "w") as f:
        json.dump(result, f)


def part_b(seqs=PART_B["seqs"], reps: int = PART_B["reps"], warmup: int = PART_B["warmup"]) -> dict:
    """Measured fwd+bwd of one upper (70B-shape) vs one lower (8B-shape) layer on this CPU,
    against the cost model's ratio of the two units' fwd+bwd FLOPs at the same seq."""
    import statistics
    import subprocess
    import tempfile

    load0 = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="pipeline_balance_b_") as tmp:
        out = os.path.join(tmp, "b.json")
        cmd = [sys.executable, os.path.abspath(__file__), "--part-b-worker", out, "--b-seqs",
               ",".join(map(str, seqs)), "--b-reps", str(reps), "--b-warmup", str(warmup)]
        p = subprocess.run(cmd, cwd=REPO, env=_child_env(), stdout=None, stderr=subprocess.PIPE, text=True)
        if p.returncode != 0:
            raise RuntimeError(f"part (b) worker failed (exit {p.returncode}):\n{p.stderr[-6000:]}")
        with open(out) as f:
            meas = json.load(f)
    model = ModelConfig(lower=PART_B["lower"], upper=PART_B["upper"], num_layers_lower=1, num_layers_upper=1)
    rows = []
    for seq in seqs:
        units = {u.name: u for u in units_for(model, seq, PART_B["micro_batch_size"], 1, 1, None)}
        lo, up = units["lower.0"], units["upper.0"]
        m = meas["seqs"][str(seq)]
        ml, mu = m["lower"], m["upper"]
        rows.append({
            "seq": seq,
            "pred_lower_gflop": (lo.fwd_flops + lo.bwd_flops) / 1e9,
            "pred_upper_gflop": (up.fwd_flops + up.bwd_flops) / 1e9,
            "pred_ratio": (up.fwd_flops + up.bwd_flops) / (lo.fwd_flops + lo.bwd_flops),
            "pred_ratio_fwd": up.fwd_flops / lo.fwd_flops,
            "pred_bwd_over_fwd": lo.bwd_flops / lo.fwd_flops,
            "lower_median_fwd_bwd_s": ml["median_fwd_bwd_s"], "upper_median_fwd_bwd_s": mu["median_fwd_bwd_s"],
            "lower_median_fwd_s": ml["median_fwd_s"], "lower_median_bwd_s": ml["median_bwd_s"],
            "upper_median_fwd_s": mu["median_fwd_s"], "upper_median_bwd_s": mu["median_bwd_s"],
            "measured_ratio": mu["median_fwd_bwd_s"] / ml["median_fwd_bwd_s"],
            "measured_ratio_of_minima": mu["min_fwd_bwd_s"] / ml["min_fwd_bwd_s"],
            "measured_ratio_paired_median": statistics.median(m["paired_ratios"]),
            "measured_ratio_cpu_time": mu["median_cpu_s"] / ml["median_cpu_s"],
            "measured_ratio_fwd": mu["median_fwd_s"] / ml["median_fwd_s"],
            "measured_bwd_over_fwd_lower": ml["median_bwd_s"] / ml["median_fwd_s"],
            "measured_bwd_over_fwd_upper": mu["median_bwd_s"] / mu["median_fwd_s"],
            "lower_gflops_per_s": (lo.fwd_flops + lo.bwd_flops) / 1e9 / ml["median_fwd_bwd_s"],
            "upper_gflops_per_s": (up.fwd_flops + up.bwd_flops) / 1e9 / mu["median_fwd_bwd_s"],
            "raw": m,
        })
        rows[-1]["measured_over_pred"] = rows[-1]["measured_ratio"] / rows[-1]["pred_ratio"]
    return {"setup": {**PART_B, "seqs": list(seqs), "reps": reps, "warmup": warmup, "threads": meas["threads"],
                      "params": meas["params"], "spec": "local (Megatron TransformerBlock, num_layers=1)",
                      "grads": "accumulate into .grad across reps (no zeroing)"},
            "machine": {**_machine(), "loadavg_start": load0}, "rows": rows}


# ---- (c) scaled proxies at PP=2 on CPU: benchmarks/pipeline_proxy.py ---------------------------
from benchmarks.pipeline_proxy import ARMS, PART_C, PROXIES, format_part_c, part_c  # noqa: E402


def format_part_a(a: dict) -> str:
    cols = f"{'seq':>6} {'pp':>3} {'planned':>8} {'uniform':>8} {'params':>8} {'uni/plan':>9}  planned layout"
    lines = ["(a) predicted bottleneck / ideal (1.0 = perfect balance)", cols, "-" * (len(cols) + 30)]
    for r in a["rows"]:
        lines.append(f"{r['seq']:>6} {r['pp']:>3} {r['planned_bottleneck_over_ideal']:>8.3f} "
                     f"{r['uniform_bottleneck_over_ideal']:>8.3f} {r['params_balanced_bottleneck_over_ideal']:>8.3f} "
                     f"{r['uniform_over_planned']:>9.2f}  {r['planned_layout']}")
    return "\n".join(lines)


def format_part_b(b: dict) -> str:
    cols = (f"{'seq':>4} {'8B fwd+bwd s':>12} {'70B fwd+bwd s':>13} {'measured':>9} {'paired':>7} "
            f"{'minima':>7} {'cpu-time':>8} {'predicted':>9} {'meas/pred':>9} {'bwd/fwd 8B,70B':>15} "
            f"{'GFLOP/s 8B,70B':>15}")
    lines = [f"(b) one 70B-shape vs one 8B-shape decoder layer, fwd+bwd on CPU (fp32, mb 1, "
             f"{b['setup']['threads']} threads, median of {b['setup']['reps']}, interleaved)", cols, "-" * len(cols)]
    for r in b["rows"]:
        lines.append(f"{r['seq']:>4} {r['lower_median_fwd_bwd_s']:>12.3f} {r['upper_median_fwd_bwd_s']:>13.3f} "
                     f"{r['measured_ratio']:>9.3f} {r['measured_ratio_paired_median']:>7.3f} "
                     f"{r['measured_ratio_of_minima']:>7.3f} {r.get('measured_ratio_cpu_time', float('nan')):>8.3f} "
                     f"{r['pred_ratio']:>9.3f} {r['measured_over_pred']:>9.3f} "
                     f"{r['measured_bwd_over_fwd_lower']:>7.2f},{r['measured_bwd_over_fwd_upper']:<7.2f} "
                     f"{r['lower_gflops_per_s']:>7.1f},{r['upper_gflops_per_s']:<7.1f}")
    lines.append("ratio = 70B layer / 8B layer (measured: of wall-time medians; paired: median of per-rep ratios; "
                 "cpu-time: of process CPU-time medians, robust to other processes' load); predicted = cost model "
                 "fwd+bwd FLOPs ratio (bwd = 2 x fwd); meas/pred uses the wall-time median ratio")
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="benchmarks/results/pipeline_balance.json")
    ap.add_argument("--parts", default="abc", help="which parts to run (others are kept from --out if present)")
    ap.add_argument("--b-seqs", default=",".join(map(str, PART_B["seqs"])))
    ap.add_argument("--b-reps", type=int, default=PART_B["reps"])
    ap.add_argument("--b-warmup", type=int, default=PART_B["warmup"])
    ap.add_argument("--c-iters", type=int, default=PART_C["iters"])
    ap.add_argument("--c-warmup", type=int, default=PART_C["warmup"])
    ap.add_argument("--c-rounds", type=int, default=PART_C["rounds"])
    ap.add_argument("--c-arms", default=",".join(ARMS), help="splits to run in (c): uniform,cost,profile[,calibrated]")
    ap.add_argument("--c-proxies", default=",".join(PROXIES), help="proxies to run in (c): balanced,unbalanced")
    ap.add_argument("--part-b-worker", metavar="OUT", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    b_seqs = [int(x) for x in args.b_seqs.split(",")]
    if args.part_b_worker:
        part_b_worker(args.part_b_worker, b_seqs, args.b_reps, args.b_warmup)
        return 0
    result = {"part_a": None, "part_b": None, "part_c": None}
    if set(args.parts) != set("abc") and os.path.exists(args.out):
        with open(args.out) as f:
            result.update(json.load(f))
    import datetime

    if "a" in args.parts:
        result["part_a"] = part_a()
    if "b" in args.parts:
        result["part_b"] = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                            **part_b(b_seqs, args.b_reps, args.b_warmup)}
    if "c" in args.parts:
        result["part_c"] = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                            **part_c(args.c_iters, args.c_warmup, args.c_rounds,
                                   tuple(args.c_arms.split(",")), tuple(args.c_proxies.split(",")))}
    for name, fmt in (("part_a", format_part_a), ("part_b", format_part_b), ("part_c", format_part_c)):
        if result[name] is None:
            print(f"({name[-1]}) not run")
        else:
            print(fmt(result[name]))
    write_result(result, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
