"""Runs in any venv with torch + transformers (main, vLLM, veRL); loads a SplitLlama export and its critic by their
remote code only (no splitllama import) and writes their outputs.

    python hf_worker.py LM_DIR CRITIC_DIR INPUTS.safetensors OUT.safetensors
INPUTS: ``ids`` [B, T] (a batch), ``packed_ids`` / ``packed_pos`` [1, n] (documents packed, positions restarting).
OUT: ``logits``, ``values`` (the batch), ``packed_logits``, ``packed_values``; metadata ``transformers``.
"""
from __future__ import annotations

import sys


def main(lm_dir: str, critic_dir: str, inputs: str, out: str) -> None:
    import torch
    import transformers
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM, AutoModelForTokenClassification

    x = load_file(inputs)
    lm = AutoModelForCausalLM.from_pretrained(lm_dir, trust_remote_code=True, dtype=torch.float32).eval()
    critic = AutoModelForTokenClassification.from_pretrained(critic_dir, trust_remote_code=True,
                                                             dtype=torch.float32).eval()
    packed = {"input_ids": x["packed_ids"], "position_ids": x["packed_pos"], "attention_mask": None,
              "use_cache": False}
    with torch.no_grad():
        res = {"logits": lm(input_ids=x["ids"], use_cache=False).logits, "values": critic(input_ids=x["ids"]).logits,
               "packed_logits": lm(**packed).logits, "packed_values": critic(**packed).logits}
    save_file({k: v.contiguous() for k, v in res.items()}, out, metadata={"transformers": transformers.__version__})


if __name__ == "__main__":
    main(*sys.argv[1:5])
