"""A converted critic checkpoint (`import-hf --head value`) loads into the real Megatron critic
at TP=2 and PP=2 under strict checking (every key present with its global shape, none left
over) and its per-token values equal the transformers critic built from the same sources
(float64; tolerance as test_convert_load). One torchrun launch, 2 processes."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from splitllama.convert.import_hf import import_hf
from splitllama.hf.build import critic_from_causal_lm
from tests.distributed.convert_worker import M, N, SEED, make_sources, reference
from tests.distributed.test_convert_load import TOL, rel_err
from tests.launch import torchrun

pytestmark = pytest.mark.distributed
CASES = {"tp2": (2, 1, None), "pp2": (1, 2, "L2|A,U3")}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("critic_load")
    lower, upper = make_sources(tmp)
    tokens = torch.randint(0, 512, (2, 13), generator=torch.Generator().manual_seed(5))
    save_file({"tokens": tokens}, tmp / "tokens.safetensors")
    ckpt = import_hf(str(tmp / "lower"), str(tmp / "upper"), N, M, str(tmp / "critic"), seed=SEED, dtype="fp32",
                     progress=False, head="value", value_head_init="normal").path
    ref = critic_from_causal_lm(reference(lower, upper, mlp=False), init="normal", seed=SEED)
    ref.set_attn_implementation("eager")
    with torch.no_grad():
        values = ref.double()(input_ids=tokens).logits[..., 0]
    cases = [{"name": n, "ckpt": ckpt, "tp": tp, "pp": pp, "layout": lay, "out": str(tmp / f"{n}.safetensors")}
             for n, (tp, pp, lay) in CASES.items()]
    spec = tmp / "spec.json"
    spec.write_text(json.dumps({"tokens": str(tmp / "tokens.safetensors"), "cases": cases}))
    torchrun(2, "tests/distributed/convert_worker.py", spec)
    return values, {c["name"]: load_file(c["out"])["logits"] for c in cases}


@pytest.mark.parametrize("name", list(CASES))
def test_converted_critic_values_equal_hf_critic(runs, name):
    ref, got = runs
    assert got[name].shape == ref.shape == (2, 13)
    assert rel_err(got[name], ref) < TOL
