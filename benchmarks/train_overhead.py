"""Overhead of the training application over a bare Megatron-Core loop (CPU, 1 process).

A (app):  ``python pretrain_splitllama.py --config configs/tiny.yaml ...`` with the metrics
          file on and ``logging.log_interval=1``; per-step time = the app's own
          ``step_time_s`` (median over the steps after the warmup). As a cross-check the script
          also timestamps the app's per-iteration stdout lines as they arrive, which also
          catches time the app spends outside its own step timer (metrics/stdout logging).
B (bare): the same model, DDP, optimizer and data built here directly from megatron-core
          (`build_model`, megatron-core `DistributedDataParallel` + `get_megatron_optimizer`
          with the app's settings, the app's mock dataset and iterator) and a loop that runs
          only ``zero_grad_buffer`` + ``get_forward_backward_func()(...)`` + ``optimizer.step()``,
          each step timed with ``perf_counter`` (megatron-core's LR scheduler steps outside the
          timed region so that A and B train identically: the losses are checked equal).

The two are run as separate processes, alternated A, B, A, B, ... (``--rounds`` of each) so
slow drift of the machine's load hits both alike. Reported: median step time of each (all
measured steps of all rounds pooled), the ratio app / bare (target <= 1.05), and the
per-round ratios. ``--profile`` (on by default) also times each part of the app's step
in-process on the app's own Runtime (`build_runtime` + `setup_data`): the extras the app adds
to the bare loop's work (loss reduction, finite-grad check, LR scheduler, signal all-reduce),
measured within the same steps, so this figure is not blurred by machine-load drift between
the A and B processes. Also reported: CPU seconds per step (all threads; the app's read from
/proc/PID/stat as each iteration's log line arrives, the bare loop's from process_time), which
other processes' load disturbs far less than wall time on a shared machine.

Usage:
    PYTHONPATH=. python benchmarks/train_overhead.py [--rounds 4] [--iters 30] [--warmup 5]
        [--out benchmarks/results/train_overhead.json]
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Optional

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if __package__ in (None, ""):  # allow running without PYTHONPATH
    sys.path.insert(0, REPO)
from benchmarks.results_file import write_result  # noqa: E402

CONFIG = "configs/tiny.yaml"
# Bigger than the tiny test default (seq 64, mbs 4) so one step takes a few hundred ms and
# per-step noise is small next to it; 2 micro-batches per step exercise grad accumulation.
SHAPE = ["data.seq_length=128", "train.micro_batch_size=4", "train.global_batch_size=8"]
COMMON = ["train.eval_interval=0", "logging.progress=false", "logging.log_interval=1",
          "optimizer.lr_warmup_iters=1"]  # any --iters works (warmup < decay iters)
TARGET = 1.05


def machine() -> dict:
    import warnings

    warnings.filterwarnings("ignore")
    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")),
               platform.processor())
    import torch
    import megatron.core

    return {"nproc": os.cpu_count(), "cpu": cpu, "torch": torch.__version__,
            "megatron_core": megatron.core.__version__, "python": platform.python_version()}


def child_env(threads: int) -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env.update(PYTHONPATH=REPO, PYTHONUNBUFFERED="1", OMP_NUM_THREADS=str(threads),
               PYTHONWARNINGS="ignore")
    return env


def _proc_stat(pid: int) -> tuple[float, int]:
    """(user + system CPU seconds, minor page faults) of a live process, all its threads."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK"), int(fields[7])


# ---- A: the application ------------------------------------------------------------------------
def run_app(overrides: list[str], iters: int, threads: int, tmp: str, tag: str) -> dict:
    metrics = os.path.join(tmp, f"app_{tag}.jsonl")
    cmd = [sys.executable, os.path.join(REPO, "pretrain_splitllama.py"), "--config", CONFIG,
           *COMMON, *overrides, f"train.train_iters={iters}", f"logging.metrics_file={metrics}"]
    t_start = time.perf_counter()
    p = subprocess.Popen(cmd, cwd=REPO, env=child_env(threads), stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True)
    line_times, line_cpu, line_flt, tail = [], [], [], []
    for line in p.stdout:
        if line.startswith("iter "):
            line_times.append(time.perf_counter())
            c, flt = _proc_stat(p.pid)
            line_cpu.append(c)
            line_flt.append(flt)
        tail = (tail + [line])[-40:]
    rc = p.wait()
    wall = time.perf_counter() - t_start
    if rc != 0:
        raise RuntimeError(f"app run failed (exit {rc}):\n{''.join(tail)}")
    with open(metrics) as f:
        recs = [json.loads(ln) for ln in f if ln.strip()]
    steps = [r["step_time_s"] for r in recs if "step_time_s" in r]
    if len(steps) != iters:
        raise RuntimeError(f"expected {iters} metric records, got {len(steps)}")
    return {"step_times_s": steps, "losses": [r["loss"] for r in recs if "step_time_s" in r],
            "line_intervals_s": [b - a for a, b in zip(line_times, line_times[1:])],
            "cpu_at_step_end_s": line_cpu, "minflt_at_step_end": line_flt,
            "process_wall_s": wall}


# ---- B: the bare megatron-core loop (runs in a child process: `--bare-worker`) ------------------
def bare_worker(overrides: list[str], iters: int, out: str) -> None:
    import torch
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.distributed.finalize_model_grads import finalize_model_grads
    from megatron.core.optimizer import OptimizerConfig as McoreOptimizerConfig
    from megatron.core.optimizer import get_megatron_optimizer
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from splitllama.config.job import load_job_config
    from splitllama.preflight.resolve import resolve
    from splitllama.data.datasets import build_datasets
    from splitllama.data.iterator import build_data_iterator
    from splitllama.data.tokenizers import build_tokenizer
    from splitllama.model.build import build_model
    from splitllama.model.megatron_config import Numerics
    from splitllama.platform.dist import init_distributed, shutdown

    job = load_job_config(os.path.join(REPO, CONFIG), [*COMMON, *overrides, f"train.train_iters={iters}"])
    plan = resolve(job, 1)
    job = plan.job  # the validated sections with effective values (data.vocab_size)
    par, tr, opt = job.parallel, job.train, job.optimizer
    assert par.pipeline_model_parallel_size == 1 and par.tensor_model_parallel_size == 1
    on_cpu = init_distributed(par, seed=tr.seed)
    assert on_cpu, "this benchmark is for the CPU harness"
    numerics = Numerics(params_dtype=torch.float32, bf16=False, use_cpu_initialization=True)
    model = build_model(job.model, par, numerics).model
    ddp = DistributedDataParallel(
        config=model.config, module=model,
        ddp_config=DistributedDataParallelConfig(grad_reduce_in_fp32=True, overlap_grad_reduce=False,
                                                 use_distributed_optimizer=par.use_distributed_optimizer,
                                                 check_for_nan_in_grad=False, bucket_size=None))
    optimizer = get_megatron_optimizer(
        McoreOptimizerConfig(optimizer=opt.optimizer, lr=opt.lr, min_lr=opt.min_lr,
                             weight_decay=opt.weight_decay, adam_beta1=opt.adam_beta1,
                             adam_beta2=opt.adam_beta2, adam_eps=opt.adam_eps, clip_grad=opt.clip_grad,
                             bf16=False, params_dtype=torch.float32,
                             use_distributed_optimizer=par.use_distributed_optimizer), [ddp])
    # the app's LR schedule, so that A and B train identically (same loss at every step); its
    # step() is ~0.03 ms, not part of what is compared
    iters_total = tr.total_iters()
    scheduler = OptimizerParamScheduler(
        optimizer, init_lr=0.0, max_lr=opt.lr, min_lr=opt.min_lr,
        lr_warmup_steps=opt.lr_warmup_iters * tr.global_batch_size,
        lr_decay_steps=(opt.lr_decay_iters or iters_total) * tr.global_batch_size,
        lr_decay_style=opt.lr_decay_style, start_wd=opt.weight_decay, end_wd=opt.weight_decay,
        wd_incr_steps=(opt.lr_decay_iters or iters_total) * tr.global_batch_size, wd_incr_style="constant")
    cfg = model.config
    cfg.no_sync_func, cfg.finalize_model_grads_func = ddp.no_sync, finalize_model_grads
    cfg.grad_scale_func = optimizer.scale_loss

    tok = build_tokenizer(job.data)
    train_ds, _, _ = build_datasets(job.data, global_batch_size=tr.global_batch_size,
                                    train_samples=iters * tr.global_batch_size,
                                    eval_samples=tr.eval_iters * tr.global_batch_size, test_samples=0,
                                    seed=tr.seed, tokenizer=tok)
    data = build_data_iterator(train_ds, tr.micro_batch_size, 0, 0, 1,
                               num_workers=job.data.num_workers, cyclic=True)

    def loss_func(loss_mask, output):
        mask = loss_mask.view(-1).float()
        total = torch.sum(output.view(-1).float() * mask)
        return total, mask.sum().to(torch.int), {"lm loss": torch.stack([total.detach(), mask.sum()])}

    def forward_step(it, m):
        b = next(it)
        out = m(b["tokens"], position_ids=b.get("position_ids"), labels=b["labels"])
        return out, lambda o: loss_func(b["loss_mask"], o)

    fb = get_forward_backward_func()
    num_mb = plan.num_microbatches
    import resource

    times, losses, cpu, flt = [], [], [], []
    for _ in range(iters):
        t0 = time.perf_counter()
        ddp.zero_grad_buffer()
        optimizer.zero_grad()
        mb_losses = fb(forward_step_func=forward_step, data_iterator=data, model=[ddp], num_microbatches=num_mb,
                 forward_only=False, seq_length=job.data.seq_length, micro_batch_size=tr.micro_batch_size)
        optimizer.step()
        times.append(time.perf_counter() - t0)
        scheduler.step(increment=tr.global_batch_size)
        cpu.append(time.process_time())
        flt.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt)
        losses.append(float(sum(d["lm loss"][0] for d in mb_losses) / sum(d["lm loss"][1] for d in mb_losses)))
    shutdown()
    with open(out, "w") as f:
        json.dump({"step_times_s": times, "losses": losses, "cpu_at_step_end_s": cpu, "minflt_at_step_end": flt}, f)


def run_bare(overrides: list[str], iters: int, threads: int, tmp: str, tag: str) -> dict:
    out = os.path.join(tmp, f"bare_{tag}.json")
    cmd = [sys.executable, os.path.abspath(__file__), "--bare-worker", "--iters", str(iters),
           "--worker-out", out, "--", *overrides]
    t_start = time.perf_counter()
    p = subprocess.run(cmd, cwd=REPO, env=child_env(threads), capture_output=True, text=True)
    if p.returncode != 0:
        raise RuntimeError(f"bare run failed (exit {p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-6000:]}")
    with open(out) as f:
        res = json.load(f)
    res["process_wall_s"] = time.perf_counter() - t_start
    return res


# ---- profile of the app's per-step extras (in-process, on the app's own Runtime) ---------------
def profile_worker(overrides: list[str], iters: int, warmup: int, out: str) -> None:
    """Time each part of the app's `train_step` + loop bookkeeping separately, on the objects
    `build_runtime` + `setup_data` make (what pretrain_splitllama.py runs)."""
    import torch
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from splitllama.config.job import load_job_config
    from splitllama.platform.dist import shutdown
    from splitllama.training import loop
    from splitllama.training.app import setup_data
    from splitllama.preflight.launch import run_plan
    from splitllama.training.runtime import build_runtime
    from splitllama.training.step import forward_step

    job = load_job_config(os.path.join(REPO, CONFIG), [*COMMON, *overrides, f"train.train_iters={iters}"])
    rt = build_runtime(run_plan(job))
    setup_data(rt)
    fb = get_forward_backward_func()
    parts: dict[str, list[float]] = {}

    def timed(name, fn):
        t0 = time.perf_counter()
        r = fn()
        parts.setdefault(name, []).append(time.perf_counter() - t0)
        return r

    for i in range(iters):
        t0 = time.perf_counter()
        timed("zero_grad", lambda: (rt.ddp.zero_grad_buffer(), rt.optimizer.zero_grad()))
        losses = timed("forward_backward", lambda: fb(
            forward_step_func=forward_step, data_iterator=rt.train_iter, model=[rt.ddp],
            num_microbatches=rt.num_microbatches, forward_only=False, **loop._schedule_kwargs(rt)))
        timed("reduce_loss", lambda: loop.reduce_loss(rt, losses))
        timed("grads_finite_check", lambda: loop._grads_finite(rt))
        timed("optimizer_step", lambda: rt.optimizer.step())
        timed("scheduler_step", lambda: rt.scheduler.step(increment=job.train.global_batch_size))
        timed("signal_check_allreduce", lambda: loop._any_rank(False))
        parts.setdefault("total", []).append(time.perf_counter() - t0)
    numel = sum(b.grad_data.numel() for b in rt.ddp.buffers)
    shutdown()
    med = {k: statistics.median(v[warmup:]) for k, v in parts.items()}
    core = [a + b + c for a, b, c in zip(parts["zero_grad"], parts["forward_backward"], parts["optimizer_step"])]
    extras = [t - c for t, c in zip(parts["total"], core)]
    with open(out, "w") as f:
        json.dump({"median_s": med, "per_step_s": parts, "numel_grad_buffers": numel,
                   # what the bare loop also does vs everything the app's train_step + loop adds
                   "median_core_s": statistics.median(core[warmup:]),
                   "median_extras_s": statistics.median(extras[warmup:]),
                   "extras_over_core": statistics.median(extras[warmup:]) / statistics.median(core[warmup:])}, f)


def run_profile(overrides: list[str], iters: int, warmup: int, threads: int, tmp: str) -> dict:
    out = os.path.join(tmp, "profile.json")
    cmd = [sys.executable, os.path.abspath(__file__), "--profile-worker", "--iters", str(iters),
           "--warmup", str(warmup), "--worker-out", out, "--", *overrides]
    p = subprocess.run(cmd, cwd=REPO, env=child_env(threads), capture_output=True, text=True)
    if p.returncode != 0:
        raise RuntimeError(f"profile run failed (exit {p.returncode}):\n{p.stderr[-6000:]}")
    with open(out) as f:
        return json.load(f)


# ---- driver ------------------------------------------------------------------------------------
def summarize(runs: list[dict], warmup: int) -> dict:
    def pooled(kind, key="step_times_s"):
        return [t for r in runs if r["kind"] == kind for t in r[key][warmup:]]

    app, bare = pooled("app"), pooled("bare")
    app_lines = pooled("app", "line_intervals_s")

    def cpu_per_step(kind, key="cpu_at_step_end_s"):  # per measured step, all runs of a kind
        c = [r[key] for r in runs if r["kind"] == kind]
        return sum(x[-1] - x[warmup - 1] for x in c) / sum(len(x) - warmup for x in c)

    per_round = []
    for rnd in sorted({r["round"] for r in runs}):
        a = next(r for r in runs if r["kind"] == "app" and r["round"] == rnd)
        b = next(r for r in runs if r["kind"] == "bare" and r["round"] == rnd)
        per_round.append(statistics.median(a["step_times_s"][warmup:]) / statistics.median(b["step_times_s"][warmup:]))
    s = {"app_median_step_s": statistics.median(app), "bare_median_step_s": statistics.median(bare),
         "app_min_step_s": min(app), "bare_min_step_s": min(bare),
         "app_median_log_line_interval_s": statistics.median(app_lines) if app_lines else None,
         "per_round_ratio": per_round, "target": TARGET}
    s["ratio"] = s["app_median_step_s"] / s["bare_median_step_s"]
    s["app_cpu_per_step_s"], s["bare_cpu_per_step_s"] = cpu_per_step("app"), cpu_per_step("bare")
    s["ratio_cpu_time"] = s["app_cpu_per_step_s"] / s["bare_cpu_per_step_s"]
    s["app_minflt_per_step"] = cpu_per_step("app", "minflt_at_step_end")
    s["bare_minflt_per_step"] = cpu_per_step("bare", "minflt_at_step_end")
    s["ratio_min"] = s["app_min_step_s"] / s["bare_min_step_s"]
    s["ratio_log_line_interval"] = (s["app_median_log_line_interval_s"] / s["bare_median_step_s"]
                                    if app_lines else None)
    s["meets_target"] = s["ratio"] <= TARGET
    # sanity: same model init, data, seed and LR schedule -> the same loss at every step
    s["max_abs_loss_diff_app_vs_bare"] = max(
        abs(x - y) for a in runs if a["kind"] == "app" for b in runs if b["kind"] == "bare" and b["round"] == a["round"]
        for x, y in zip(a["losses"], b["losses"]))
    return s


def format_table(res: dict) -> str:
    s, w = res["summary"], res["setup"]["warmup"]
    lines = [f"train_overhead: {' '.join(res['setup']['shape'])}, {res['setup']['iters']} steps/run "
             f"({w} warmup excluded), {res['setup']['rounds']} rounds A/B, OMP_NUM_THREADS="
             f"{res['setup']['threads']}",
             f"{'run':<6} {'round':>5} {'median ms':>10} {'min ms':>8} {'n':>4}",
             "-" * 38]
    for r in res["runs"]:
        ts = r["step_times_s"][w:]
        lines.append(f"{r['kind']:<6} {r['round']:>5} {statistics.median(ts) * 1e3:>10.1f} "
                     f"{min(ts) * 1e3:>8.1f} {len(ts):>4}")
    lines += ["-" * 38,
              f"app  (pretrain_splitllama.py step_time_s) median {s['app_median_step_s'] * 1e3:.1f} ms",
              f"app  (interval between its log lines)     median {s['app_median_log_line_interval_s'] * 1e3:.1f} ms",
              f"bare (fwd_bwd + optimizer.step)           median {s['bare_median_step_s'] * 1e3:.1f} ms",
              f"CPU time per step (all threads, whole loop): app {s['app_cpu_per_step_s'] * 1e3:.1f} ms, bare "
              f"{s['bare_cpu_per_step_s'] * 1e3:.1f} ms -> ratio {s['ratio_cpu_time']:.3f} (less sensitive to "
              f"other processes' load than wall time)",
              f"minor page faults per step: app {s['app_minflt_per_step']:.0f}, bare {s['bare_minflt_per_step']:.0f}",
              f"ratio app/bare = {s['ratio']:.3f} (target <= {TARGET}; per round "
              f"{', '.join(f'{x:.3f}' for x in s['per_round_ratio'])}; of minima {s['ratio_min']:.3f}; "
              f"log-line interval / bare {s['ratio_log_line_interval']:.3f}) -> "
              f"{'OK' if s['meets_target'] else 'ABOVE TARGET'}",
              f"same training in A and B: max |loss_app - loss_bare| over all steps = "
              f"{s['max_abs_loss_diff_app_vs_bare']:.2e}"]
    if res.get("profile"):
        p = res["profile"]["median_s"]
        lines.append("profile of the app's step (in-process, app Runtime), median ms:")
        for k, v in p.items():
            lines.append(f"  {k:<24} {v * 1e3:>8.2f}")
        pr = res["profile"]
        lines.append(f"  extras beyond zero_grad + forward_backward + optimizer_step: "
                     f"{pr['median_extras_s'] * 1e3:.2f} ms per step = {pr['extras_over_core'] * 100:.1f} % of "
                     f"{pr['median_core_s'] * 1e3:.1f} ms (in-process, same steps: free of the A/B noise)")
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--iters", type=int, default=30, help="steps per run, warmup included")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1,
                    help="OMP_NUM_THREADS of each run (1: CPU time per step is then immune to OpenMP spin-waits "
                         "when other processes take the cores)")
    ap.add_argument("--profile", choices=("auto", "always", "never"), default="always",
                    help="also time the app's per-step extras in-process (auto: only when above target)")
    ap.add_argument("--out", default=os.path.join(REPO, "benchmarks/results/train_overhead.json"))
    ap.add_argument("--bare-worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--profile-worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--worker-out", help=argparse.SUPPRESS)
    ap.add_argument("overrides", nargs="*", help="extra key=value overrides for both A and B")
    args = ap.parse_args(argv)
    overrides = SHAPE + args.overrides
    if args.bare_worker:
        bare_worker(args.overrides, args.iters, args.worker_out)
        return 0
    if args.profile_worker:
        profile_worker(args.overrides, args.iters, args.warmup, args.worker_out)
        return 0

    res = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "machine": machine(), "loadavg_start": os.getloadavg(),
           "setup": {"config": CONFIG, "shape": SHAPE, "overrides": overrides, "rounds": args.rounds,
                     "iters": args.iters, "warmup": args.warmup, "threads": args.threads},
           "runs": []}
    with tempfile.TemporaryDirectory(prefix="train_overhead_") as tmp:
        for rnd in range(args.rounds):
            for kind, fn in (("app", run_app), ("bare", run_bare)):
                r = fn(overrides, args.iters, args.threads, tmp, f"{rnd}")
                res["runs"].append({"kind": kind, "round": rnd, **r})
                print(f"round {rnd} {kind}: median {statistics.median(r['step_times_s'][args.warmup:]) * 1e3:.1f} ms",
                      flush=True)
        res["summary"] = summarize(res["runs"], args.warmup)
        if args.profile == "always" or (args.profile == "auto" and not res["summary"]["meets_target"]):
            res["profile"] = run_profile(overrides, args.iters, args.warmup, args.threads, tmp)
    res["loadavg_end"] = os.getloadavg()
    print(format_table(res))
    write_result(res, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
