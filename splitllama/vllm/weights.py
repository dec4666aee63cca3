"""Export (HF) tensor names -> vLLM parameter names of :mod:`splitllama.vllm.model` (pure, no vLLM import)."""

from __future__ import annotations

# (HF sub-name, vLLM fused parameter sub-name, shard id), as vLLM's LLaMA stacks q/k/v and gate/up.
STACKED_PARAMS: tuple[tuple[str, str, str | int], ...] = (
    (".q_proj.", ".qkv_proj.", "q"),
    (".k_proj.", ".qkv_proj.", "k"),
    (".v_proj.", ".qkv_proj.", "v"),
    (".gate_proj.", ".gate_up_proj.", 0),
    (".up_proj.", ".gate_up_proj.", 1),
)

_LOWER, _UPPER = "model.layers_first.", "model.layers_last."


def vllm_weight_name(hf_name: str, num_lower: int) -> str:
    """``model.layers_first.{i}.X`` -> ``model.layers.{i}.X``; ``model.layers_last.{j}.X`` -> ``model.layers.{N+j}.X``.

    The adapter (``model.adapter*``), embedding, norm and ``lm_head`` keep their names. Fused q/k/v and
    gate/up are handled by the loader with :data:`STACKED_PARAMS`.
    """
    for head, offset in ((_LOWER, 0), (_UPPER, num_lower)):
        if hf_name.startswith(head):
            index, _, rest = hf_name[len(head):].partition(".")
            return f"model.layers.{int(index) + offset}.{rest}"
    return hf_name
