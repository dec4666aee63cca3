"""Worker for the conversion tests: for each case, builds SplitLlamaModel at (TP, PP, layout),
loads an `import-hf` checkpoint with `load_model_weights` under strict checking, runs a
forward pass (manual p2p between the two stages when PP=2) and writes the full-vocab logits
(a critic checkpoint, model.head=value: the per-token values [b, s]).
A case may also re-save the loaded model with `dist_checkpointing.save` (the training app's
way), in the SplitLlama checkpoint layout, so the test can compare and export it.

Usage: torchrun --nproc-per-node W convert_worker.py SPEC.json
SPEC: {"tokens": path, "cases": [{"name", "ckpt", "tp", "pp", "layout", "out", "save"?}]}

Also holds the tiny source-model builder shared by the convert tests (no torch.distributed).
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

N, M, SEED = 2, 3, 3  # layers kept from lower / upper; random adapter seed


def make_sources(root: Path):
    """Tiny random lower / upper LLaMAs saved as HF dirs with several shards + index."""
    from splitllama.hf.build import tiny_llama_configs, tiny_llama_from_config

    lo_cfg, up_cfg = tiny_llama_configs()
    lower, upper = tiny_llama_from_config(lo_cfg, seed=0), tiny_llama_from_config(up_cfg, seed=1)
    lower.save_pretrained(root / "lower", max_shard_size="100KB")
    upper.save_pretrained(root / "upper", max_shard_size="200KB")
    return lower, upper


def reference(lower, upper, mlp: bool):
    """The transformers split model built from the same source weights (eager attention)."""
    from splitllama.hf.build import split_from_llamas

    ref = split_from_llamas(lower, upper, N, M, mlp=mlp, adapter_init="random", seed=SEED)
    ref.set_attn_implementation("eager")
    return ref


def _forward(model, tokens: torch.Tensor, pp: int) -> torch.Tensor | None:
    """Logits [b, s, V/tp] on the last stage (None elsewhere)."""
    from megatron.core import parallel_state as ps

    if pp == 1:
        return model(tokens)
    if model.pre_process:
        out = model(tokens)
        dist.send(out.contiguous(), ps.get_pipeline_model_parallel_next_rank())
        return None
    buf = torch.empty(tokens.shape[1], tokens.shape[0], model.input_hidden_size())
    dist.recv(buf, ps.get_pipeline_model_parallel_prev_rank())
    model.set_input_tensor(buf)
    return model(None)


def _save_like_training(model, cfg, root: str) -> None:
    """Save as training does (`model_io.model_sharded_state_dict`) into ROOT/iter_0000000."""
    from megatron.core import dist_checkpointing

    from splitllama.checkpoint import dirs
    from splitllama.checkpoint.model_io import model_sharded_state_dict

    tmp = os.path.join(root, "iter_0000000.tmp")
    if dist.get_rank() == 0:
        os.makedirs(tmp)
    dist.barrier()
    dist_checkpointing.save({"model": model_sharded_state_dict(model)}, tmp)
    dist.barrier()
    if dist.get_rank() == 0:
        dirs.write_json(tmp, dirs.MODEL_CONFIG, cfg.to_dict())
        dirs.finalize(root, tmp, 0)
    dist.barrier()


def load_case_model(case: dict, dtype: torch.dtype = torch.float32):
    """SplitLlamaModel at the case's (TP, PP, layout), filled from its torch_dist checkpoint: (model, its config)."""
    from megatron.core import parallel_state as ps

    from splitllama.checkpoint import dirs
    from splitllama.config.model import ModelConfig
    from splitllama.config.parallel import ParallelConfig
    from splitllama.checkpoint.model_io import load_model_weights
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
    plan = PipelineLayout.parse(case["layout"]) if case.get("layout") else None
    numerics = Numerics(params_dtype=dtype, bf16=dtype == torch.bfloat16, use_cpu_initialization=True)
    model = build_model(cfg, parallel, numerics, plan).model.eval()
    load_model_weights(model, case["ckpt"], strict="raise_all")
    return model, cfg


def run_case(case: dict, tokens: torch.Tensor) -> None:
    from megatron.core import parallel_state as ps

    model, cfg = load_case_model(case)
    tp, pp = case["tp"], case["pp"]
    with torch.no_grad():
        logits = _forward(model, tokens, pp)
    if logits is not None:
        parts = [torch.empty_like(logits) for _ in range(tp)]
        dist.all_gather(parts, logits.contiguous(), group=ps.get_tensor_model_parallel_group())
        if ps.get_tensor_model_parallel_rank() == 0 and ps.get_data_parallel_rank() == 0:
            from safetensors.torch import save_file

            # a critic's values [b, s] are replicated over TP; an LM's logits are vocab shards
            save_file({"logits": parts[0] if cfg.head == "value" else torch.cat(parts, dim=-1)}, case["out"])
    if case.get("save"):
        _save_like_training(model, cfg, case["save"])
    dist.barrier()


def main() -> None:
    from safetensors.torch import load_file

    with open(sys.argv[1]) as f:
        spec = json.load(f)
    tokens = load_file(spec["tokens"])["tokens"]
    for case in spec["cases"]:
        run_case(case, tokens)


if __name__ == "__main__":
    main()
