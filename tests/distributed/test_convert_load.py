"""`import-hf` checkpoints load into the real Megatron model at TP=1, TP=2, PP=2 and TP=2×PP=2
(strict: every requested key present with its global shape, and no key left over), and the
logits equal the transformers split model built from the same source weights. The writer's
DCP metadata equals what the training app's save (`dist_checkpointing.save` of
`model_io.model_sharded_state_dict`) writes for the same model at TP=1 and TP=2×PP=2, and
that TP=2×PP=2 checkpoint exports with `export-hf`.

One torchrun launch (4 processes, gloo) runs every case. Reference: HF model in float64;
Megatron in float32; tolerance max |diff| / max |ref| ≤ 2e-5."""
from __future__ import annotations

import json
import pickle

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from splitllama.convert.export_hf import export_hf
from splitllama.convert.import_hf import import_hf
from tests.distributed.convert_worker import make_sources, reference
from tests.launch import torchrun

pytestmark = pytest.mark.distributed
WORKER = "tests/distributed/convert_worker.py"
TOL = 2e-5
LAYOUTS = {  # name -> (tp, pp, layout)
    "tp1": (1, 1, None), "tp2": (2, 1, None), "pp2": (1, 2, "L2|A,U3"), "tp2pp2": (2, 2, "L1|L1,A,U3"),
}
CASES = [f"{lay}_mlp{m}" for m in (0, 1) for lay in LAYOUTS] + ["tp2pp2_mlp0_chunked"]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("convert_load")
    lower, upper = make_sources(tmp)
    tokens = torch.randint(0, 512, (2, 13), generator=torch.Generator().manual_seed(5))
    save_file({"tokens": tokens}, tmp / "tokens.safetensors")
    refs, ckpts = {}, {}
    for mlp in (0, 1):
        with torch.no_grad():
            refs[mlp] = reference(lower, upper, bool(mlp)).double()(input_ids=tokens).logits
        ckpts[mlp] = import_hf(str(tmp / "lower"), str(tmp / "upper"), 2, 3, str(tmp / f"ckpt_mlp{mlp}"),
                               mlp=bool(mlp), seed=3, dtype="fp32", progress=False).path
    # every tensor stored as several row-block chunks: loads the same
    ckpts["chunked"] = import_hf(str(tmp / "lower"), str(tmp / "upper"), 2, 3, str(tmp / "ckpt_chunked"),
                                 seed=3, dtype="fp32", progress=False, max_chunk_bytes=4096).path
    cases = []
    for name in CASES:
        lay, mlp = name.split("_")[0], int(name.split("_")[1][-1])
        tp, pp, plan = LAYOUTS[lay]
        c = {"name": name, "ckpt": ckpts["chunked" if name.endswith("chunked") else mlp], "tp": tp, "pp": pp,
             "layout": plan, "out": str(tmp / f"{name}.safetensors")}
        if name in ("tp1_mlp1", "tp2pp2_mlp1"):
            c["save"] = str(tmp / f"resaved_{name}")
        cases.append(c)
    spec = tmp / "spec.json"
    spec.write_text(json.dumps({"tokens": str(tmp / "tokens.safetensors"), "cases": cases}))
    torchrun(4, WORKER, spec)
    return {"tmp": tmp, "refs": refs, "sources": (lower, upper), "ckpts": ckpts, "tokens": tokens,
            "logits": {c["name"]: load_file(c["out"])["logits"] for c in cases}}


@pytest.mark.parametrize("name", CASES)
def test_logits_equal_hf_split_model(runs, name):
    ref = runs["refs"][int(name.split("_")[1][-1])]
    out = runs["logits"][name]
    assert out.shape == ref.shape
    assert rel_err(out, ref) < TOL


def _md(path):
    with open(path / "iter_0000000" / ".metadata", "rb") as f:
        return pickle.load(f).state_dict_metadata


def _chunks(md):
    return sorted((tuple(c.offsets), tuple(c.sizes)) for c in md.chunks)


def test_metadata_equals_megatron_save(runs):
    ours = _md(runs["tmp"] / "ckpt_mlp1")
    tp1, tp2pp2 = _md(runs["tmp"] / "resaved_tp1_mlp1"), _md(runs["tmp"] / "resaved_tp2pp2_mlp1")
    assert set(ours) == set(tp1) == set(tp2pp2)
    for key, md in ours.items():
        assert type(md) is type(tp1[key]) is type(tp2pp2[key]), key
        if hasattr(md, "chunks"):
            assert md.size == tp1[key].size == tp2pp2[key].size, key
            assert md.properties.dtype == tp1[key].properties.dtype == torch.float32, key
            assert _chunks(md) == _chunks(tp1[key]), key  # same storage layout as a TP=1 save
    fc1 = "upper.layers.0.mlp.linear_fc1.weight"
    assert _chunks(ours[fc1]) == [((0, 0), (320, 128)), ((320, 0), (320, 128))]


def test_training_checkpoint_exports(runs, tmp_path):
    """A checkpoint saved by dist_checkpointing at TP=2×PP=2 exports to the same HF model."""
    out = export_hf(str(runs["tmp"] / "resaved_tp2pp2_mlp1"), str(tmp_path / "hf"), progress=False)
    model = AutoModelForCausalLM.from_pretrained(out.path, trust_remote_code=True).eval()
    ref = reference(*runs["sources"], mlp=True)
    exported, expected = model.state_dict(), ref.state_dict()
    assert set(exported) == set(expected)
    assert all(torch.equal(exported[k], expected[k]) for k in expected)  # bit-exact weights
    with torch.no_grad():
        logits = model.double()(input_ids=runs["tokens"]).logits
    assert rel_err(logits, runs["refs"][1]) < TOL
