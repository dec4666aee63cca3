"""The vLLM plugin's pure parts, without vLLM (fast): export names/shapes, the sync's bucketing and refusals,
and the TP-fit check. The engine is a recorder of the reload calls WeightSync would send to vLLM's workers."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import load

from splitllama.hf.build import split_from_llamas, tiny_llama_configs, tiny_llama_from_config
from splitllama.vllm.fit import TensorParallelSizeError, check_tensor_parallel, tensor_parallel_problems
from splitllama.vllm.sync import WeightSync, sync_weights
from splitllama.vllm.weights import UnknownWeightError, export_shapes, vllm_module_of


class Recorder:
    """Stands in for ``vllm.LLM``: records each reload call's tensors (decoded as the worker decodes them)."""

    def __init__(self):
        self.calls: list[dict[str, torch.Tensor]] = []
        self.resets = 0

    def collective_rpc(self, method, args=()):
        assert method == "splitllama_reload_weights"
        self.calls.append(load(args[0]))

    def reset_prefix_cache(self):
        self.resets += 1


@pytest.fixture(scope="module", params=[True, False], ids=["mlp1", "mlp0"])
def model(request):
    lo, up = tiny_llama_configs()
    return split_from_llamas(tiny_llama_from_config(lo, seed=0), tiny_llama_from_config(up, seed=1), 2, 3,
                             mlp=request.param, adapter_init="random", seed=3)


def test_export_shapes_are_the_state_dict(model):
    assert export_shapes(model.config) == {k: tuple(v.shape) for k, v in model.state_dict().items()}


def test_buckets_become_whole_module_reload_calls(model):
    state = model.state_dict()
    names = list(state)
    engine = Recorder()
    buckets = [[(n, state[n]) for n in names[i:i + 1]] for i in range(len(names))]  # one tensor per bucket
    assert sync_weights(engine, buckets, hf_config=model.config) == len(names)
    sent = [n for call in engine.calls for n in call]
    assert sorted(sent) == sorted(names) and engine.resets == 1
    for call in engine.calls:  # every call holds whole vLLM modules: q/k/v together, gate/up together
        modules = {vllm_module_of(n) for n in call}
        for m in modules:
            assert {n for n in names if vllm_module_of(n) == m} <= set(call), m
    for call in engine.calls:
        for n, t in call.items():
            torch.testing.assert_close(t, state[n], rtol=0, atol=0)
    engine = Recorder()
    assert sync_weights(engine, [state.items()], hf_config=model.config) == len(names)
    assert len(engine.calls) == 1  # one bucket: one call


def test_unknown_names_and_shapes_refused_before_sending(model):
    state = model.state_dict()
    engine = Recorder()
    sync = WeightSync(engine, hf_config=model.config)
    bad = [("model.norm.weight", state["model.norm.weight"]),
           ("_fsdp_wrapped_module.model.norm.weight", state["model.norm.weight"]),
           ("model.layers_first.0.mlp.up_prj.weight", state["model.layers_first.0.mlp.up_proj.weight"])]
    with pytest.raises(UnknownWeightError) as e:
        sync.update(bad)
    msg = str(e.value)
    assert "_fsdp_wrapped_module.model.norm.weight" in msg and "up_prj" in msg and "must be stripped" in msg
    with pytest.raises(UnknownWeightError, match=r"shape differs: model.norm.weight \[3\]"):
        sync.update([("model.norm.weight", torch.zeros(3))])
    assert engine.calls == []
    with pytest.raises(UnknownWeightError, match="given twice"):
        sync.update([("model.norm.weight", state["model.norm.weight"])] * 2)
    assert engine.calls == []


def test_incomplete_fused_module_refused_at_finish(model):
    state = model.state_dict()
    engine = Recorder()
    q = "model.layers_last.1.self_attn.q_proj.weight"
    with pytest.raises(UnknownWeightError, match="k_proj.weight.*v_proj.weight"):
        with WeightSync(engine, hf_config=model.config) as sync:
            sync.update([(q, state[q]), ("model.norm.weight", state["model.norm.weight"])])
    assert [list(c) for c in engine.calls] == [["model.norm.weight"]]  # q_proj never sent
    assert engine.resets == 1  # what was applied invalidates the prefix cache all the same


def test_tensor_parallel_fit():
    lo, up = tiny_llama_configs()
    model = split_from_llamas(tiny_llama_from_config(lo, seed=0), tiny_llama_from_config(up, seed=1), 1, 1,
                              mlp=True, adapter_init="random", seed=3)
    heads_lo, heads_up = lo["num_attention_heads"], up["num_attention_heads"]
    assert tensor_parallel_problems(model.config, 1) == [] and tensor_parallel_problems(model.config, 2) == []
    tp = heads_lo * 2 if heads_lo * 2 <= heads_up else heads_up * 2
    with pytest.raises(TensorParallelSizeError, match=f"tensor_parallel_size={tp} does not fit") as e:
        check_tensor_parallel(model.config, tp)
    assert f"num_attention_heads={min(heads_lo, heads_up)} is not divisible by {tp}" in str(e.value)
    problems = tensor_parallel_problems(model.config, 3)
    assert any(p.startswith("adapter (mlp=True): upper hidden_size=") for p in problems), problems
