"""Plan SplitLlama's pipeline stages by cost and compare with the uniform and params-balanced splits.

Example:
    PYTHONPATH=. python tools/plan_pipeline.py --config configs/llama3_8b_70b.yaml --pp 4 \\
        --seq-length 4096 --tp 8 --dp 1 --memory-gb 80 [--layout "L18|L14,A,U1|U4|U3"] [--json] \\
        [section.key=value ...]

Prints, per stage, the units, parameters, GFLOPs, predicted time share and memory by kind for
the planned, uniform and params-balanced splits (plus an explicit ``--layout`` or the config's
``parallel.pipeline_layout``), the bottleneck/ideal ratio and the predicted 1F1B bubble.
``--json`` prints one JSON object instead. Exit status 1 when the planner finds no split that
fits the memory budget (the message names the smallest stage memory achievable); 2, with one
``error:`` line, for a config the training run would refuse (e.g. --tp 3, --pp 9, --seq-length
beyond max_position_embeddings).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys

if __package__ in (None, ""):  # allow `python tools/plan_pipeline.py` without PYTHONPATH
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from splitllama.config.cli import config_parser  # noqa: E402
from splitllama.config.job import load_job_config, normalize_argv  # noqa: E402
from splitllama.errors import cli_main  # noqa: E402
from splitllama.preflight.resolve import check_model, check_parallel, split_inputs  # noqa: E402
from splitllama.pipeline.cost import Hardware  # noqa: E402
from splitllama.pipeline.plan import evaluate, params_balanced, plan, uniform  # noqa: E402
from splitllama.pipeline.report import format_plan, format_side_by_side, plan_to_dict, summary_line  # noqa: E402


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, list[str]]:
    p = config_parser(__doc__.splitlines()[0])  # --help ends with every config key
    p.add_argument("--config", default=None, help="job YAML (e.g. configs/llama3_8b_70b.yaml)")
    p.add_argument("--pp", type=int, default=None, help="pipeline stages (default: config)")
    p.add_argument("--tp", type=int, default=None, help="tensor parallel size (default: config)")
    p.add_argument("--dp", type=int, default=1, help="data parallel size (default 1)")
    p.add_argument("--seq-length", type=int, default=None)
    p.add_argument("--micro-batch-size", type=int, default=None)
    p.add_argument("--global-batch-size", type=int, default=None)
    p.add_argument("--recompute", choices=("none", "selective", "full"), default=None)
    p.add_argument("--memory-gb", type=float, default=None,
                   help="per-GPU memory budget in GiB (default: parallel.memory_budget_gb; 0: none)")
    p.add_argument("--vpp", type=int, default=1, help="virtual pipeline stages per rank: plan interleaved "
                   "1F1B over pp x vpp chunks, chunk c on rank c %% pp (the uniform / params-balanced "
                   "baselines stay non-interleaved; an explicit --layout then lists pp x vpp chunks)")
    p.add_argument("--layout", default=None, help='explicit layout to cost, e.g. "L18|L14,A,U1|U4|U3"')
    p.add_argument("--peak-tflops", type=float, default=Hardware.peak_flops / 1e12)
    p.add_argument("--efficiency", type=float, default=Hardware.flops_efficiency)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--profile", action="store_true", help="time the units on this device at the job's shapes "
                   "(under torchrun: at its TP), write the profile and plan from it (splitllama.planning.profile_cli)")
    p.add_argument("--profile-out", default=None, help="where --profile writes (default: parallel.profile_file)")
    p.add_argument("--gpus", type=int, default=None, help="search TP, PP, DP, micro-batch and "
                   "recompute for G GPUs instead (see --gpus G --help)")
    args, rest = p.parse_known_args(argv)
    return args, normalize_argv(rest)


def _overrides(args: argparse.Namespace, extra: list[str]) -> list[str]:
    flags = {"parallel.pipeline_model_parallel_size": args.pp,
             "parallel.tensor_model_parallel_size": args.tp, "data.seq_length": args.seq_length,
             "train.micro_batch_size": args.micro_batch_size,
             "train.global_batch_size": args.global_batch_size,
             "train.recompute_granularity": None if args.recompute is None else
             ("null" if args.recompute == "none" else args.recompute),
             "parallel.pipeline_layout": args.layout}
    out = list(extra) + [f"{k}={v}" for k, v in flags.items() if v is not None]
    if args.memory_gb is not None:
        out.append(f"parallel.memory_budget_gb={args.memory_gb if args.memory_gb > 0 else 'null'}")
    return out


def _main(argv: list[str] | None = None) -> int:
    args, extra = parse_args(argv)
    job = load_job_config(args.config, _overrides(args, extra))
    if job.parallel.sequence_parallel and job.parallel.tensor_model_parallel_size == 1:
        # planning at tp=1 from a tp>1 config: no sequence parallelism
        job = dataclasses.replace(job, parallel=dataclasses.replace(job.parallel, sequence_parallel=False))
    par, tr, dp = job.parallel, job.train, args.dp
    # the training run's own checks of what a plan depends on (one `error:` line, exit 2)
    check_parallel(job, par.tensor_model_parallel_size * par.pipeline_model_parallel_size * dp)
    tr.check_values()
    check_model(job)
    if args.vpp != 1 and (args.profile or par.profile_file):
        raise ValueError("--vpp is not supported with --profile / parallel.profile_file (the profile "
                         "planner models the non-interleaved schedule)")
    if args.profile or par.profile_file:  # measured costs: splitllama/planning/profile_cli.py
        from splitllama.planning.profile_cli import run as run_profile
        return run_profile(job, dp, args.profile, args.profile_out, args.json)
    hw = Hardware(peak_flops=args.peak_tflops * 1e12, flops_efficiency=args.efficiency)
    s = split_inputs(job, dp, hw)
    units, pp, m, budget = s.units, s.pp, s.num_microbatches, s.memory_budget

    results, errors = {}, {}
    vpp = args.vpp
    if vpp < 1:
        raise ValueError(f"--vpp must be >= 1, got {vpp}")
    makers = {"planned": lambda: plan(units, pp, "1f1b", budget, m, vpp=vpp),
              "uniform": lambda: uniform(units, pp, budget, m),
              "params_balanced": lambda: params_balanced(units, pp, budget, m)}
    if par.pipeline_layout:
        makers["explicit"] = lambda: evaluate(par.pipeline_layout, units, pp, budget, m, vpp=vpp)
    for name, make in makers.items():
        try:
            results[name] = make()
        except ValueError as e:
            errors[name] = str(e)

    setup = {"config": args.config, "pp": pp, "vpp": vpp, "tp": par.tensor_model_parallel_size, "dp": dp,
             "sequence_parallel": par.sequence_parallel, "seq_length": job.data.seq_length,
             "micro_batch_size": tr.micro_batch_size, "global_batch_size": tr.global_batch_size,
             "num_microbatches": m, "recompute": tr.recompute_granularity,
             "memory_budget_gib": par.memory_budget_gb, "num_layers_lower": job.model.num_layers_lower,
             "num_layers_upper": job.model.num_layers_upper, "adapter_mlp": job.model.mlp,
             "peak_tflops": args.peak_tflops, "efficiency": args.efficiency}
    if args.json:
        out = {"setup": setup, **{k: plan_to_dict(v) for k, v in results.items()},
               **{k: {"error": v} for k, v in errors.items()}}
        print(json.dumps(out, indent=2))
    else:
        print("setup: " + ", ".join(f"{k}={v}" for k, v in setup.items()))
        print()
        for name in makers:
            print(summary_line(results[name]) if name in results else f"{name:<16} ERROR: {errors[name]}")
        if results:
            print()
            print(format_side_by_side(results))
            for p in results.values():
                print()
                print(format_plan(p))
    if errors:
        for name, msg in errors.items():
            print(f"error ({name}): {msg}", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if any(a == "--gpus" or a.startswith("--gpus=") for a in argv):  # whole-layout search
        from splitllama.planning.search_cli import main as search_main
        return search_main(argv)
    return cli_main(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
