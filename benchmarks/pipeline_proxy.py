"""Part (c) of benchmarks/pipeline_balance.py: scaled proxies of the stitched model trained at PP=2 on
CPU (torchrun, 2 processes x 1 thread, gloo), every split's predicted vs measured step time.

Two proxies, lower hidden 256 / ffn 896 / 8 heads / 2 KV groups, vocab 8192, seq 128,
micro-batch 1, 16 micro-batches per step (m >> pp, as in real training: with 4 the per-step
optimizer cost, which does not move with the split, was a third of the step):
  balanced   N=16, M=4, upper 512 / 1792 / 8 / 2 (the original proxy: the head weighs about one
             upper layer, as the real 128k head does at TP=8);
  unbalanced N=4, M=4, upper 768 / 2688 / 12 / 4: an upper layer costs ~5x a lower one (the real
             70B/8B layer ratio is 3.9x), so uniform (L4|A,U4) has predicted bottleneck/ideal
             ~1.7. (N=6, M=6 at upper 512, the first version, reached only 1.46, and on this box
             uniform/profile measured 1.08.)
ONE unit profile per proxy is taken first (`splitllama.planning.profile`, 1 thread, as each PP
process runs, at PP=2 so host contention is measured) and reused by every run of the proxy
(the profile arm's runs load it with parallel.pipeline_split=profile, they do not re-profile).
This box's speed drifts by 10-30 % over minutes (other tenants of the host; two profiles a
minute apart differ by that much), so right before every run an **adjacent** profile is taken
as well, and the run's layout is predicted from it too: the error against the one profile is
what a user gets; the error against the adjacent one is the model's own.

Splits (arms), run alternately within a round (A B C, then C B A, ...): ``uniform``
(Megatron's), ``cost`` (the analytic planner, H100 constants: what a user gets without a
profile) and ``profile`` (the planner over the measured unit times and per-stage costs);
optionally ``calibrated`` (the analytic planner with Hardware fitted to the profile).
Predicted step time of every arm = the measured-cost model: simulated 1F1B makespan (warm-up,
steady 1F1B, cool-down, p2p per boundary message) + the slowest stage's optimizer / gradient
finalisation / fixed cost (`splitllama.pipeline.plan.StagePlan.step_time_s` with a
`StageOverhead`). Measured = median of the app's ``step_time_s`` after the warm-up steps.
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROXY_LOWER = {"hidden_size": 256, "intermediate_size": 896, "num_attention_heads": 8, "num_key_value_heads": 2,
               "num_hidden_layers": 16, "vocab_size": 8192, "max_position_embeddings": 1024}
PROXY_UPPER = {"hidden_size": 512, "intermediate_size": 1792, "num_attention_heads": 8, "num_key_value_heads": 2,
               "num_hidden_layers": 8, "vocab_size": 8192, "max_position_embeddings": 1024}
PROXY_UPPER_WIDE = {**PROXY_UPPER, "hidden_size": 768, "intermediate_size": 2688, "num_attention_heads": 12,
                    "num_key_value_heads": 4}
PROXIES = {"balanced": (16, 4), "unbalanced": (4, 4)}
PROXY_UPPERS = {"balanced": PROXY_UPPER, "unbalanced": PROXY_UPPER_WIDE}
PART_C = {"pp": 2, "seq_length": 128, "micro_batch_size": 1, "global_batch_size": 16, "iters": 7, "warmup": 2,
          "rounds": 2, "threads_per_proc": 1, "profile_reps": 10}
ARMS = ("uniform", "cost", "profile")
ARM_OVERRIDES = {"uniform": ["parallel.pipeline_split=uniform"], "cost": ["parallel.pipeline_split=cost"],
                 "profile": ["parallel.pipeline_split=profile", "parallel.profile_file={profile}"],
                 "calibrated": ["parallel.pipeline_split=cost", "parallel.profile_file={profile}"]}


def child_env(threads=None) -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env.update(PYTHONPATH=REPO, PYTHONUNBUFFERED="1", PYTHONWARNINGS="ignore")
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    return env


def proxy_yaml(path: str, proxy: str = "balanced") -> None:
    import yaml

    n, m = PROXIES[proxy]
    cfg = {"model": {"lower": PROXY_LOWER, "upper": PROXY_UPPERS[proxy], "num_layers_lower": n, "num_layers_upper": m,
                     "mlp": False},
           "data": {"mock": True, "seq_length": PART_C["seq_length"]},
           "train": {"micro_batch_size": PART_C["micro_batch_size"], "global_batch_size": PART_C["global_batch_size"],
                     "eval_interval": 0},
           "optimizer": {"lr_warmup_iters": 1},
           "logging": {"log_interval": 1, "progress": False}}
    with open(path, "w") as f:
        yaml.safe_dump(cfg, f, sort_keys=False)


def _proxy_overrides(proxy: str) -> list[str]:
    n, m = PROXIES[proxy]
    return [f"model.num_layers_lower={n}", f"model.num_layers_upper={m}",
            f"parallel.pipeline_model_parallel_size={PART_C['pp']}"]


def run_proxy(yaml_path: str, overrides: list[str], iters: int, metrics: str) -> dict:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={PART_C['pp']}",
           os.path.join(REPO, "pretrain_splitllama.py"), "--config", yaml_path, *overrides,
           f"train.train_iters={iters}", f"logging.metrics_file={metrics}"]
    t0, load0 = time.perf_counter(), os.getloadavg()
    p = subprocess.run(cmd, cwd=REPO, env=child_env(PART_C["threads_per_proc"]), capture_output=True, text=True)
    if p.returncode != 0:
        raise RuntimeError(f"proxy run ({overrides}) failed (exit {p.returncode}):\n{p.stdout[-3000:]}\n"
                           f"{p.stderr[-6000:]}")
    layout = next((ln.split("pipeline layout:", 1)[1].split(" | tp=")[0].strip()
                   for ln in p.stdout.splitlines() if "pipeline layout:" in ln), None)
    with open(metrics) as f:
        steps = [json.loads(ln)["step_time_s"] for ln in f if ln.strip() and "step_time_s" in ln]
    return {"layout": layout, "step_times_s": steps, "process_wall_s": time.perf_counter() - t0,
            "loadavg_1min_before_after": [load0[0], os.getloadavg()[0]],
            "profiled_in_run": "profiling the job's units" in p.stdout}


def take_profile(yaml_path: str, out: str, reps: int) -> float:
    """Profile at PP=2 (the host contention of two stage processes is measured too)."""
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, "-m", "splitllama.planning.profile_cli", "--config", yaml_path,
                        "--profile-out", out, "--reps", str(reps),
                        f"parallel.pipeline_model_parallel_size={PART_C['pp']}"], cwd=REPO,
                       env=child_env(PART_C["threads_per_proc"]), capture_output=True, text=True)
    if p.returncode != 0:
        raise RuntimeError(f"profiling failed (exit {p.returncode}):\n{p.stderr[-6000:]}")
    return time.perf_counter() - t0


def predict_layout(yaml_path: str, profile_path: str, proxy: str, layout: str) -> float:
    """Predicted step time of ``layout`` from the profile at ``profile_path`` (measured-cost model)."""
    from splitllama.config.job import load_job_config
    from splitllama.preflight.resolve import num_microbatches
    from splitllama.pipeline.measured import job_key, load_profile, stage_overhead, units_from_profile
    from splitllama.pipeline.plan import evaluate

    job = load_job_config(yaml_path, _proxy_overrides(proxy))
    prof = load_profile(profile_path, job_key(job))
    return evaluate(layout, units_from_profile(prof, job.model), PART_C["pp"], None,
                    num_microbatches(job.train, 1), stage_overhead=stage_overhead(prof)).step_time_s


def _units_ms(profile_path: str) -> str:
    with open(profile_path) as f:
        prof = json.load(f)
    return ", ".join(f"{k} {(v['fwd_s'] + v['bwd_s']) * 1e3:.1f}" for k, v in prof["units"].items()) + \
        f" ms; contention x{prof['costs'].get('host_contention', 1.0):.3f}"


def predictions(yaml_path: str, profile_path: str, proxy: str, arms) -> dict:
    """Per arm: the layout the app will build and its predicted step time (measured-cost model),
    plus the analytic (H100) prediction for reference."""
    from splitllama.config.job import load_job_config
    from splitllama.preflight.resolve import num_microbatches, stage_plan, units_for_job
    from splitllama.pipeline.measured import calibrate, job_key, load_profile, stage_overhead, units_from_profile
    from splitllama.pipeline.plan import evaluate, plan

    pp = PART_C["pp"]
    base = _proxy_overrides(proxy)
    job = load_job_config(yaml_path, base)
    prof = load_profile(profile_path, job_key(job))
    units, over = units_from_profile(prof, job.model), stage_overhead(prof)
    m = num_microbatches(job.train, 1)
    out = {}
    for arm in arms:
        ov = [o.format(profile=profile_path) for o in ARM_OVERRIDES[arm]]
        # the app's own choice (resolve.stage_plan, as the resolve step calls it); its environment key check
        # would need the children's thread count: the profile is checked here by job key only
        arm_job = load_job_config(yaml_path, base + [o for o in ov if "profile_file" not in o])
        if arm == "profile":
            chosen = plan(units, pp, "1f1b", None, m, stage_overhead=over)
        elif arm == "calibrated":
            chosen = plan(units_for_job(arm_job, 1, calibrate(prof, job.model)), pp, "1f1b", None, m)
        else:
            chosen = stage_plan(arm_job, dp=1)
        ev = evaluate(chosen.layout, units, pp, None, m, arm, stage_overhead=over)
        analytic = evaluate(chosen.layout, units_for_job(job, 1), pp, None, m)
        out[arm] = {"layout": str(chosen.layout), "overrides": ov, "predicted_step_s": ev.step_time_s,
                    "bottleneck_over_ideal": ev.bottleneck_over_ideal,
                    "stage_time_shares": [s.time_share for s in ev.stages],
                    "stage_overhead_s": [s.overhead_s for s in ev.stages],
                    "analytic_h100_bottleneck_over_ideal": analytic.bottleneck_over_ideal,
                    "num_microbatches": m}
    return out


def part_c(iters: int = PART_C["iters"], warmup: int = PART_C["warmup"], rounds: int = PART_C["rounds"],
           arms: tuple = ARMS, proxies: tuple = tuple(PROXIES)) -> dict:
    load0 = os.getloadavg()
    runs, pred, profiles, profile_s = [], {}, {}, {}
    with tempfile.TemporaryDirectory(prefix="pipeline_balance_c_") as tmp:
        yamls = {px: os.path.join(tmp, f"{px}.yaml") for px in proxies}
        ppaths = {px: os.path.join(tmp, f"{px}_profile.json") for px in proxies}
        for proxy in proxies:
            proxy_yaml(yamls[proxy], proxy)
            profile_s[proxy] = take_profile(yamls[proxy], ppaths[proxy], PART_C["profile_reps"])
            with open(ppaths[proxy]) as f:
                profiles[proxy] = json.load(f)
            print(f"(c) {proxy}: profile taken once in {profile_s[proxy]:.0f} s: {_units_ms(ppaths[proxy])}", flush=True)
            pred[proxy] = predictions(yamls[proxy], ppaths[proxy], proxy, arms)
            print(f"(c) {proxy}: " + ", ".join(f"{a} {p['layout']} predicted {p['predicted_step_s']:.3f} s"
                                              for a, p in pred[proxy].items()), flush=True)
        order = [(px, a) for px in proxies for a in arms]
        for rnd in range(rounds):
            for proxy, arm in (order if rnd % 2 == 0 else order[::-1]):  # cancels linear drift
                layout = pred[proxy][arm]["layout"]
                adj = os.path.join(tmp, f"adjacent_{proxy}_{arm}_{rnd}.json")
                take_profile(yamls[proxy], adj, PART_C["profile_reps"])
                adjacent = predict_layout(yamls[proxy], adj, proxy, layout)
                ov = [o.format(profile=ppaths[proxy]) for o in ARM_OVERRIDES[arm]]
                r = run_proxy(yamls[proxy], _proxy_overrides(proxy) + ov, iters,
                              os.path.join(tmp, f"{proxy}_{arm}_{rnd}.jsonl"))
                if r["layout"] != layout:
                    raise RuntimeError(f"{proxy}/{arm}: the app built {r['layout']}, predicted for {layout}")
                if r["profiled_in_run"]:
                    raise RuntimeError(f"{proxy}/{arm}: the run re-profiled instead of reusing {ppaths[proxy]}")
                runs.append({"proxy": proxy, "arm": arm, "round": rnd, "adjacent_predicted_step_s": adjacent,
                             "adjacent_profile_units": _units_ms(adj), **r})
                print(f"(c) round {rnd} {proxy:<10} {arm:<10} {r['layout']:<14} median step "
                      f"{statistics.median(r['step_times_s'][warmup:]) * 1e3:.0f} ms, adjacent profile predicts "
                      f"{adjacent * 1e3:.0f} ms ({_units_ms(adj)}; load {r['loadavg_1min_before_after'][0]:.1f})",
                      flush=True)
    rows = []
    for proxy in proxies:
        meas = {}
        for arm in arms:
            mine = [r for r in runs if r["proxy"] == proxy and r["arm"] == arm]
            ts = [t for r in mine for t in r["step_times_s"][warmup:]]
            meas[arm] = statistics.median(ts)
            adj = statistics.median(r["adjacent_predicted_step_s"] for r in mine)
            p = pred[proxy][arm]
            rows.append({"proxy": proxy, "arm": arm, "layout": p["layout"], "predicted_step_s": p["predicted_step_s"],
                         "measured_step_s": meas[arm], "min_step_s": min(ts), "n_steps": len(ts),
                         "error_over_measured": (p["predicted_step_s"] - meas[arm]) / meas[arm],
                         "adjacent_predicted_step_s": adj,
                         "adjacent_error_over_measured": (adj - meas[arm]) / meas[arm],
                         "bottleneck_over_ideal": p["bottleneck_over_ideal"],
                         "analytic_h100_bottleneck_over_ideal": p["analytic_h100_bottleneck_over_ideal"]})
        fastest = min(meas.values())
        for r in rows[-len(arms):]:
            r["over_fastest"] = r["measured_step_s"] / fastest
    acceptance = {
        "max_abs_error_over_measured": max(abs(r["error_over_measured"]) for r in rows),
        "max_abs_adjacent_error_over_measured": max(abs(r["adjacent_error_over_measured"]) for r in rows),
        "profile_within_3pct_of_fastest": {px: next(r["over_fastest"] for r in rows if r["proxy"] == px and
                                                    r["arm"] == "profile") <= 1.03 for px in proxies}
        if "profile" in arms else None}
    if "unbalanced" in proxies and {"uniform", "profile"} <= set(arms):
        m = {r["arm"]: r for r in rows if r["proxy"] == "unbalanced"}
        acceptance["unbalanced_uniform_over_profile_measured"] = m["uniform"]["measured_step_s"] / \
            m["profile"]["measured_step_s"]
        acceptance["unbalanced_uniform_predicted_bottleneck_over_ideal"] = m["uniform"]["bottleneck_over_ideal"]
    return {"setup": {**PART_C, "iters": iters, "warmup": warmup, "rounds": rounds, "arms": list(arms),
                      "proxies": {k: PROXIES[k] for k in proxies}, "lower": PROXY_LOWER,
                      "upper": {k: PROXY_UPPERS[k] for k in proxies},
                      "launcher": "torchrun --standalone, gloo, CPU harness, OMP_NUM_THREADS=1 per process"},
            "loadavg_start": load0, "profiles": profiles, "profile_seconds": profile_s, "predicted": pred,
            "rows": rows, "acceptance": acceptance, "runs": runs}


def format_part_c(c: dict) -> str:
    if "rows" not in c:  # a JSON written by the earlier, one-proxy version of (c)
        return "(c) stored result is from an earlier version of this benchmark: re-run with --parts c"
    st = c["setup"]
    cols = (f"{'proxy':<11}{'split':<11}{'layout':<15}{'pred b/ideal':>13}{'H100 b/ideal':>13}{'predicted s':>12}"
            f"{'measured s':>11}{'error':>8}{'adjacent s':>11}{'adj err':>8}{'/fastest':>9}")
    lines = [f"(c) PP={st['pp']} proxies on CPU (2 procs x 1 thread), seq {st['seq_length']}, mb "
             f"{st['micro_batch_size']}, {st['global_batch_size'] // st['micro_batch_size']} micro-batches/step, "
             f"{st['rounds']} round(s) alternated, {st['iters'] - st['warmup']} steps per run after "
             f"{st['warmup']} warm-up; one profile per proxy for all its runs (adjacent: a profile "
             f"taken right before each run)", cols, "-" * len(cols)]
    for r in c["rows"]:
        lines.append(f"{r['proxy']:<11}{r['arm']:<11}{r['layout']:<15}{r['bottleneck_over_ideal']:>13.3f}"
                     f"{r['analytic_h100_bottleneck_over_ideal']:>13.3f}{r['predicted_step_s']:>12.3f}"
                     f"{r['measured_step_s']:>11.3f}{r['error_over_measured']:>+8.1%}"
                     f"{r.get('adjacent_predicted_step_s', float('nan')):>11.3f}"
                     f"{r.get('adjacent_error_over_measured', float('nan')):>+8.1%}{r['over_fastest']:>9.3f}")
    a = c["acceptance"]
    lines.append(f"max |predicted - measured| / measured: {a['max_abs_error_over_measured']:.1%} one profile, "
                 f"{a.get('max_abs_adjacent_error_over_measured', float('nan')):.1%} adjacent (target <= 15%); "
                 f"profile within 3% of the fastest: {a['profile_within_3pct_of_fastest']}")
    if "unbalanced_uniform_over_profile_measured" in a:
        lines.append(f"unbalanced proxy: measured uniform/profile {a['unbalanced_uniform_over_profile_measured']:.3f} "
                     f"(target >= 1.2); uniform predicted bottleneck/ideal "
                     f"{a['unbalanced_uniform_predicted_bottleneck_over_ideal']:.3f} (>= 1.4)")
    lines.append("pred b/ideal: bottleneck/ideal over the measured unit times; H100 b/ideal: the analytic model's")
    loads = [x for r in c["runs"] for x in r["loadavg_1min_before_after"]] + [c["loadavg_start"][0]]
    if max(loads) > (os.cpu_count() or 1):
        lines.append(f"WARNING: 1-min load average reached {max(loads):.1f} on {os.cpu_count()} CPUs during the runs "
                     f"(the benchmark's own 2 ranks and the profile's load process count 2-3): if other jobs ran, "
                     f"these timings (and the profiles) do not measure the splits")
    return "\n".join(lines)
