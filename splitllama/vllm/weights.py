"""Export (HF) tensor names: their vLLM parameter names, their shapes, their vLLM modules (pure, no vLLM import)."""

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


# ---- the export's tensor names and shapes (the names vLLM's loader and a rollout weight sync accept) ----

_ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
_MLP = ("gate_proj", "up_proj", "down_proj")


def _block_shapes(prefix: str, cfg: dict, count: int) -> dict[str, tuple[int, ...]]:
    h, inter = int(cfg["hidden_size"]), int(cfg["intermediate_size"])
    heads = int(cfg["num_attention_heads"])
    kv = int(cfg.get("num_key_value_heads") or heads)
    hd = int(cfg.get("head_dim") or h // heads)
    per_layer = {"input_layernorm.weight": (h,), "post_attention_layernorm.weight": (h,),
                 "self_attn.q_proj.weight": (heads * hd, h), "self_attn.k_proj.weight": (kv * hd, h),
                 "self_attn.v_proj.weight": (kv * hd, h), "self_attn.o_proj.weight": (h, heads * hd),
                 "mlp.gate_proj.weight": (inter, h), "mlp.up_proj.weight": (inter, h),
                 "mlp.down_proj.weight": (h, inter)}
    return {f"{prefix}{i}.{k}": v for i in range(count) for k, v in per_layer.items()}


def export_shapes(hf_config) -> dict[str, tuple[int, ...]]:
    """Every tensor name of a ``CustomSplitLLamaForCausalLM`` export (as in its safetensors) -> its full shape.

    Derived from the config alone (``config8b`` / ``config70b`` block dicts, ``num_layers_8`` / ``num_layers_70``,
    ``mlp``, ``vocab_size``), so a driver process can check a weight sync before anything reaches the engine.
    """
    lower, upper = dict(hf_config.config8b), dict(hf_config.config70b)
    h_lo, h_up, vocab = int(lower["hidden_size"]), int(upper["hidden_size"]), int(hf_config.vocab_size)
    shapes = {"model.embed_tokens.weight": (vocab, h_lo), "model.norm.weight": (h_up,),
              "lm_head.weight": (vocab, h_up)}
    if hf_config.mlp:
        shapes.update({"model.adapter_linear_1.weight": (h_up, h_lo), "model.adapter_linear_2.weight": (h_up, h_up)})
    else:
        shapes["model.adapter.weight"] = (h_up, h_lo)
    shapes.update(_block_shapes(_LOWER, lower, int(hf_config.num_layers_8)))
    shapes.update(_block_shapes(_UPPER, upper, int(hf_config.num_layers_70)))
    return shapes


def vllm_module_of(hf_name: str) -> str:
    """The vLLM module an export tensor is loaded into (q/k/v -> ``qkv_proj``, gate/up -> ``gate_up_proj``).

    vLLM reloads a module's weights only once all of them arrived in the same reload call (see
    :mod:`splitllama.vllm.sync`), so a sync groups tensors by this key.
    """
    for hf_part, fused, _ in STACKED_PARAMS:
        if hf_part in hf_name:
            return hf_name.replace(hf_part, fused).rpartition(".")[0]
    return hf_name.rpartition(".")[0]


class UnknownWeightError(ValueError):
    """Tensor names (or shapes) that are not the export's: nothing of the offending set was applied."""


def check_export_names(named_shapes: dict[str, tuple[int, ...]], expected: dict[str, tuple[int, ...]]) -> None:
    """Raise :class:`UnknownWeightError` naming every unknown name and every shape that differs from the export's."""
    unknown = sorted(n for n in named_shapes if n not in expected)
    wrong = sorted(f"{n} {list(s)} (export: {list(expected[n])})" for n, s in named_shapes.items()
                   if n in expected and tuple(s) != tuple(expected[n]))
    if not unknown and not wrong:
        return
    parts = []
    if unknown:
        hint = ""
        if any("_fsdp_wrapped_module" in n or n.startswith(("module.", "_orig_mod.")) for n in unknown):
            hint = " (wrapper prefixes such as '_fsdp_wrapped_module.' must be stripped: send the HF export names)"
        shown = ", ".join(unknown[:8]) + (f", ... ({len(unknown)} in all)" if len(unknown) > 8 else "")
        parts.append(f"{len(unknown)} name(s) not in the export: {shown}{hint}")
    if wrong:
        parts.append("shape differs: " + ", ".join(wrong[:8]) + (f", ... ({len(wrong)} in all)" if len(wrong) > 8 else ""))
    raise UnknownWeightError("; ".join(parts))
