"""The export -> vLLM tensor-name map of splitllama/vllm (pure; no vLLM needed)."""
from __future__ import annotations

import re

import pytest

from splitllama.hf.build import split_from_llamas, tiny_llama_configs, tiny_llama_from_config
from splitllama.vllm.weights import STACKED_PARAMS, vllm_weight_name


@pytest.mark.parametrize("mlp", [False, True])
def test_every_export_tensor_maps_to_one_global_layer_index(mlp):
    lo, up = tiny_llama_configs()
    n, m = 2, 3
    model = split_from_llamas(tiny_llama_from_config(lo, 0), tiny_llama_from_config(up, 1), n, m, mlp=mlp)
    names = list(model.state_dict())
    mapped = [vllm_weight_name(k, n) for k in names]
    assert len(set(mapped)) == len(names)
    layers = {}
    for hf, v in zip(names, mapped):
        ints = [int(x) for x in v.split(".") if x.isdigit()]
        if hf.startswith(("model.layers_first.", "model.layers_last.")):
            assert v.startswith("model.layers.") and len(ints) == 1, v  # vLLM binds KV caches by this integer
            layers.setdefault(ints[0], set()).add(hf.split(".")[1])
        else:
            assert v == hf and not ints, v
    # lower layers 0..N-1, upper layers N..N+M-1, each index from exactly one block
    assert layers == {**{i: {"layers_first"} for i in range(n)}, **{n + j: {"layers_last"} for j in range(m)}}
    assert vllm_weight_name("model.layers_last.0.self_attn.q_proj.weight", n) == "model.layers.2.self_attn.q_proj.weight"
    # every q/k/v and gate/up tensor is caught by exactly one stacking rule
    for v in mapped:
        hits = [r for r in STACKED_PARAMS if r[0] in v]
        assert len(hits) == (1 if re.search(r"\.(q|k|v|gate|up)_proj\.", v) else 0), v
