"""Runs in the veRL-Megatron venv (verl 0.9.1, mbridge 0.15.1, megatron-core 0.16.1, transformers
5.10) under torchrun (gloo, SplitLlama's CPU harness): the pieces of `SplitLlamaBridge` that veRL's
Megatron engine calls, at PP = world size:
- `mbridge.AutoBridge.from_config(AutoConfig of the export)` resolves SplitLlamaBridge; its config;
- the model provider (with veRL's `make_value_model` hook for the critic), `load_weights(export)`;
- a forward on veRL's packed input (one row, position ids restarting per sequence) -> logits or values;
- `export_weights` (= stream_hf_weights) on every rank.
Writes OUT/rank{r}.safetensors (out: logits/values of the last stage; w.<name>: streamed tensors).

Usage: torchrun --nproc-per-node P stream_mbridge_worker.py EXPORT_DIR OUT_DIR TOKENS.safetensors CRITIC(0|1)
"""
from __future__ import annotations

import sys

import torch
import torch.distributed as dist


def main(export: str, out: str, tokens_file: str, critic: bool) -> None:
    from megatron.core import parallel_state as ps
    from safetensors.torch import load_file, save_file
    from transformers import AutoConfig

    from splitllama.config.parallel import ParallelConfig
    from splitllama.platform.dist import init_distributed

    world = int(__import__("os").environ["WORLD_SIZE"])
    init_distributed(ParallelConfig(pipeline_model_parallel_size=world))
    import mbridge
    from verl.models.mcore.mbridge import make_value_model

    import splitllama.rl.mbridge_bridge as sb

    hf_config = AutoConfig.from_pretrained(export, trust_remote_code=True)
    bridge = mbridge.AutoBridge.from_config(hf_config, dtype=torch.float32)
    assert type(bridge) is sb.SplitLlamaBridge, type(bridge)
    assert bridge.config.hidden_size == bridge.model_cfg.upper.hidden_size
    assert bridge.config.pipeline_model_parallel_size == world
    pre, post = ps.is_pipeline_first_stage(), ps.is_pipeline_last_stage()
    model = bridge._model_provider([make_value_model] if critic else [])(pre, post).eval()
    bridge.load_weights([model], export)

    toks = load_file(tokens_file)
    ids, pos = toks["input_ids"], toks["position_ids"]  # veRL's remove-padding form: (1, nnz)
    from megatron.core.packed_seq_params import PackedSeqParams

    cu = toks["cu_seqlens"].to(torch.int32)  # veRL's Megatron engine: THD PackedSeqParams
    mx = int((cu[1:] - cu[:-1]).max())
    psp = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=mx, max_seqlen_kv=mx)
    with torch.no_grad():
        if pre:
            y = model(ids, position_ids=pos, packed_seq_params=psp)
        else:
            buf = torch.empty(ids.shape[1], 1, model.input_hidden_size())
            dist.recv(buf, ps.get_pipeline_model_parallel_prev_rank())
            model.set_input_tensor(buf)
            y = model(None, position_ids=pos, packed_seq_params=psp)
        if not post:
            dist.send(y.contiguous(), ps.get_pipeline_model_parallel_next_rank())
    tensors = {f"w.{n}": t.clone() for n, t in bridge.export_weights([model])}
    if post:
        tensors["out"] = y
    save_file(tensors, f"{out}/rank{dist.get_rank()}.safetensors")
    dist.barrier()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4] == "1")
