"""``tools/plan_pipeline.py --profile [--profile-out FILE]`` (and ``parallel.profile_file``): take
or load a unit profile and print the plans made over it.

    python tools/plan_pipeline.py --config JOB.yaml --pp 4 --profile --profile-out prof.json
    torchrun --nproc-per-node=8 tools/plan_pipeline.py --config JOB.yaml --tp 8 --profile ...
    python tools/plan_pipeline.py --config JOB.yaml --pp 4 parallel.profile_file=prof.json

With ``--profile`` a fresh profile is taken at the job's shapes on this device (under torchrun:
at the job's TP; every rank takes part, rank 0 writes and prints) and written to
``--profile-out`` (default: ``parallel.profile_file``, else ``profile.json``). Without it the
profile of ``parallel.profile_file`` is read and must match the job's shapes (keys of the job
only: a profile may be planned from on another machine). Printed: measured unit times, the
calibrated analytic Hardware, and the profile plan next to uniform and the analytic cost plan,
all costed with the measured times and per-stage costs.
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from typing import Optional

from splitllama.pipeline.measured import (Profile, calibrate, job_key, load_profile, stage_overhead,
                                          units_from_profile)
from splitllama.pipeline.plan import GiB, evaluate, plan, uniform
from splitllama.pipeline.report import format_side_by_side, plan_to_dict, summary_line


def plans_from_profile(job, prof: Profile, dp: int = 1) -> dict:
    """{"profile", "uniform", "cost"} StagePlans, all costed with the measured units."""
    from splitllama.preflight.resolve import num_microbatches, units_for_job  # lazy: resolve imports pipeline

    par, tr = job.parallel, job.train
    pp = par.pipeline_model_parallel_size
    units = units_from_profile(prof, job.model, dp, par.use_distributed_optimizer)
    over = stage_overhead(prof, dp, par.use_distributed_optimizer)
    m = num_microbatches(tr, dp)
    budget = par.memory_budget_gb * GiB if par.memory_budget_gb else None
    analytic = plan(units_for_job(job, dp, calibrate(prof, job.model)), pp, "1f1b", budget, m)
    return {"profile": replace(plan(units, pp, "1f1b", budget, m, stage_overhead=over), method="profile"),
            "uniform": uniform(units, pp, budget, m, stage_overhead=over),
            "cost": evaluate(analytic.layout, units, pp, budget, m, "cost (calibrated)", stage_overhead=over)}


def describe(prof: Profile, job) -> str:
    hw = calibrate(prof, job.model)
    k, c = prof.key, prof.costs
    lines = [f"profile: {k.get('device_name')} ({k.get('device')}, {k.get('dtype')}, {k.get('transformer_impl')}/"
             f"{k.get('attention_backend')}), seq {k['seq_length']} x mb {k['micro_batch_size']}, tp "
             f"{k['tensor_model_parallel_size']}, recompute {k['recompute_granularity']}",
             f"{'unit':<10}{'fwd ms':>9}{'bwd ms':>9}{'peak MiB':>10}"]
    for kind, t in prof.units.items():
        mem = "n/a" if t.peak_memory_bytes is None else f"{t.peak_memory_bytes / 2 ** 20:.0f}"
        lines.append(f"{kind:<10}{t.fwd_s * 1e3:>9.2f}{t.bwd_s * 1e3:>9.2f}{mem:>10}")
    lines.append(f"per step: optimizer {c.optimizer_s_per_param * 1e9:.2f} ns/param, grad finalisation "
                 f"{c.grad_finalize_s_per_param * 1e9:.2f} ns/param, p2p {c.p2p_latency_s * 1e6:.0f} us + "
                 f"{c.p2p_s_per_byte * 1e9:.3f} ns/byte ({c.p2p_source})")
    lines.append(f"host contention: units x{c.host_contention:.3f} while {c.contention_procs} stage processes "
                 f"compute at once ({c.contention_source})")
    lines.append(f"calibrated analytic model: {hw.peak_flops * hw.flops_efficiency / 1e12:.3g} TFLOP/s effective, "
                 f"{hw.mem_bandwidth * hw.bandwidth_efficiency / 1e9:.3g} GB/s effective")
    return "\n".join(lines)


def run(job, dp: int = 1, take: bool = False, out: Optional[str] = None, as_json: bool = False,
        warmup: int = 3, reps: int = 10) -> int:
    path = out or job.parallel.profile_file or "profile.json"
    if take:
        import torch.distributed as dist

        from splitllama.planning.profile import save, take_profile

        prof = take_profile(job, warmup, reps)
        save(prof, path)
        if dist.is_initialized() and dist.get_rank() != 0:
            return 0
    else:
        prof = load_profile(path, job_key(job))
    plans = plans_from_profile(job, prof, dp)
    if as_json:
        print(json.dumps({"profile_file": path, "profile": prof.to_dict(),
                          **{k: plan_to_dict(v) for k, v in plans.items()}}, indent=2))
        return 0
    if take:
        print(f"wrote {path}")
    print(describe(prof, job))
    print()
    for p in plans.values():
        print(summary_line(p))
    print()
    print(format_side_by_side(plans))
    print(f"\nto train with the profile plan: parallel.pipeline_split=profile parallel.profile_file={path}")
    return 0


def main(argv: Optional[list[str]] = None) -> int:
    """``python -m splitllama.planning.profile_cli --config JOB.yaml --profile-out FILE``."""
    from splitllama.config.job import load_job_config, normalize_argv
    from splitllama.errors import cli_main

    def _main(argv):
        ap = argparse.ArgumentParser(description="take a unit profile of a job")
        ap.add_argument("--config", required=True)
        ap.add_argument("--profile-out")
        ap.add_argument("--unit-load", metavar="DIR", help=argparse.SUPPRESS)  # profile.unit_load
        ap.add_argument("--warmup", type=int, default=3)
        ap.add_argument("--reps", type=int, default=10)
        args, rest = ap.parse_known_args(argv)
        job = load_job_config(args.config, normalize_argv(rest))
        from splitllama.planning.profile import save, take_profile, unit_load

        if args.unit_load:
            unit_load(job, args.unit_load)
            return 0
        if not args.profile_out:
            ap.error("--profile-out is required")

        save(take_profile(job, args.warmup, args.reps), args.profile_out)
        return 0
    return cli_main(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
