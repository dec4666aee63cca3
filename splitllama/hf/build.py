"""Build and export HF SplitLlama models (pure functions; no I/O except :func:`save_pretrained_with_code`)."""

from __future__ import annotations

import copy
import json
import math
import os
import shutil
from pathlib import Path
from typing import Literal

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from .configuration_splitllama import CustomSplitLLamaConfig, llama_config_to_dict, tiny_llama_configs
from .modeling_splitllama import CustomSplitLLamaForCausalLM, CustomSplitLLamaForTokenClassification

AdapterInit = Literal["random", "identity"]
ValueHeadInit = Literal["zeros", "normal"]
VALUE_HEAD_INITS = ("zeros", "normal")

AUTO_MAP: dict[str, str] = {
    "AutoConfig": "configuration_splitllama.CustomSplitLLamaConfig",
    "AutoModelForCausalLM": "modeling_splitllama.CustomSplitLLamaForCausalLM",
    # the critic (value model, num_labels=1); an LM export loads here too with a new `score`
    "AutoModelForTokenClassification": "modeling_splitllama.CustomSplitLLamaForTokenClassification",
}
_CODE_FILES = ("configuration_splitllama.py", "modeling_splitllama.py")


def tiny_llama_from_config(config: dict | LlamaConfig, seed: int = 0) -> LlamaForCausalLM:
    """A randomly initialised (deterministic in ``seed``) float32 LlamaForCausalLM, e.g. from tiny_llama_configs()."""
    cfg = config if isinstance(config, LlamaConfig) else LlamaConfig.from_dict(dict(config))
    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg).eval()


def adapter_weights(
    h_lower: int,
    h_upper: int,
    mlp: bool,
    init: AdapterInit = "random",
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
) -> dict[str, torch.Tensor]:
    """Adapter weights keyed by their names under ``model.`` (``adapter.weight`` or ``adapter_linear_{1,2}.weight``).

    ``random``: nn.Linear's default init (uniform in +-1/sqrt(fan_in)) drawn from ``torch.Generator(seed)``.
    ``identity``: the first h_lower coordinates are copied, the rest are zero (needs h_lower <= h_upper); for
    mlp=true linear_2 is the identity too, so the adapter is ``relu`` on the copied coordinates.
    """
    shapes = {"adapter_linear_1.weight": (h_upper, h_lower), "adapter_linear_2.weight": (h_upper, h_upper)}
    if not mlp:
        shapes = {"adapter.weight": (h_upper, h_lower)}
    out: dict[str, torch.Tensor] = {}
    if init == "identity":
        if h_lower > h_upper:
            raise ValueError(f"identity adapter init needs h_lower <= h_upper, got {h_lower} > {h_upper}")
        for name, shape in shapes.items():
            out[name] = torch.eye(*shape, dtype=dtype)
    elif init == "random":
        gen = torch.Generator().manual_seed(seed)
        for name, (rows, cols) in shapes.items():
            bound = 1.0 / math.sqrt(cols)
            out[name] = ((torch.rand(rows, cols, generator=gen, dtype=torch.float64) * 2 - 1) * bound).to(dtype)
    else:
        raise ValueError(f"adapter_init must be 'random' or 'identity', got {init!r}")
    return out


def value_head_weights(
    hidden_size: int, init: ValueHeadInit = "zeros", std: float = 0.02, seed: int = 0, dtype: torch.dtype = torch.float32
) -> dict[str, torch.Tensor]:
    """A new critic's value head, keyed ``score.weight`` [1, hidden] and ``score.bias`` [1].

    ``zeros``: weight and bias 0 — the critic starts out predicting 0 for every token; its first step moves the
    head only (the trunk's gradient is proportional to the head weight). ``normal``: weight ~ N(0, std²) drawn from
    ``torch.Generator(seed)`` (std = Megatron's ``init_method_std``, 0.02), bias 0.
    """
    if init == "zeros":
        weight = torch.zeros(1, hidden_size, dtype=dtype)
    elif init == "normal":
        gen = torch.Generator().manual_seed(seed)
        weight = (torch.randn(1, hidden_size, generator=gen, dtype=torch.float64) * std).to(dtype)
    else:
        raise ValueError(f"value head init must be one of {', '.join(VALUE_HEAD_INITS)}, got {init!r}")
    return {"score.weight": weight, "score.bias": torch.zeros(1, dtype=dtype)}


def critic_from_causal_lm(
    lm: CustomSplitLLamaForCausalLM, init: ValueHeadInit = "zeros", seed: int = 0
) -> CustomSplitLLamaForTokenClassification:
    """A value model (num_labels=1) with copies of ``lm``'s body (everything but ``lm_head``) and a new head
    (:func:`value_head_weights`). ``lm`` is not modified. Returned in eval mode."""
    config = copy.deepcopy(lm.config)
    config.num_labels = 1
    config.architectures = ["CustomSplitLLamaForTokenClassification"]
    sd = {k: v.detach().clone() for k, v in lm.state_dict().items() if k.startswith("model.")}
    embed = sd["model.embed_tokens.weight"]
    head = value_head_weights(config.hidden_size_upper, init, seed=seed, dtype=embed.dtype)
    sd.update({k: v.to(embed.device) for k, v in head.items()})
    with torch.device("meta"):
        model = CustomSplitLLamaForTokenClassification(config)
    model.load_state_dict(sd, strict=True, assign=True)
    model.model.reset_rotary(embed.device)
    return model.eval()


def split_state_dict(
    lower: dict[str, torch.Tensor],
    upper: dict[str, torch.Tensor],
    num_layers_lower: int,
    num_layers_upper: int,
    upper_total_layers: int,
) -> dict[str, torch.Tensor]:
    """Map HF LLaMA state dicts (``model.layers.{i}...`` names) to SplitLlama names, without the adapter.

    Lower ``model.embed_tokens`` and ``model.layers.{i}`` (i < N) -> ``model.layers_first.{i}``; upper
    ``model.layers.{L-M+j}`` -> ``model.layers_last.{j}``, ``model.norm``, ``lm_head``. Tensors are not copied.
    """
    out = {"model.embed_tokens.weight": lower["model.embed_tokens.weight"]}
    first = upper_total_layers - num_layers_upper
    for prefix, src, layer_map in (
        ("model.layers_first", lower, {i: i for i in range(num_layers_lower)}),
        ("model.layers_last", upper, {first + j: j for j in range(num_layers_upper)}),
    ):
        for key, value in src.items():
            parts = key.split(".")
            if key.startswith("model.layers.") and int(parts[2]) in layer_map:
                out[".".join([prefix, str(layer_map[int(parts[2])]), *parts[3:]])] = value
    out["model.norm.weight"] = upper["model.norm.weight"]
    out["lm_head.weight"] = upper["lm_head.weight"]
    return out


def split_from_llamas(
    lower: LlamaForCausalLM,
    upper: LlamaForCausalLM,
    num_layers_lower: int,
    num_layers_upper: int,
    mlp: bool = False,
    adapter_init: AdapterInit = "random",
    seed: int = 0,
) -> CustomSplitLLamaForCausalLM:
    """A new SplitLlama with copies of lower's embedding + first N layers and upper's last M layers, norm, head.

    The inputs are not modified and share no storage with the result. The model is built on the meta device
    and filled by assignment, so no random init of the (possibly large) copied layers happens. Parameters keep
    the dtype of the source tensors; the adapter gets the lower embedding's dtype. Returned in eval mode.
    """
    if lower.config.vocab_size != upper.config.vocab_size:
        raise ValueError(f"vocab sizes differ: {lower.config.vocab_size} vs {upper.config.vocab_size}")
    config = CustomSplitLLamaConfig(
        path8b=lower.config.name_or_path or None,
        path70b=upper.config.name_or_path or None,
        num_layers_8=num_layers_lower,
        num_layers_70=num_layers_upper,
        mlp=mlp,
        config8b=llama_config_to_dict(lower.config),
        config70b=llama_config_to_dict(upper.config),
        attn_implementation=lower.config._attn_implementation,
    )
    sd = split_state_dict(
        lower.state_dict(), upper.state_dict(), num_layers_lower, num_layers_upper, upper.config.num_hidden_layers
    )
    sd = {k: v.detach().clone() for k, v in sd.items()}
    embed = sd["model.embed_tokens.weight"]
    adapter = adapter_weights(
        config.hidden_size_lower, config.hidden_size_upper, mlp, adapter_init, seed, dtype=embed.dtype
    )
    sd.update({f"model.{k}": v.to(embed.device) for k, v in adapter.items()})
    with torch.device("meta"):
        model = CustomSplitLLamaForCausalLM(config)
    model.load_state_dict(sd, strict=True, assign=True)
    model.model.reset_rotary(embed.device)
    model.config.dtype = embed.dtype
    return model.eval()


def save_pretrained_with_code(
    model: CustomSplitLLamaForCausalLM | CustomSplitLLamaForTokenClassification, save_directory: str | os.PathLike
) -> Path:
    """``model.save_pretrained`` plus the two code files and ``auto_map`` in config.json.

    The directory then loads with ``AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)`` (a
    critic: ``AutoModelForTokenClassification``) without ``splitllama`` being importable.
    """
    arch = [type(model).__name__]
    out = Path(save_directory)
    out.mkdir(parents=True, exist_ok=True)
    model.config.auto_map = dict(AUTO_MAP)
    model.save_pretrained(out)
    here = Path(__file__).resolve().parent
    for name in _CODE_FILES:
        shutil.copyfile(here / name, out / name)
    config_path = out / "config.json"
    data = json.loads(config_path.read_text())
    if data.get("auto_map") != AUTO_MAP or data.get("architectures") != arch:
        data["auto_map"] = dict(AUTO_MAP)
        data["architectures"] = arch
        config_path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    return out


__all__ = [
    "AUTO_MAP",
    "adapter_weights",
    "critic_from_causal_lm",
    "save_pretrained_with_code",
    "split_from_llamas",
    "split_state_dict",
    "tiny_llama_configs",
    "tiny_llama_from_config",
    "value_head_weights",
]
