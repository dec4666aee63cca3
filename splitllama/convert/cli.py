"""Command line of the checkpoint converter (``tools/convert_checkpoint.py``).

    import-hf        --lower DIR --upper DIR --num-layers-lower N --num-layers-upper M [--mlp]
                     [--adapter-init random|identity] [--seed S] [--dtype auto|bf16|fp32|fp16]
                     [--head lm|value] [--value-head-init zeros|normal] --out CKPT
    lm-to-critic     --ckpt LM_CKPT --out CKPT [--value-head-init zeros|normal] [--seed S]
    import-hf-split  DIR --out CKPT [--dtype ...]      (a seed CustomSplitLLamaForCausalLM checkpoint)
    export-hf        --ckpt CKPT --out DIR [--dtype ...] [--max-shard-size GB] [--tokenizer PATH]
                     [--tp T --pp P]   (under torchrun: loads the checkpoint sharded, streams it)
    inspect          CKPT|DIR

Bad inputs print one ``error: ...`` line naming the file / tensor / field and exit with 2,
leaving no output directory. ``--adapter-init lstsq`` (fit on activations) is deferred.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Optional

from splitllama import logs
from splitllama.convert.progress import fmt_bytes
from splitllama.errors import UsageError, cli_main
from splitllama.platform.lifecycle import terminate_unwinds


VALUE_INIT_HELP = ("critic value head: zeros (weight and bias 0) or normal (weight ~ N(0, 0.02^2) "
                   "from --seed, bias 0)")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="convert_checkpoint", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-v", "--verbose", action="store_true", help="show library diagnostics too")
    sub = p.add_subparsers(dest="cmd", required=True)
    dtypes = ("auto", "bf16", "fp32", "fp16")

    imp = sub.add_parser("import-hf", help="two HF LLaMA checkpoints -> torch_dist checkpoint")
    imp.add_argument("--lower", required=True, help="HF dir of the lower model (LLaMA-3-8B)")
    imp.add_argument("--upper", required=True, help="HF dir of the upper model (LLaMA-3-70B)")
    imp.add_argument("--num-layers-lower", type=int, required=True, help="N: first N lower layers")
    imp.add_argument("--num-layers-upper", type=int, required=True, help="M: last M upper layers")
    imp.add_argument("--mlp", action="store_true", help="two-layer adapter (Linear-ReLU-Linear)")
    imp.add_argument("--adapter-init", default="random", choices=("random", "identity"))
    imp.add_argument("--seed", type=int, default=0, help="seed of the random adapter (and normal value-head) init")
    imp.add_argument("--dtype", default="auto", choices=dtypes, help="auto: the source dtype")
    imp.add_argument("--head", default="lm", choices=("lm", "value"),
                     help="value: a critic initialisation (trunk copied, new value head instead of lm_head)")
    imp.add_argument("--value-head-init", default=None, choices=("zeros", "normal"),
                     help=VALUE_INIT_HELP + "; default zeros; only with --head value")
    imp.add_argument("--out", required=True, help="new checkpoint root (must not exist)")
    imp.add_argument("--no-progress", action="store_true")

    cri = sub.add_parser("lm-to-critic", help="LM torch_dist checkpoint -> critic initialisation (model.head=value)")
    cri.add_argument("--ckpt", required=True, help="LM checkpoint root (uses 'latest') or iter_ dir")
    cri.add_argument("--out", required=True, help="new checkpoint root (must not exist)")
    cri.add_argument("--value-head-init", default="zeros", choices=("zeros", "normal"), help=VALUE_INIT_HELP)
    cri.add_argument("--seed", type=int, default=None, help="seed of the normal value-head init (default 0)")
    cri.add_argument("--no-progress", action="store_true")

    spl = sub.add_parser("import-hf-split", help="seed HF split-model checkpoint -> torch_dist")
    spl.add_argument("dir")
    spl.add_argument("--out", required=True)
    spl.add_argument("--dtype", default="auto", choices=dtypes)
    spl.add_argument("--no-progress", action="store_true")

    exp = sub.add_parser("export-hf", help="torch_dist checkpoint -> HF split model directory")
    exp.add_argument("--ckpt", required=True, help="checkpoint root (uses 'latest') or iter_ dir")
    exp.add_argument("--out", required=True, help="new HF directory (must not exist)")
    exp.add_argument("--dtype", default=None, choices=dtypes[1:], help="default: the checkpoint's")
    exp.add_argument("--max-shard-size", type=float, default=5.0, help="GiB per safetensors shard")
    exp.add_argument("--tokenizer", default=None,
                     help="tokenizer.json file or HF tokenizer directory written into the export (default: "
                          "data.tokenizer_model of the checkpoint's training job, when an HF tokenizer)")
    exp.add_argument("--no-progress", action="store_true")
    exp.add_argument("--tp", type=int, default=None, help="sharded export under torchrun: tensor-parallel size "
                     "the checkpoint is loaded at (splitllama.convert.stream; no rank holds the whole model)")
    exp.add_argument("--pp", type=int, default=None, help="sharded export under torchrun: pipeline-parallel size")

    ins = sub.add_parser("inspect", help="print keys, shapes, dtypes, sizes and config")
    ins.add_argument("path")
    return p


def _summary_import(r) -> str:
    lines = [f"wrote {r.path}: {r.tensors} tensors, {fmt_bytes(r.bytes_written)} in {r.seconds:.1f} s",
             "read (bytes per file):"]
    for path, n in sorted(r.bytes_read.items()):
        lines.append(f"  {fmt_bytes(n):>12}  {path}")
    total = sum(r.bytes_read.values())
    rate = total / r.seconds / 1e9 if r.seconds else 0.0
    lines.append(f"  {fmt_bytes(total):>12}  total from {len(r.bytes_read)} files ({rate:.2f} GB/s)")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> str:
    if args.cmd == "import-hf":
        from splitllama.convert.import_hf import import_hf

        return _summary_import(import_hf(args.lower, args.upper, args.num_layers_lower, args.num_layers_upper,
                                         args.out, mlp=args.mlp, adapter_init=args.adapter_init,
                                         seed=args.seed, dtype=args.dtype, progress=not args.no_progress,
                                         head=args.head, value_head_init=args.value_head_init))
    if args.cmd == "lm-to-critic":
        from splitllama.convert.critic import lm_to_critic

        return _summary_import(lm_to_critic(args.ckpt, args.out, init=args.value_head_init, seed=args.seed,
                                            progress=not args.no_progress))
    if args.cmd == "import-hf-split":
        from splitllama.convert.import_hf import import_hf_split

        return _summary_import(import_hf_split(args.dir, args.out, dtype=args.dtype,
                                               progress=not args.no_progress))
    if args.cmd == "export-hf" and (args.tp, args.pp) != (None, None):
        from splitllama.convert.export_parallel import export_hf_parallel

        r = export_hf_parallel(args.ckpt, args.out, args.tp or 1, args.pp or 1, dtype=args.dtype,
                               progress=not args.no_progress, max_shard_bytes=int(args.max_shard_size * 1024 ** 3),
                               tokenizer=args.tokenizer)
        if int(os.environ.get("RANK", "0") or 0) != 0:
            return ""  # rank 0 reports
        return (f"wrote {r.path}: {r.tensors} tensors, {fmt_bytes(r.bytes_written)} in {len(r.files)} "
                f"file(s), {r.seconds:.1f} s (streamed from TP={args.tp or 1} x PP={args.pp or 1})\n{r.tokenizer}")
    if args.cmd == "export-hf":
        from splitllama.convert.export_hf import export_hf

        if int(os.environ.get("WORLD_SIZE", "1") or 1) > 1:
            raise UsageError("export-hf under torchrun needs --tp/--pp (the sharded export); without them run it "
                             "in one process")
        r = export_hf(args.ckpt, args.out, dtype=args.dtype, progress=not args.no_progress,
                      max_shard_bytes=int(args.max_shard_size * 1024 ** 3), tokenizer=args.tokenizer)
        return (f"wrote {r.path}: {r.tensors} tensors, {fmt_bytes(r.bytes_written)} in {len(r.files)} "
                f"file(s), {r.seconds:.1f} s\n{r.tokenizer}")
    from splitllama.convert.inspect_ckpt import inspect

    return inspect(args.path)


def _main(argv: Optional[list[str]]) -> int:
    args = _parser().parse_args(argv)
    logs.setup(args.verbose)
    with terminate_unwinds():  # SIGTERM unwinds: partial outputs are removed; handler restored after
        msg = run(args)
    if msg:
        print(msg)
    return 0


def main(argv: Optional[list[str]] = None) -> int:
    return cli_main(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
