"""Peak extra memory of `stream_hf_weights` per rank, at TP=2 x PP=2 (4 gloo processes on CPU).

    PYTHONPATH=. torchrun --nproc-per-node 4 benchmarks/stream_memory.py [--vocab 32000] [--bucket-mb 4]

A randomly initialised SplitLlama (lower hidden 512 x 2 layers, upper 1024 x 2 layers, mlp
adapter, fp32; the LM head 32000 x 1024 = 131 MB is the largest tensor) is streamed once; the
consumer only reads each tensor (a checksum) and drops it. Per rank: the stream's own byte
accounting (`StreamStats.peak_bytes`: full-tensor buffer, scratch, q/k/v split copies) and the
process's resident-set growth (VmHWM after the stream minus VmRSS before; VmHWM reset with
/proc/self/clear_refs first), both against the bound largest tensor + bucket. Prints a table,
writes benchmarks/results/stream_memory.json.
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path


def _status(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--bucket-mb", type=float, default=4.0)
    args = ap.parse_args()
    import torch
    import torch.distributed as dist

    from splitllama.config.model import ModelConfig
    from splitllama.config.parallel import ParallelConfig
    from splitllama.convert.stream import StreamStats, stream_hf_weights
    from splitllama.hf.configuration_splitllama import tiny_llama_configs
    from splitllama.model.build import build_model
    from splitllama.model.megatron_config import Numerics
    from splitllama.pipeline.layout import PipelineLayout
    from splitllama.platform.dist import init_distributed, shutdown

    parallel = ParallelConfig(tensor_model_parallel_size=2, pipeline_model_parallel_size=2)
    init_distributed(parallel)
    lo, up = tiny_llama_configs()
    lo.update(vocab_size=args.vocab, hidden_size=512, intermediate_size=1536, num_attention_heads=8,
              num_key_value_heads=2, head_dim=64, num_hidden_layers=2)
    up.update(vocab_size=args.vocab, hidden_size=1024, intermediate_size=3072, num_attention_heads=16,
              num_key_value_heads=2, head_dim=64, num_hidden_layers=2)
    cfg = ModelConfig(lower=lo, upper=up, num_layers_lower=2, num_layers_upper=2, mlp=True)
    cfg.transformer_impl = "local"
    layout = PipelineLayout.parse("L2,A|U2")
    model = build_model(cfg, parallel, Numerics(use_cpu_initialization=True), layout).model.eval()
    bucket = int(args.bucket_mb * 2 ** 20)
    row = {"rank": dist.get_rank(), "bucket_bytes": bucket}
    for p in range(2):  # pass 0 also pays one-time costs (first collectives, lazy imports); pass 1 is steady
        dist.barrier()
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
        rss0 = _status("VmRSS")
        stats = StreamStats()
        t0 = time.perf_counter()
        total = 0.0
        for _, t in stream_hf_weights([model], bucket_bytes=bucket, stats=stats):
            total += float(t.sum())  # read it, then drop it
        row.update({f"pass{p}_seconds": time.perf_counter() - t0, f"pass{p}_rss_growth_bytes": _status("VmHWM") - rss0,
                    f"pass{p}_stream_peak_bytes": stats.peak_bytes})
    row.update({"largest_tensor_bytes": stats.largest_tensor_bytes, "bound_bytes": stats.largest_tensor_bytes + bucket,
                "bytes_streamed": stats.bytes_yielded, "tensors": stats.tensors})
    rows = [None] * dist.get_world_size()
    dist.all_gather_object(rows, row)
    if dist.get_rank() == 0:
        mb = 2 ** 20
        print(f"model: {stats.bytes_yielded / mb:.1f} MiB in {stats.tensors} tensors; largest tensor "
              f"{stats.largest_tensor_bytes / mb:.1f} MiB; bucket {bucket / mb:.1f} MiB; TP=2 x PP=2")
        print(f"{'rank':>4} {'stream peak MiB':>16} {'RSS growth MiB (1st pass)':>26} {'RSS growth MiB (2nd)':>21} "
              f"{'bound MiB':>10} {'s (2nd)':>8}")
        for r in rows:
            print(f"{r['rank']:>4} {r['pass1_stream_peak_bytes'] / mb:>16.1f} {r['pass0_rss_growth_bytes'] / mb:>26.1f} "
                  f"{r['pass1_rss_growth_bytes'] / mb:>21.1f} {r['bound_bytes'] / mb:>10.1f} {r['pass1_seconds']:>8.1f}")
        out = Path(__file__).resolve().parent / "results" / "stream_memory.json"
        out.write_text(json.dumps({"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "args": vars(args),
                                   "ranks": rows}, indent=2) + "\n")
    shutdown()


if __name__ == "__main__":
    main()
