"""The critic (model.head=value) equals the HF value model: the Megatron critic's per-token
values, per-token squared errors and every gradient at TP=1, TP=2, TP=2+SP and PP=2 match
`AutoModelForTokenClassification.from_pretrained(export, trust_remote_code=True)` run in
float64 — the same harness (parity_worker / pp_worker) and tolerances as the LM parity tests.

Teeth: under SP the value head's weight and bias gradients are partial sums over each rank's
tokens; they must come out identical on every TP rank (all-reduced because both are tagged
`sequence_parallel`). With the bias left untagged (veRL's LinearForLastLayer tags the weight
only) the bias gradient differs between ranks and from the reference — the check catches it.
"""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from splitllama.hf.build import (critic_from_causal_lm, save_pretrained_with_code, split_from_llamas,
                                 tiny_llama_configs, tiny_llama_from_config)
from tests.distributed.test_tp_parity import GRAD_TOL, LOGIT_TOL, rel_err
from tests.launch import torchrun

pytestmark = pytest.mark.distributed
N, M = 2, 3
TP_CASES = {"tp1": (1, False, False), "tp2": (2, False, False), "tp2_sp": (2, True, False),
            "tp2_sp_untagged_bias": (2, True, True)}  # name: (tp, sp, untag the value-head bias)
PP_CASE = "pp2"


def _hf_reference(export_dir, tokens, targets):
    """Values, per-token squared errors and gradients of the exported HF critic in float64."""
    from transformers import AutoModelForTokenClassification

    hf = AutoModelForTokenClassification.from_pretrained(export_dir, trust_remote_code=True)
    hf.set_attn_implementation("eager")
    hf = hf.double().eval()
    logits = hf(input_ids=tokens[:, :-1]).logits
    assert logits.shape == (*targets.shape, 1)
    values = logits[..., 0]
    err = (values - targets.double()).square()
    err.mean().backward()
    return values.detach(), err.detach(), {n: p.grad.detach().clone() for n, p in hf.named_parameters()}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("critic")
    lo, up = tiny_llama_configs()
    lm = split_from_llamas(tiny_llama_from_config(lo, seed=0), tiny_llama_from_config(up, seed=1), N, M,
                           mlp=True, seed=3)
    # normal(0, 0.02) head so the trunk gets a gradient; targets of the size of the values
    critic = critic_from_causal_lm(lm, init="normal", seed=4)
    export = tmp / "hf_critic"
    save_pretrained_with_code(critic, export)
    gen = torch.Generator().manual_seed(7)
    tokens = torch.randint(0, lo["vocab_size"], (4, 17), generator=gen)
    targets = (torch.randn(4, 16, generator=gen) * 0.1).contiguous()
    save_file({"tokens": tokens, "values": targets}, tmp / "tokens.safetensors")
    ref = _hf_reference(export, tokens, targets)

    cases: dict[int, list] = {1: [], 2: []}
    for name, (tp, sp, untag) in TP_CASES.items():
        cases[tp].append({"name": name, "hf_dir": str(export), "tokens": str(tmp / "tokens.safetensors"),
                          "out": str(tmp / f"{name}.safetensors"), "sp": sp, "untag_value_bias": untag})
    for tp in (1, 2):
        spec = tmp / f"spec_tp{tp}.json"
        spec.write_text(json.dumps({"tp": tp, "cases": cases[tp]}))
        torchrun(tp, "tests/distributed/parity_worker.py", spec)
    pp_spec = tmp / "spec_pp.json"
    pp_spec.write_text(json.dumps({"cases": [{
        "name": PP_CASE, "hf_dir": str(export), "tokens": str(tmp / "tokens.safetensors"),
        "out_dir": str(tmp / PP_CASE), "tp": 1, "pp": 2, "layout": "L2,A|U3", "sp": False}]}))
    torchrun(2, "tests/distributed/pp_worker.py", pp_spec, timeout=900)
    out = {name: load_file(tmp / f"{name}.safetensors") for name in TP_CASES}
    return tmp, out, ref


CORRECT_TP = ["tp1", "tp2", "tp2_sp"]


@pytest.mark.parametrize("name", CORRECT_TP)
def test_values_match_hf_critic(runs, name):
    _, out, (ref_values, ref_err, _) = runs
    o = out[name]
    assert o["logits"].shape == ref_values.shape  # [b, s]: one value per token
    assert rel_err(o["logits"], ref_values) < LOGIT_TOL
    assert rel_err(o["loss"], ref_err) < LOGIT_TOL


@pytest.mark.parametrize("name", CORRECT_TP)
def test_gradients_match_hf_critic(runs, name):
    _, out, (_, _, ref_grads) = runs
    grads = {k[len("grad."):]: v for k, v in out[name].items() if k.startswith("grad.")}
    assert set(grads) == set(ref_grads)
    assert {"score.weight", "score.bias"} <= set(grads)
    for k in ["score.weight", "score.bias", "model.norm.weight", "model.adapter_linear_1.weight"] + sorted(grads):
        assert rel_err(grads[k], ref_grads[k]) < GRAD_TOL, k


@pytest.mark.parametrize("name", CORRECT_TP)
def test_replicated_grads_identical_across_tp(runs, name):
    _, out, _ = runs
    assert out[name]["replicated_grad_diff"].item() <= 1e-7


def test_untagged_value_bias_is_caught(runs):
    _, out, (ref_values, _, ref_grads) = runs
    o = out["tp2_sp_untagged_bias"]
    assert rel_err(o["logits"], ref_values) < LOGIT_TOL  # the forward is fine ...
    assert rel_err(o["grad.score.bias"], ref_grads["score.bias"]) > 1e-2  # ... the bias grad is not
    assert o["replicated_grad_diff"].item() > 1e-4


def test_pp2_values_and_gradients_match_hf_critic(runs):
    tmp, _, (ref_values, ref_err, ref_grads) = runs
    d = tmp / PP_CASE
    o = load_file(d / "outputs.safetensors")
    assert rel_err(o["logits"], ref_values) < LOGIT_TOL
    sums = o["loss_sum_tokens"]
    assert torch.equal(sums[:, 1], torch.full((4,), 16.0))
    assert rel_err(sums[:, 0], ref_err.sum(dim=1)) < LOGIT_TOL
    grads = {}
    for f in sorted(d.glob("grads_stage*.safetensors")):
        grads.update(load_file(f))
    assert set(grads) == set(ref_grads)
    for k in sorted(grads):
        assert rel_err(grads[k], ref_grads[k]) < GRAD_TOL, k
