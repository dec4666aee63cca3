"""Attention backends on one decoder layer (Megatron TransformerBlock, num_layers=1, the local
spec with `core_attention` = Megatron's DotProductAttention ("local") or torch SDPA ("sdpa")).

(layer) one layer forward + backward at each seq: wall time (median of --reps after --warmup,
        the backends interleaved rep by rep so machine-load drift hits both alike) and peak
        memory of the fwd+bwd above what was held before it (CPU: the process's VmHWM, reset
        through /proc/self/clear_refs before each rep, with glibc's mmap threshold fixed so
        freed big buffers go back to the OS; CUDA: max_memory_allocated). With --device cuda
        also model TFLOP/s and MFU (cost-model FLOPs of the layer, as benchmarks/GPU.md).
(mix)   a chat-like length mix (seeded lognormal: many short documents, a few long ones) run
        through one layer with sdpa, fwd + bwd, three ways: packed without padding (greedy packs
        of --pack-length tokens, THD cu_seqlens, the padding tail as its own segment — static
        shapes as under PP), the same packs without the padding tail (variable length: the cost
        of static shapes is the difference), padded to the longest document of each micro-batch
        of --mix-batch documents, and padded to --pack-length. Real (non-pad) tokens per second.

Shapes: --shapes scaled (CPU default: hidden 512, 8 heads of 64, 2 KV groups, ffn 1408) or
real (LLaMA-3-8B and LLaMA-3-70B layers, bf16 on CUDA). Results: a table and JSON (--out).

    PYTHONPATH=. python benchmarks/attention.py                        # CPU: seq 1024/2048/4096 + mix
    PYTHONPATH=. python benchmarks/attention.py --device cuda --shapes real --seqs 4096,8192
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
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if __package__ in (None, ""):
    sys.path.insert(0, REPO)
from benchmarks.results_file import write_result  # noqa: E402

SCALED = dict(hidden_size=512, intermediate_size=1408, num_attention_heads=8, num_key_value_heads=2,
              num_hidden_layers=1, vocab_size=512)
PEAK_BF16_TFLOPS = 989.0  # H100/H200 dense bf16, as benchmarks/GPU.md


def _shapes(kind: str) -> dict:
    from splitllama.config.model import PRESETS, LlamaBlockConfig

    if kind == "real":
        return {"8b": PRESETS["llama3_8b"], "70b": PRESETS["llama3_70b"]}
    return {"scaled": LlamaBlockConfig(**SCALED)}


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(ln.split()[1]) for ln in f if ln.startswith(field + ":"))


class _Peak:
    """Peak memory of a region above what is held at its start (bytes)."""

    def __init__(self, cuda: bool) -> None:
        self.cuda = cuda

    def __enter__(self):
        import torch

        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        else:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # reset VmHWM to the current RSS
            self.base = _rss_kib("VmRSS") * 1024
        return self

    def __exit__(self, *exc):
        import torch

        if self.cuda:
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated() - self.base
        else:
            self.peak = _rss_kib("VmHWM") * 1024 - self.base
        return False


def _build(shape, backend: str, cuda: bool):
    import torch
    from megatron.core.transformer.transformer_block import TransformerBlock

    from splitllama.config.model import ModelConfig
    from splitllama.config.parallel import ParallelConfig
    from splitllama.model.megatron_config import Numerics, block_config
    from splitllama.model.rope import build_rotary
    from splitllama.model.spec import layer_spec

    model = ModelConfig(lower=shape, upper=shape, num_layers_lower=1, num_layers_upper=1)
    dtype = torch.bfloat16 if cuda else torch.float32
    cfg = block_config(model, "lower", ParallelConfig(), None,
                       Numerics(params_dtype=dtype, bf16=cuda, use_cpu_initialization=not cuda))
    blk = TransformerBlock(cfg, layer_spec("local", backend), post_layer_norm=False, pre_process=True,
                           post_process=False)
    return blk, build_rotary(shape, not cuda), dtype


def _step(blk, rope, x, packed=None, clock=time.perf_counter) -> float:
    """One fwd + bwd in seconds of `clock` (wall, synchronised on CUDA; or on CPU
    time.process_time: CPU seconds of all threads, far less disturbed by other jobs' load)."""
    import torch

    cuda = x.is_cuda
    if cuda:
        torch.cuda.synchronize()
    t0 = clock()
    pos = rope(packed.max_seqlen_q if packed is not None else x.size(0))
    y = blk(x, attention_mask=None, rotary_pos_emb=pos, packed_seq_params=packed)
    y.backward(torch.ones_like(y))
    if cuda:
        torch.cuda.synchronize()
    return clock() - t0


def layer_flops(shape, seq: int) -> float:
    """Cost-model FLOPs of one layer's fwd + bwd at micro-batch 1 (causal attention at half)."""
    from splitllama.config.model import ModelConfig
    from splitllama.pipeline.cost import units_for

    model = ModelConfig(lower=shape, upper=shape, num_layers_lower=1, num_layers_upper=1)
    u = next(u for u in units_for(model, seq, 1) if u.name == "lower.0")
    return u.fwd_flops + u.bwd_flops


def part_layer(shapes: dict, seqs: list[int], backends: list[str], reps: int, warmup: int, cuda: bool,
               clock=time.perf_counter) -> list:
    import torch

    rows = []
    dev = "cuda" if cuda else "cpu"
    for name, shape in shapes.items():
        blocks = {b: _build(shape, b, cuda) for b in backends}
        for seq in seqs:
            times = {b: [] for b in backends}
            peaks = {b: [] for b in backends}
            for rep in range(warmup + reps):
                for b in backends:  # interleaved
                    blk, rope, dtype = blocks[b]
                    x = torch.randn(seq, 1, shape.hidden_size, device=dev, dtype=dtype, requires_grad=True)
                    with _Peak(cuda) as pk:
                        t = _step(blk, rope, x, clock=clock)
                    del x
                    blk.zero_grad(set_to_none=True)
                    if rep >= warmup:
                        times[b].append(t)
                        peaks[b].append(pk.peak)
            for b in backends:
                t = statistics.median(times[b])
                row = {"shape": name, "seq": seq, "backend": b, "median_s": t, "times_s": times[b],
                       "peak_bytes": statistics.median(peaks[b]), "peaks_bytes": peaks[b]}
                if cuda:
                    row["tflops"] = layer_flops(shape, seq) / t / 1e12
                    row["mfu"] = row["tflops"] / PEAK_BF16_TFLOPS
                rows.append(row)
                print(_fmt_layer(row), flush=True)
    return rows


def length_mix(n: int, max_len: int, seed: int = 0) -> list[int]:
    """Chat-like document lengths: lognormal around ~300 tokens, clipped to [16, max_len]."""
    import numpy

    rng = numpy.random.default_rng(seed)
    return [int(v) for v in numpy.clip(rng.lognormal(numpy.log(300), 1.0, n), 16, max_len)]


def part_mix(shape, lengths: list[int], pack_length: int, batch: int, reps: int, cuda: bool,
             clock=time.perf_counter) -> dict:
    import torch

    from splitllama.data.packing import greedy_pack, packed_seq_params

    dev = "cuda" if cuda else "cpu"
    blk, rope, dtype = _build(shape, "sdpa", cuda)
    h, real = shape.hidden_size, sum(lengths)
    packs = greedy_pack(lengths, pack_length)

    def run_packed(static: bool):
        t = 0.0
        for p in packs:
            cu = [0]
            for i in p:
                cu.append(cu[-1] + min(lengths[i], pack_length))
            if static and cu[-1] < pack_length:
                cu.append(pack_length)  # static shape: the tail is one padding segment
            x = torch.randn(cu[-1], 1, h, device=dev, dtype=dtype, requires_grad=True)
            t += _step(blk, rope, x, packed_seq_params(torch.tensor(cu, dtype=torch.int32, device=dev)), clock)
        return t

    def run_padded(to_max: bool):
        t = 0.0
        for i in range(0, len(lengths), batch):
            group = lengths[i:i + batch]
            s = pack_length if to_max else max(group)
            x = torch.randn(s, len(group), h, device=dev, dtype=dtype, requires_grad=True)
            t += _step(blk, rope, x, clock=clock)
        return t

    ways = {"packed": lambda: run_packed(True), "packed_variable_length": lambda: run_packed(False),
            "padded_to_batch_max": lambda: run_padded(False),
            "padded_to_pack_length": lambda: run_padded(True)}
    times = {k: [] for k in ways}
    for rep in range(reps + 1):  # the first round warms up
        for k, fn in ways.items():
            t = fn()
            blk.zero_grad(set_to_none=True)
            if rep:
                times[k].append(t)
    out = {"documents": len(lengths), "real_tokens": real, "pack_length": pack_length,
           "micro_batch_padded": batch, "packs": len(packs),
           "pack_fill": real / (len(packs) * pack_length),
           "padded_batch_max_fill": real / sum(max(lengths[i:i + batch]) * len(lengths[i:i + batch])
                                               for i in range(0, len(lengths), batch)),
           "lengths": {"min": min(lengths), "median": int(statistics.median(lengths)), "max": max(lengths)}}
    for k in ways:
        out[k] = {"median_s": statistics.median(times[k]), "times_s": times[k],
                  "real_tokens_per_s": real / statistics.median(times[k])}
    out["packed_vs_padded_batch_max"] = out["packed"]["real_tokens_per_s"] / out["padded_to_batch_max"]["real_tokens_per_s"]
    out["static_pack_cost"] = out["packed"]["median_s"] / out["packed_variable_length"]["median_s"] - 1
    out["packed_vs_padded_pack_length"] = out["packed"]["real_tokens_per_s"] / out["padded_to_pack_length"]["real_tokens_per_s"]
    return out


def _fmt_layer(r: dict) -> str:
    s = f"{r['shape']:>6} seq {r['seq']:>5} {r['backend']:>5}: {r['median_s']:.3f} s, peak {r['peak_bytes'] / 2**20:8.1f} MiB"
    if "tflops" in r:
        s += f", {r['tflops']:.0f} TFLOP/s, MFU {100 * r['mfu']:.1f} %"
    return s


def table(rows: list, mix: dict | None) -> str:
    lines = ["| shape | seq | local time | sdpa time | sdpa/local time | local peak | sdpa peak | sdpa/local peak |",
             "|---|---|---|---|---|---|---|---|"]
    by = {(r["shape"], r["seq"], r["backend"]): r for r in rows}
    for (shape, seq) in dict.fromkeys((r["shape"], r["seq"]) for r in rows):
        lo, sd = by.get((shape, seq, "local")), by.get((shape, seq, "sdpa"))
        if not (lo and sd):
            continue
        lines.append(f"| {shape} | {seq} | {lo['median_s']:.3f} s | {sd['median_s']:.3f} s | "
                     f"{sd['median_s'] / lo['median_s']:.2f}× | {lo['peak_bytes'] / 2**20:.0f} MiB | "
                     f"{sd['peak_bytes'] / 2**20:.0f} MiB | {sd['peak_bytes'] / lo['peak_bytes']:.3f}× |")
    if mix:
        lines += ["", f"length mix: {mix['documents']} documents, {mix['real_tokens']} real tokens "
                  f"(min {mix['lengths']['min']}, median {mix['lengths']['median']}, max {mix['lengths']['max']}); "
                  f"{mix['packs']} packs of {mix['pack_length']} (fill {100 * mix['pack_fill']:.1f} %)", "",
                  "| way | time | real tokens/s | packed (static) speed-up |", "|---|---|---|---|"]
        for k in ("packed", "packed_variable_length", "padded_to_batch_max", "padded_to_pack_length"):
            m = mix[k]
            sp = mix["packed"]["real_tokens_per_s"] / m["real_tokens_per_s"]
            lines.append(f"| {k} | {m['median_s']:.2f} s | {m['real_tokens_per_s']:.0f} | {sp:.2f}× |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--shapes", choices=("scaled", "real"), default=None,
                    help="default: scaled on cpu, real on cuda")
    ap.add_argument("--seqs", default=None, help="comma-separated (default 1024,2048,4096; cuda 4096,8192)")
    ap.add_argument("--backends", default="local,sdpa")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--parts", default="layer,mix", help="layer,mix; one part alone keeps the other from --out")
    ap.add_argument("--mix-docs", type=int, default=64)
    ap.add_argument("--pack-length", type=int, default=2048)
    ap.add_argument("--mix-batch", type=int, default=4)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--cpu-time", action="store_true",
                    help="on CPU time steps in process CPU seconds (robust to other jobs' load)")
    ap.add_argument("--out", default=None, help="JSON path (default benchmarks/results/attention[_cuda].json)")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    cuda = a.device == "cuda"
    if not cuda and not a.child:  # fixed mmap threshold: freed big buffers leave RSS (peak measure)
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "PYTHONPATH": REPO}
        return subprocess.call([sys.executable, os.path.abspath(__file__), *(argv or sys.argv[1:]), "--child"],
                               env=env, cwd=REPO)
    import warnings

    warnings.filterwarnings("ignore")
    import torch

    if cuda:
        os.environ["SPLITLLAMA_DEVICE"] = "cuda"
    else:
        os.environ["SPLITLLAMA_DEVICE"] = "cpu"
    if a.threads:
        torch.set_num_threads(a.threads)
    clock = time.process_time if a.cpu_time and not cuda else time.perf_counter
    from splitllama.config.parallel import ParallelConfig
    from splitllama.platform.dist import init_distributed, shutdown

    init_distributed(ParallelConfig(), seed=1234)
    shapes = _shapes(a.shapes or ("real" if cuda else "scaled"))
    seqs = [int(s) for s in (a.seqs or ("4096,8192" if cuda else "1024,2048,4096")).split(",")]
    parts = a.parts.split(",")
    rows = part_layer(shapes, seqs, a.backends.split(","), a.reps, a.warmup, cuda, clock) if "layer" in parts else []
    mix = None
    if "mix" in parts:
        shape = next(iter(shapes.values()))
        mix = part_mix(shape, length_mix(a.mix_docs, a.pack_length), a.pack_length, a.mix_batch, a.reps,
                       cuda, clock)
    out = a.out or os.path.join(REPO, "benchmarks", "results", f"attention{'_cuda' if cuda else ''}.json")
    kept = {}
    if os.path.exists(out) and set(parts) != {"layer", "mix"}:  # re-run one part, keep the other
        with open(out) as f:
            old = json.load(f)
        kept = {k: old[k] for k in ("layer", "mix") if k not in parts and old.get(k)}
        kept.update({f"{k}_run": old.get(f"{k}_run") or {x: old.get(x) for x in ("date", "loadavg", "args")}
                     for k in kept})
        rows, mix = kept.get("layer", rows), kept.get("mix", mix)
    print(table(rows, mix), flush=True)
    result = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "device": torch.cuda.get_device_name() if cuda else platform.processor() or platform.machine(),
              "torch": torch.__version__, "threads": torch.get_num_threads(), "loadavg": os.getloadavg(),
              "args": vars(a), **kept, "layer": rows, "mix": mix}
    write_result(result, out, indent=1)
    shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
