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
  (c) measured — a scaled proxy of the stitched model that keeps the width ratio (lower hidden
      256 / ffn 896 / 8 heads / 2 KV groups, upper 512 / 1792 / 8 / 2, vocab 8192 so the head
      weighs ~1.23 upper layers as the real 128k head does; N=16, M=4) trained with
      pretrain_splitllama.py at PP=2 on CPU (torchrun, 2 procs, gloo): median step time of the
      planned split (parallel.pipeline_split=cost) vs the uniform split, run alternately
      (A B A B ...), against the planner's predicted 1F1B step times ((m + pp - 1) x bottleneck
      stage time); the ratio uniform / planned is what is compared.

Usage:
    PYTHONPATH=. python benchmarks/pipeline_balance.py [--parts abc] [--out benchmarks/results/pipeline_balance.json]
    (b) takes ~6-8 min and ~10 GB RAM, (c) ~4-5 min on a 2-core CPU.
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


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# ---- (b) one 70B-shape layer vs one 8B-shape layer --------------------------------------------
PART_B = {"lower": "llama3_8b", "upper": "llama3_70b", "seqs": (64, 128), "micro_batch_size": 1,
          "warmup": 1, "reps": 7, "dtype": "fp32"}


def _child_env(threads: Optional[int] = None) -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env.update(PYTHONPATH=REPO, PYTHONUNBUFFERED="1", PYTHONWARNINGS="ignore")
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    return env


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


# ---- (c) scaled proxy at PP=2 on CPU ------------------------------------------------------------
PROXY_LOWER = {"hidden_size": 256, "intermediate_size": 896, "num_attention_heads": 8, "num_key_value_heads": 2,
               "num_hidden_layers": 16, "vocab_size": 8192, "max_position_embeddings": 1024}
PROXY_UPPER = {"hidden_size": 512, "intermediate_size": 1792, "num_attention_heads": 8, "num_key_value_heads": 2,
               "num_hidden_layers": 4, "vocab_size": 8192, "max_position_embeddings": 1024}
PART_C = {"num_layers_lower": 16, "num_layers_upper": 4, "pp": 2, "seq_length": 128, "micro_batch_size": 1,
          "global_batch_size": 4, "iters": 10, "warmup": 3, "rounds": 2, "threads_per_proc": 1}


def part_c_calib_worker(out: str, reps: int, warmup: int) -> None:
    """Per-unit CPU fwd / bwd times of the proxy (one thread, as each PP process has), units
    interleaved: embedding, one lower layer, adapter, one upper layer, head (final norm + LM
    head + cross-entropy). Used to cost the chain with measured instead of FLOP-derived times."""
    import statistics

    import torch
    from megatron.core import tensor_parallel
    from megatron.core.models.common.embeddings.language_model_embedding import LanguageModelEmbedding
    from megatron.core.transformer.transformer_block import TransformerBlock

    from splitllama.config.parallel import ParallelConfig
    from splitllama.model.adapter import Adapter
    from splitllama.model.megatron_config import Numerics, block_config
    from splitllama.model.norm import RMSNorm
    from splitllama.model.rope import build_rotary
    from splitllama.model.spec import layer_spec
    from splitllama.platform.dist import init_distributed, shutdown

    torch.set_num_threads(PART_C["threads_per_proc"])
    par = ParallelConfig()
    init_distributed(par, seed=1234)
    model = ModelConfig(lower=PROXY_LOWER, upper=PROXY_UPPER, num_layers_lower=1, num_layers_upper=1)
    num = Numerics(use_cpu_initialization=True)
    lcfg, ucfg = (block_config(model, w, par, None, num) for w in ("lower", "upper"))
    s, b, v = PART_C["seq_length"], PART_C["micro_batch_size"], model.vocab_size
    h_lo, h_up = model.lower.hidden_size, model.upper.hidden_size
    emb = LanguageModelEmbedding(config=lcfg, vocab_size=v, max_sequence_length=model.lower.max_position_embeddings,
                                 position_embedding_type="rope")
    lower = TransformerBlock(lcfg, layer_spec("local"), post_layer_norm=False, pre_process=True, post_process=False)
    upper = TransformerBlock(ucfg, layer_spec("local"), post_layer_norm=False, pre_process=True, post_process=False)
    rope_lo, rope_up = build_rotary(model.lower, True), build_rotary(model.upper, True)
    adapter = Adapter(ucfg, h_lo, h_up, model.mlp)
    norm = RMSNorm(ucfg, h_up, eps=model.upper.rms_norm_eps)
    head = tensor_parallel.ColumnParallelLinear(h_up, v, config=ucfg, init_method=ucfg.init_method, bias=False,
                                                skip_bias_add=False, gather_output=False)
    tokens = torch.randint(0, v, (b, s))
    pos = torch.arange(s).unsqueeze(0).expand(b, s)

    def run_emb():
        return emb(input_ids=tokens, position_ids=pos), None

    def run_layer(blk, rope, h):
        x = torch.randn(s, b, h, requires_grad=True)
        return lambda: (blk(x, attention_mask=None, rotary_pos_emb=rope(s)), None)

    def run_adapter():
        x = torch.randn(s, b, h_lo, requires_grad=True)
        return adapter(x), None

    def run_head():
        x = torch.randn(s, b, h_up, requires_grad=True)
        logits, _ = head(norm(x))
        loss = tensor_parallel.vocab_parallel_cross_entropy(logits.float(), tokens.t().contiguous())
        return loss.sum(), "scalar"

    units = {"embedding": run_emb, "lower": run_layer(lower, rope_lo, h_lo), "adapter": run_adapter,
             "upper": run_layer(upper, rope_up, h_up), "head": run_head}
    times = {k: {"fwd": [], "bwd": []} for k in units}
    for rep in range(warmup + reps):
        for k, fn in units.items():
            t0 = time.perf_counter()
            y, kind = fn()
            t1 = time.perf_counter()
            y.backward() if kind == "scalar" else y.backward(torch.ones_like(y))
            t2 = time.perf_counter()
            if rep >= warmup:
                times[k]["fwd"].append(t1 - t0)
                times[k]["bwd"].append(t2 - t1)
    shutdown()
    with open(out, "w") as f:
        json.dump({k: {"fwd_s": statistics.median(t["fwd"]), "bwd_s": statistics.median(t["bwd"])}
                   for k, t in times.items()}, f)


def _calibrated(units: list, measured: dict) -> list:
    """The proxy's units with fwd/bwd times replaced by the measured per-kind CPU times."""
    from dataclasses import replace

    return [replace(u, fwd_time=measured[u.kind]["fwd_s"], bwd_time=measured[u.kind]["bwd_s"]) for u in units]


def _proxy_yaml(path: str) -> None:
    import yaml

    cfg = {"model": {"lower": PROXY_LOWER, "upper": PROXY_UPPER, "num_layers_lower": PART_C["num_layers_lower"],
                     "num_layers_upper": PART_C["num_layers_upper"], "mlp": False},
           "data": {"mock": True, "seq_length": PART_C["seq_length"]},
           "train": {"micro_batch_size": PART_C["micro_batch_size"], "global_batch_size": PART_C["global_batch_size"],
                     "eval_interval": 0},
           "optimizer": {"lr_warmup_iters": 1},
           "logging": {"log_interval": 1, "progress": False}}
    with open(path, "w") as f:
        yaml.safe_dump(cfg, f, sort_keys=False)


def _run_proxy(yaml_path: str, arm_overrides: list[str], iters: int, metrics: str) -> dict:
    import subprocess

    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={PART_C['pp']}",
           os.path.join(REPO, "pretrain_splitllama.py"), "--config", yaml_path,
           f"parallel.pipeline_model_parallel_size={PART_C['pp']}", *arm_overrides,
           f"train.train_iters={iters}", f"logging.metrics_file={metrics}"]
    t0, load0 = time.perf_counter(), os.getloadavg()
    p = subprocess.run(cmd, cwd=REPO, env=_child_env(PART_C["threads_per_proc"]), capture_output=True, text=True)
    if p.returncode != 0:
        raise RuntimeError(f"proxy run ({arm_overrides}) failed (exit {p.returncode}):\n{p.stdout[-3000:]}\n"
                           f"{p.stderr[-6000:]}")
    # the app prints "pipeline layout: L16,A,U1|U3 | tp=1 pp=2 dp=1 | ..." at start
    layout = next((ln.split("pipeline layout:", 1)[1].split(" | tp=")[0].strip()
                   for ln in p.stdout.splitlines() if "pipeline layout:" in ln), None)
    with open(metrics) as f:
        steps = [json.loads(ln)["step_time_s"] for ln in f if ln.strip() and "step_time_s" in ln]
    return {"layout": layout, "step_times_s": steps, "process_wall_s": time.perf_counter() - t0,
            "loadavg_1min_before_after": [load0[0], os.getloadavg()[0]]}


ARMS = ("cost", "uniform", "calibrated")


def part_c(iters: int = PART_C["iters"], warmup: int = PART_C["warmup"], rounds: int = PART_C["rounds"],
           arms: tuple = ARMS) -> dict:
    """Measured PP=2 step time of the proxy under the planned (FLOP cost model), the uniform and
    the calibrated (planner over measured CPU unit times) splits, vs their predictions."""
    import statistics
    import subprocess
    import tempfile

    from splitllama.config.job import load_job_config
    from splitllama.config.resolve import num_microbatches, stage_plan, units_for_job
    from splitllama.pipeline.plan import evaluate, plan

    load0 = os.getloadavg()
    pp = PART_C["pp"]
    runs = []
    with tempfile.TemporaryDirectory(prefix="pipeline_balance_c_") as tmp:
        yaml_path = os.path.join(tmp, "proxy.yaml")
        _proxy_yaml(yaml_path)
        base = [f"parallel.pipeline_model_parallel_size={pp}", f"train.train_iters={iters}"]
        job = load_job_config(yaml_path, base)
        flop_units = units_for_job(job, 1)

        # per-unit CPU timings -> the same chain costed with measured times
        calib_out = os.path.join(tmp, "calib.json")
        p = subprocess.run([sys.executable, os.path.abspath(__file__), "--part-c-calib-worker", calib_out],
                           cwd=REPO, env=_child_env(PART_C["threads_per_proc"]), capture_output=True, text=True)
        if p.returncode != 0:
            raise RuntimeError(f"part (c) calibration failed (exit {p.returncode}):\n{p.stderr[-6000:]}")
        with open(calib_out) as f:
            unit_times = json.load(f)
        cal_units = _calibrated(flop_units, unit_times)
        by_kind = {u.kind: u for u in flop_units}

        def tot(k):
            return unit_times[k]["fwd_s"] + unit_times[k]["bwd_s"]

        m_mb = num_microbatches(job.train, 1)
        best = plan(cal_units, pp, num_microbatches=m_mb)
        arm_overrides = {"cost": ["parallel.pipeline_split=cost"], "uniform": ["parallel.pipeline_split=uniform"],
                         "calibrated": [f"parallel.pipeline_layout={best.layout}"]}
        pred, cal = {}, {"unit_times_s": unit_times,
                         "upper_over_lower_measured": tot("upper") / tot("lower"),
                         "upper_over_lower_predicted": by_kind["upper"].time / by_kind["lower"].time,
                         "head_over_upper_measured": tot("head") / tot("upper"),
                         "head_over_upper_predicted": by_kind["head"].time / by_kind["upper"].time,
                         "head_over_upper_flops_only": (by_kind["head"].fwd_flops + by_kind["head"].bwd_flops) /
                                                       (by_kind["upper"].fwd_flops + by_kind["upper"].bwd_flops)}
        for arm in arms:
            sp = stage_plan(load_job_config(yaml_path, base + arm_overrides[arm]), dp=1)  # world = pp
            pred[arm] = {"layout": str(sp.layout), "step_time_s_h100": sp.step_time_s,
                         "bottleneck_over_ideal": sp.bottleneck_over_ideal,
                         "stage_time_shares": [st.time_share for st in sp.stages],
                         "stage_gflops": [st.gflops for st in sp.stages], "num_microbatches": sp.num_microbatches}
            ev = evaluate(sp.layout, cal_units, pp, num_microbatches=m_mb)
            cal[arm] = {"layout": str(ev.layout), "step_time_s": ev.step_time_s,
                        "bottleneck_over_ideal": ev.bottleneck_over_ideal,
                        "stage_time_shares": [st.time_share for st in ev.stages]}
        print(f"(c) calibration: upper/lower layer {cal['upper_over_lower_measured']:.2f} measured vs "
              f"{cal['upper_over_lower_predicted']:.2f} by the cost model; head/upper "
              f"{cal['head_over_upper_measured']:.2f} vs {cal['head_over_upper_predicted']:.2f}; "
              f"plan from measured unit times: {best.layout}", flush=True)
        for rnd in range(rounds):
            for arm in (arms if rnd % 2 == 0 else arms[::-1]):  # A B C C B A ...: cancels linear drift
                r = _run_proxy(yaml_path, arm_overrides[arm], iters, os.path.join(tmp, f"{arm}_{rnd}.jsonl"))
                if r["layout"] != pred[arm]["layout"]:
                    raise RuntimeError(f"app built layout {r['layout']} for {arm}, planner says {pred[arm]['layout']}")
                runs.append({"arm": arm, "round": rnd, **r})
                print(f"(c) round {rnd} {arm:<10} {r['layout']:<14} median step "
                      f"{statistics.median(r['step_times_s'][warmup:]) * 1e3:.0f} ms "
                      f"(load {r['loadavg_1min_before_after'][0]:.1f})", flush=True)
    meas = {}
    for arm in arms:
        ts = [t for r in runs if r["arm"] == arm for t in r["step_times_s"][warmup:]]
        per_round = [statistics.median(r["step_times_s"][warmup:]) for r in runs if r["arm"] == arm]
        meas[arm] = {"median_step_s": statistics.median(ts), "min_step_s": min(ts), "n": len(ts),
                     "per_round_median_s": per_round}
    ratios = {}
    for a, b in (("uniform", "cost"), ("uniform", "calibrated"), ("cost", "calibrated")):
        if a in arms and b in arms:
            ratios[f"{a}_over_{b}"] = {
                "predicted_cost_model": pred[a]["step_time_s_h100"] / pred[b]["step_time_s_h100"],
                "predicted_calibrated": cal[a]["step_time_s"] / cal[b]["step_time_s"],
                "measured_median": meas[a]["median_step_s"] / meas[b]["median_step_s"],
                "measured_minima": meas[a]["min_step_s"] / meas[b]["min_step_s"],
                "measured_per_round": [x / y for x, y in zip(meas[a]["per_round_median_s"],
                                                             meas[b]["per_round_median_s"])]}
    return {"setup": {**PART_C, "iters": iters, "warmup": warmup, "rounds": rounds, "arms": list(arms),
                      "lower": PROXY_LOWER, "upper": PROXY_UPPER,
                      "launcher": "torchrun --standalone, gloo, CPU harness, OMP_NUM_THREADS=1 per process"},
            "machine": {**_machine(), "loadavg_start": load0},
            "predicted": pred, "calibrated": cal, "measured": meas, "ratios": ratios, "runs": runs}


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


def format_part_c(c: dict) -> str:
    p, m, cal, st = c["predicted"], c["measured"], c["calibrated"], c["setup"]
    cols = (f"{'split':<11} {'layout':<14} {'model b/ideal':>13} {'model shares':>12} {'calib b/ideal':>13} "
            f"{'calib step s':>12} {'measured median s':>17} {'min s':>6}")
    lines = [f"(c) proxy N={st['num_layers_lower']} M={st['num_layers_upper']} PP={st['pp']} on CPU, seq "
             f"{st['seq_length']}, mb {st['micro_batch_size']}, {p[st['arms'][0]]['num_microbatches']} "
             f"micro-batches/step, {st['rounds']} rounds alternated, {st['iters'] - st['warmup']} steps per run "
             f"after {st['warmup']} warmup", cols, "-" * len(cols)]
    for arm in st["arms"]:
        shares = "/".join(f"{x:.2f}" for x in p[arm]["stage_time_shares"])
        lines.append(f"{arm:<11} {p[arm]['layout']:<14} {p[arm]['bottleneck_over_ideal']:>13.3f} {shares:>12} "
                     f"{cal[arm]['bottleneck_over_ideal']:>13.3f} {cal[arm]['step_time_s']:>12.3f} "
                     f"{m[arm]['median_step_s']:>17.3f} {m[arm]['min_step_s']:>6.3f}")
    lines.append("step-time ratios (model = FLOP cost model, H100 constants; calib = same chain with measured "
                 "CPU unit times; measured = median of all steps):")
    for k, r in c["ratios"].items():
        lines.append(f"  {k:<22} model {r['predicted_cost_model']:.3f} | calib {r['predicted_calibrated']:.3f} | "
                     f"measured {r['measured_median']:.3f} (per round "
                     f"{', '.join(f'{x:.3f}' for x in r['measured_per_round'])}; minima {r['measured_minima']:.3f})")
    ut = cal["unit_times_s"]
    lines.append("calibration (1 thread, per micro-batch, fwd+bwd ms): " + ", ".join(
        f"{k} {(v['fwd_s'] + v['bwd_s']) * 1e3:.1f}" for k, v in ut.items()))
    lines.append(f"  upper/lower layer: measured {cal['upper_over_lower_measured']:.2f} vs model "
                 f"{cal['upper_over_lower_predicted']:.2f}; head/upper layer: measured "
                 f"{cal['head_over_upper_measured']:.2f} vs model {cal['head_over_upper_predicted']:.2f} "
                 f"(FLOPs alone {cal['head_over_upper_flops_only']:.2f})")
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
    ap.add_argument("--c-arms", default=",".join(ARMS), help="splits to run in (c): cost,uniform,calibrated")
    ap.add_argument("--part-b-worker", metavar="OUT", help=argparse.SUPPRESS)
    ap.add_argument("--part-c-calib-worker", metavar="OUT", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    b_seqs = [int(x) for x in args.b_seqs.split(",")]
    if args.part_b_worker:
        part_b_worker(args.part_b_worker, b_seqs, args.b_reps, args.b_warmup)
        return 0
    if args.part_c_calib_worker:
        part_c_calib_worker(args.part_c_calib_worker, reps=15, warmup=3)
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
                                   tuple(args.c_arms.split(",")))}
    for name, fmt in (("part_a", format_part_a), ("part_b", format_part_b), ("part_c", format_part_c)):
        if result[name] is None:
            print(f"({name[-1]}) not run")
        else:
            print(fmt(result[name]))
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
