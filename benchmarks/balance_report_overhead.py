"""Cost of the live pipeline balance report (``logging.pipeline_balance``) on a PP=2 CPU run.

(run)    ``pretrain_splitllama.py`` on the tiny config at PP=2 (2 processes under torchrun, gloo,
         one thread each), a deliberately unbalanced layout, the report on and off, alternated
         (on/off, off/on, ... ``--rounds`` pairs) so drift of the shared machine's load hits both
         alike. ``logging.log_interval=1``: the report's all-gather and analysis run every step
         (the worst case; the default interval is 10). Per-step time = the app's ``step_time_s``
         after ``--warmup`` steps; reported: median of each, the ratio on / off per round and
         pooled; and the CPU seconds of each whole run (torchrun + workers, from getrusage of
         the children; far less disturbed by other jobs than wall time): on - off per step.
(direct) what the report costs, measured directly: in the runs with it on, its own
         ``report_s`` per log interval (all-gather over the pipeline group, waiting for the
         other stage included, + analysis) and, in-process, what the instrumentation adds per
         micro-batch (the start/stop pairs Megatron's schedules call: two compute, four p2p)
         and one analysis alone (scaling + exact planner + costing the layout), tiny chain;
         overhead share = (timers x micro-batches + report_s / log_interval) / step time.

    PYTHONPATH=. python benchmarks/balance_report_overhead.py [--rounds 4] [--iters 30]
        [--out benchmarks/results/balance_report_overhead.json]
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if __package__ in (None, ""):
    sys.path.insert(0, REPO)
from benchmarks.results_file import write_result  # noqa: E402

CONFIG = "configs/tiny.yaml"
LAYOUT = "L2,A,U2|U1"
SHAPE = ["data.seq_length=128", "train.micro_batch_size=4", "train.global_batch_size=16"]  # 4 micro-batches
COMMON = ["train.eval_interval=0", "logging.progress=false", "logging.log_interval=1",
          "optimizer.lr_warmup_iters=1", "parallel.pipeline_model_parallel_size=2",
          f"parallel.pipeline_layout={LAYOUT}"]
TARGET = 0.01


def run(on: bool, iters: int, tmp: str, tag: str) -> tuple[list[float], list[float], float]:
    """(step_time_s of every step, the report's own report_s of every step when on, CPU seconds
    of the whole run: torchrun and both workers, start-up included)."""
    metrics = os.path.join(tmp, f"{tag}.jsonl")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
           os.path.join(REPO, "pretrain_splitllama.py"), "--config", CONFIG, *COMMON, *SHAPE,
           f"train.train_iters={iters}", f"logging.metrics_file={metrics}",
           f"logging.pipeline_balance={'true' if on else 'false'}"]
    env = {**os.environ, "PYTHONPATH": REPO, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    p = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = r1.ru_utime + r1.ru_stime - r0.ru_utime - r0.ru_stime
    if p.returncode != 0:
        raise RuntimeError(f"run failed (exit {p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    recs = [json.loads(ln) for ln in open(metrics) if ln.strip()]
    assert all(("pipeline_balance" in r) == on for r in recs)
    return [r["step_time_s"] for r in recs], [r["pipeline_balance"]["report_s"] for r in recs if on], cpu


def direct(step_s: float, num_microbatches: int) -> dict:
    from splitllama.config.job import load_job_config
    from splitllama.pipeline.balance import analyze
    from splitllama.preflight.resolve import units_for_job
    from splitllama.training.stage_timers import StageTimers

    t, n = StageTimers(cuda=False), 20000
    t0 = time.perf_counter()
    # per micro-batch a stage's schedule calls the two compute timers and at most four p2p ones
    # (no-op here, but still called)
    names = ("forward-recv", "forward-compute", "forward-send", "backward-recv", "backward-compute",
             "backward-send")
    for _ in range(n):
        for name in names:
            t(name, log_level=2).start()
            t(name).stop()
    per_mb = (time.perf_counter() - t0) / n
    job = load_job_config(os.path.join(REPO, CONFIG), [*COMMON, *SHAPE])
    units, k = units_for_job(job, 1), 200
    t0 = time.perf_counter()
    for _ in range(k):
        analyze(units, LAYOUT, [0.3, 0.1], num_microbatches, predicted_step_s=1.0, measured_step_s=1.0)
    per_analysis = (time.perf_counter() - t0) / k
    return {"timer_s_per_microbatch": per_mb, "analysis_s": per_analysis,
            "timers_share_of_step": per_mb * num_microbatches / step_s,
            "analysis_share_of_step_at_log_interval_1": per_analysis / step_s}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--iters", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--out", default=os.path.join(REPO, "benchmarks", "results", "balance_report_overhead.json"))
    a = ap.parse_args()
    on_all, off_all, ratios, report, cpu = [], [], [], [], {True: [], False: []}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(a.rounds):
            got = {}
            for on in ((True, False) if r % 2 == 0 else (False, True)):
                steps, rep, c = run(on, a.iters, tmp, f"r{r}_{'on' if on else 'off'}")
                cpu[on].append(c)
                got[on], report = steps[a.warmup:], report + rep[a.warmup:]
            on_all += got[True]
            off_all += got[False]
            ratios.append(statistics.median(got[True]) / statistics.median(got[False]))
            print(f"round {r}: on {statistics.median(got[True]) * 1e3:.1f} ms, off "
                  f"{statistics.median(got[False]) * 1e3:.1f} ms, on/off {ratios[-1]:.4f}", flush=True)
    on_med, off_med = statistics.median(on_all), statistics.median(off_all)
    d = direct(off_med, 4)
    d["report_s_median"] = statistics.median(report)
    d["cpu_s_per_run_on"], d["cpu_s_per_run_off"] = cpu[True], cpu[False]
    d["extra_cpu_s_per_step"] = (statistics.median(cpu[True]) - statistics.median(cpu[False])) / a.iters
    d["overhead_share_of_step"] = d["timers_share_of_step"] + d["report_s_median"] / off_med
    res = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "layout": LAYOUT, "shape": SHAPE, "log_interval": 1, "rounds": a.rounds, "iters": a.iters,
           "warmup": a.warmup, "step_on_median_s": on_med, "step_off_median_s": off_med,
           "on_over_off_pooled": on_med / off_med, "on_over_off_per_round": ratios,
           "on_over_off_median_of_rounds": statistics.median(ratios), **d, "target_share": TARGET,
           "load_avg": os.getloadavg()}
    print(f"\n{'':<40}{'value':>14}")
    print(f"{'step, report on (median)':<40}{on_med * 1e3:>11.1f} ms")
    print(f"{'step, report off (median)':<40}{off_med * 1e3:>11.1f} ms")
    print(f"{'on / off, pooled':<40}{on_med / off_med:>14.4f}")
    print(f"{'on / off, median of rounds':<40}{statistics.median(ratios):>14.4f}")
    print(f"{'timers per micro-batch':<40}{d['timer_s_per_microbatch'] * 1e6:>11.2f} us")
    print(f"{'timers, share of step (4 micro-batches)':<40}{d['timers_share_of_step']:>14.4%}")
    print(f"{'one analysis (planner etc.)':<40}{d['analysis_s'] * 1e6:>11.1f} us")
    print(f"{'analysis, share of step at interval 1':<40}{d['analysis_share_of_step_at_log_interval_1']:>14.4%}")
    print(f"{'CPU s per run, on / off (median)':<40}{statistics.median(cpu[True]):>7.1f} / "
          f"{statistics.median(cpu[False]):.1f}")
    print(f"{'extra CPU s per step (on - off)':<40}{d['extra_cpu_s_per_step'] * 1e3:>11.2f} ms")
    print(f"{'report_s in the runs (median)':<40}{d['report_s_median'] * 1e6:>11.1f} us")
    print(f"{'overhead share at log_interval=1':<40}{d['overhead_share_of_step']:>14.4%}")
    print(f"{'overhead share at log_interval=10':<40}"
          f"{d['timers_share_of_step'] + d['report_s_median'] / 10 / off_med:>14.4%}")
    write_result(res, a.out, lead="\n")


if __name__ == "__main__":
    main()
