"""Worker for the parity tests: runs under torchrun, builds SplitLlamaModel at the given TP,
loads HF split weights through the mapping table, and writes logits / per-token loss /
gradients (un-sharded, HF names) for the test to compare with transformers.

Usage: torchrun --nproc-per-node TP parity_worker.py SPEC.json
SPEC: {"tp": 2, "cases": [{"name", "hf_dir", "tokens", "out", "sp": bool, "prototype": bool,
                           "untag_value_bias": bool, "backend": "local" | "sdpa"}]}
A critic export (CustomSplitLLamaForTokenClassification) runs the value head: its targets are
the "values" tensor of the tokens file and its "logits" are the per-token values [b, s].
"""
from __future__ import annotations

import json
import sys

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file


def prototype_shard(e, full, tp, rank):
    """The original prototype's bug (docs/design.md §4, trap 1): q/k/v and gate/up concatenated, then
    chunked — wrong weights on every rank at TP > 1."""
    from splitllama.convert.mapping import QKV, GatedFC1

    if tp > 1 and isinstance(e, QKV):
        return torch.cat(e.split(full), dim=0).chunk(tp, dim=0)[rank].clone()
    if tp > 1 and isinstance(e, GatedFC1):
        return full.chunk(tp, dim=0)[rank].clone()
    return e.shard(full, tp, rank)


def run_case(case: dict, tp: int) -> None:
    from megatron.core import parallel_state as ps

    from splitllama.config.model import ModelConfig
    from splitllama.config.parallel import ParallelConfig
    from splitllama.convert.live import global_name, load_full_weights
    from splitllama.convert.mapping import hf_to_mcore, mappings, mcore_to_hf
    from splitllama.model.build import build_model
    from splitllama.model.megatron_config import Numerics

    with open(f"{case['hf_dir']}/config.json") as f:
        cfg = ModelConfig.from_seed_dict(json.load(f))
    cfg.transformer_impl = "local"
    cfg.attention_backend = case.get("backend", "local")
    parallel = ParallelConfig(tensor_model_parallel_size=tp, sequence_parallel=case.get("sp", False))
    built = build_model(cfg, parallel, Numerics(use_cpu_initialization=True))
    model = built.model
    core = type(model.lower.layers[0].self_attention.core_attention).__name__
    assert core == {"local": "DotProductAttention", "sdpa": "SDPAttention"}[cfg.attention_backend], core
    full = hf_to_mcore(load_file(f"{case['hf_dir']}/model.safetensors"), cfg)
    rank = ps.get_tensor_model_parallel_rank()
    load_full_weights(model, full, cfg, built.layout, 0, tp, rank,
                      shard=prototype_shard if case.get("prototype") else None)

    critic = cfg.head == "value"
    data = load_file(case["tokens"])
    tokens = data["tokens"]
    inputs = tokens[:, :-1].contiguous()
    labels = data["values"].contiguous() if critic else tokens[:, 1:].contiguous()
    if case.get("untag_value_bias"):  # veRL's LinearForLastLayer tags the weight only
        model.output_layer.bias.sequence_parallel = False
    loss = model(inputs, labels=labels)  # [b, s]
    loss.mean().backward()
    with torch.no_grad():
        logits = model(inputs)  # [b, s, V/tp]; critic: values [b, s]
    group = ps.get_tensor_model_parallel_group()

    def gather(t: torch.Tensor) -> list[torch.Tensor]:
        parts = [torch.empty_like(t) for _ in range(tp)]
        dist.all_gather(parts, t.contiguous(), group=group)
        return parts

    full_logits = logits if critic else torch.cat(gather(logits), dim=-1)
    by_name = {e.mcore: e for e in mappings(cfg)}
    grads, replicated_diff = {}, 0.0  # largest difference of a replicated grad between TP ranks
    for local, p in model.named_parameters():
        g = p.grad.detach().clone()
        if getattr(p, "sequence_parallel", False):  # what finalize_model_grads does under SP
            dist.all_reduce(g, group=group)
        name = global_name(local, built.layout, 0)
        shards = gather(g)
        if by_name[name].tp_axis is None:
            replicated_diff = max([replicated_diff] + [(s - shards[0]).abs().max().item() for s in shards])
        grads[name] = by_name[name].unshard(shards)
    hf_grads = mcore_to_hf(grads, cfg)
    if dist.get_rank() == 0:
        out = {"logits": full_logits, "loss": loss.detach(), "replicated_grad_diff": torch.tensor(replicated_diff)}
        out.update({f"grad.{k}": v.contiguous() for k, v in hf_grads.items()})
        save_file(out, case["out"])


def main() -> None:
    from splitllama.config.parallel import ParallelConfig
    from splitllama.platform.dist import init_distributed

    with open(sys.argv[1]) as f:
        spec = json.load(f)
    init_distributed(ParallelConfig(tensor_model_parallel_size=spec["tp"]))
    for case in spec["cases"]:
        run_case(case, spec["tp"])
    dist.barrier()


if __name__ == "__main__":
    main()
