"""Worker for tests/distributed/test_stream.py: for each case, builds SplitLlamaModel at
(TP, PP, layout) on a 4-process gloo world (the rest is DP), loads a torch_dist checkpoint,
runs `stream_hf_weights` and saves, on EVERY rank, what it yielded (names in order, tensors,
the stream's byte accounting) for the test to compare with the one-process `export-hf`.

Usage: torchrun --nproc-per-node 4 stream_worker.py SPEC.json
SPEC: {"cases": [{"name", "ckpt", "tp", "pp", "layout", "bucket_bytes", "out_dir"}]}
"""
from __future__ import annotations

import json
import sys

import torch
import torch.distributed as dist


def run_case(case: dict) -> None:
    from megatron.core import parallel_state as ps
    from safetensors.torch import save_file

    from splitllama.checkpoint import dirs
    from splitllama.checkpoint.model_io import load_model_weights
    from splitllama.config.model import ModelConfig
    from splitllama.config.parallel import ParallelConfig
    from splitllama.convert.stream import StreamStats, stream_hf_weights
    from splitllama.model.build import build_model
    from splitllama.model.megatron_config import Numerics
    from splitllama.pipeline.layout import PipelineLayout
    from splitllama.platform.dist import init_distributed

    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    tp, pp = case["tp"], case["pp"]
    parallel = ParallelConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)
    init_distributed(parallel)
    cfg = ModelConfig(**dirs.read_json(dirs.resolve(case["ckpt"]), dirs.MODEL_CONFIG))
    cfg.transformer_impl = "local"
    dtype = getattr(torch, case.get("dtype", "float32"))
    plan = PipelineLayout.parse(case["layout"]) if case.get("layout") else None
    model = build_model(cfg, parallel, Numerics(params_dtype=dtype, bf16=dtype == torch.bfloat16,
                                                use_cpu_initialization=True), plan).model.eval()
    load_model_weights(model, case["ckpt"], strict="raise_all")
    stats = StreamStats()
    names, tensors = [], {}
    for name, t in stream_hf_weights([model], bucket_bytes=case["bucket_bytes"], stats=stats):
        names.append(name)
        tensors[name] = t.clone()
    rank = dist.get_rank()
    save_file(tensors, f"{case['out_dir']}/rank{rank}.safetensors")
    with open(f"{case['out_dir']}/rank{rank}.json", "w") as f:
        json.dump({"names": names, "peak_bytes": stats.peak_bytes, "tensors": stats.tensors,
                   "largest_tensor_bytes": stats.largest_tensor_bytes, "bytes_yielded": stats.bytes_yielded,
                   "live_bytes_after": stats.live_bytes, "tp_rank": ps.get_tensor_model_parallel_rank(),
                   "pp_rank": ps.get_pipeline_model_parallel_rank(), "dp_rank": ps.get_data_parallel_rank()}, f)
    dist.barrier()


def main() -> None:
    with open(sys.argv[1]) as f:
        spec = json.load(f)
    for case in spec["cases"]:
        run_case(case)


if __name__ == "__main__":
    main()
