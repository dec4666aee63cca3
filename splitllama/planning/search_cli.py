"""``tools/plan_pipeline.py --gpus G``: search the whole parallel layout (`pipeline.search`).

    python tools/plan_pipeline.py --config configs/llama3_8b_70b.yaml --gpus 64 --memory-gb 80 \\
        [--gpus-per-node 8] [--top 5] [--recompute none,selective,full] [--json] [section.key=value ...]

The model, sequence length, global batch, dtype and distributed optimizer come from the config
(and overrides); TP, PP, sequence parallelism, the pipeline layout, the micro-batch size and
recomputation are what is searched (the config's values of those are not used). Prints the best
few layouts ranked by predicted tokens/s per GPU with peak memory per stage and the overrides
that run each (``--json``: ``{"candidates": [...]}``, best first). Bad input, or no layout that
fits, is one ``error:`` line and exit status 2.
"""
from __future__ import annotations

import argparse
import json
import shlex
from typing import Optional

from splitllama.config.cli import config_parser
from splitllama.config.job import load_job_config, normalize_argv
from splitllama.errors import UsageError, cli_main
from splitllama.pipeline.cost import Hardware
from splitllama.pipeline.plan import GiB
from splitllama.pipeline.search import NOT_MODELLED, RECOMPUTE_OPTIONS, Candidate, analytic_units, search

SEARCHED = ("parallel.tensor_model_parallel_size", "parallel.pipeline_model_parallel_size",
            "parallel.sequence_parallel", "parallel.pipeline_layout", "train.micro_batch_size",
            "train.recompute_granularity")


def parse_args(argv: Optional[list[str]] = None) -> tuple[argparse.Namespace, list[str]]:
    p = config_parser(__doc__, prog="plan_pipeline.py")

    def refuse(message: str) -> None:  # one `error:` line (cli_main), not argparse's usage + exit
        raise UsageError(message)
    p.error = refuse
    p.add_argument("--gpus", type=int, required=True, help="GPUs of the job (G = tp * pp * dp)")
    p.add_argument("--gpus-per-node", type=int, default=8, help="GPUs per node; TP stays inside one (default 8)")
    p.add_argument("--memory-gb", type=float, default=None,
                   help="per-GPU memory budget in GiB (default: parallel.memory_budget_gb)")
    p.add_argument("--top", type=int, default=5, help="how many layouts to print (default 5)")
    p.add_argument("--recompute", default=",".join(RECOMPUTE_OPTIONS),
                   help="comma-separated recomputation settings to try (default none,selective,full)")
    p.add_argument("--config", default=None, help="job YAML (e.g. configs/llama3_8b_70b.yaml)")
    p.add_argument("--seq-length", type=int, default=None, help="default: data.seq_length")
    p.add_argument("--global-batch-size", type=int, default=None, help="default: train.global_batch_size")
    p.add_argument("--peak-tflops", type=float, default=Hardware.peak_flops / 1e12)
    p.add_argument("--efficiency", type=float, default=Hardware.flops_efficiency)
    p.add_argument("--json", action="store_true", help='print {"candidates": [...]} (best first)')
    args, rest = p.parse_known_args(argv)
    return args, normalize_argv(rest)


def _run_overrides(args: argparse.Namespace, extra: list[str]) -> list[str]:
    """The caller's own overrides, as a training command line takes them."""
    given = [o for o in extra if o.split("=", 1)[0] not in SEARCHED]
    if len(given) != len(extra):
        searched = sorted({o.split("=", 1)[0] for o in extra} & set(SEARCHED))
        raise UsageError(f"{', '.join(searched)} is what --gpus searches; leave it out (or plan a "
                         f"fixed layout without --gpus)")
    if args.seq_length is not None:
        given.append(f"data.seq_length={args.seq_length}")
    if args.global_batch_size is not None:
        given.append(f"train.global_batch_size={args.global_batch_size}")
    return given


def format_table(cands: list[Candidate]) -> str:
    cols = (f"{'#':>2} {'tp':>3} {'pp':>3} {'dp':>4} {'mbs':>4} {'recompute':<10}{'m':>5}  "
            f"{'layout':<28}{'tok/s/GPU':>10}{'step s':>8}{'bneck/id':>9}{'peak GiB':>9}  stage GiB")
    lines = [cols, "-" * len(cols)]
    for i, c in enumerate(cands, 1):
        stages = "/".join(f"{g:.1f}" for g in c.stage_memory_gib)
        lines.append(f"{i:>2} {c.tp:>3} {c.pp:>3} {c.dp:>4} {c.micro_batch_size:>4} {c.recompute:<10}"
                     f"{c.plan.num_microbatches:>5}  {c.layout:<28}{c.tokens_per_s_per_gpu:>10.0f}"
                     f"{c.step_time_s:>8.2f}{c.plan.bottleneck_over_ideal:>9.3f}{c.peak_memory_gib:>9.1f}  {stages}")
    return "\n".join(lines)


def _main(argv: Optional[list[str]] = None) -> int:
    args, extra = parse_args(argv)
    given = _run_overrides(args, extra)
    job = load_job_config(args.config, given)
    tr = job.train
    tr.check_values()
    budget_gib = args.memory_gb if args.memory_gb is not None else job.parallel.memory_budget_gb
    if not budget_gib or budget_gib <= 0:
        raise UsageError("--memory-gb must be > 0 (or set parallel.memory_budget_gb): the search "
                         "ranks layouts that fit a per-GPU memory budget")
    if args.top < 1:
        raise UsageError(f"--top must be >= 1, got {args.top}")
    recompute = [r.strip() for r in args.recompute.split(",") if r.strip()]
    bad = [r for r in recompute if r not in RECOMPUTE_OPTIONS]
    if bad or not recompute:
        raise UsageError(f"--recompute {args.recompute!r}: expected a comma-separated subset of "
                         f"{','.join(RECOMPUTE_OPTIONS)}")
    hw = Hardware(peak_flops=args.peak_tflops * 1e12, flops_efficiency=args.efficiency)
    source = analytic_units(hw, 4 if tr.bf16 is False else 2, job.parallel.use_distributed_optimizer)
    seq, gb = job.data.seq_length, tr.global_batch_size
    cands = search(job.model, args.gpus, seq, gb, budget_gib * GiB, gpus_per_node=args.gpus_per_node,
                   top=args.top, units_source=source, recompute=recompute,
                   micro_batch_sizes=[1] if job.data.packed_sequences else None)
    if not cands:
        raise UsageError(f"no layout of {args.gpus} GPUs ({args.gpus_per_node} per node) fits "
                         f"{budget_gib:g} GiB per GPU at seq {seq}, global batch {gb}, recompute "
                         f"{','.join(recompute)}: add GPUs or memory")
    base = (["--config", args.config] if args.config else []) + given
    if args.json:
        out = []
        for c in cands:
            d = c.to_dict()
            d["overrides"] = given + d["overrides"]
            out.append(d)
        print(json.dumps({"candidates": out}, indent=2))
        return 0
    print(f"setup: gpus={args.gpus} gpus_per_node={args.gpus_per_node} memory_budget_gib={budget_gib:g} "
          f"seq_length={seq} global_batch_size={gb} model={job.model.num_layers_lower} lower + adapter"
          f"{' (mlp)' if job.model.mlp else ''} + {job.model.num_layers_upper} upper layers, "
          f"peak_tflops={args.peak_tflops:g} efficiency={args.efficiency:g}")
    print("ranked by predicted tokens/s per GPU = global_batch * seq / (1F1B step time * gpus); "
          "analytic unit costs; sequence parallel when tp > 1")
    print(NOT_MODELLED)
    print()
    print(format_table(cands))
    print()
    for i, c in enumerate(cands, 1):
        print(f"{i:>2}: torchrun (on {args.gpus} GPUs) pretrain_splitllama.py " + shlex.join(base + c.overrides()))
    return 0


def main(argv: Optional[list[str]] = None) -> int:
    return cli_main(_main, argv)
