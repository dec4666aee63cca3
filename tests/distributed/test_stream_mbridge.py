"""The SplitLlama bridge for veRL's Megatron engine (vanilla mbridge 0.15.1), in the veRL-Megatron
venv (SPLITLLAMA_VERLMEG_PYTHON; verl 0.9.1, mbridge 0.15.1, megatron-core 0.16.1, transformers
5.10), at PP=2 (2 gloo processes, SplitLlama's CPU harness): `AutoBridge.from_config` resolves it for
``custom_split_llama``; the provider + `load_weights(export)` + a forward on veRL's packed THD input
(one row, two sequences) give the log-probs of transformers' per-sequence forward on the export
(float64 reference, max |diff| / max |ref| <= 2e-5), a critic export (with veRL's make_value_model
hook) the values of the HF critic; `export_weights` on every rank equals the export's tensors, bit
for bit. veRL's own TrainingWorker is not run here (see docs/serving_and_rl.md, Megatron route)."""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoModelForTokenClassification

from tests import sidevenv
from splitllama.convert.export_hf import export_hf
from splitllama.convert.import_hf import import_hf
from tests.distributed.convert_worker import make_sources
from tests.launch import REPO

pytestmark = [pytest.mark.distributed, pytest.mark.slow]
WORKER = REPO / "tests/distributed/stream_mbridge_worker.py"
TOL = 2e-5


def _rel(a, b) -> float:
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("mbridge")
    make_sources(tmp)
    out = {}
    for name, kw in (("lm", {}), ("critic", {"head": "value", "value_head_init": "normal"})):
        ck = import_hf(str(tmp / "lower"), str(tmp / "upper"), 2, 3, str(tmp / f"ck_{name}"), mlp=True, seed=3,
                       dtype="fp32", progress=False, **kw).path
        out[name] = export_hf(ck, str(tmp / f"export_{name}"), progress=False).path
    g = torch.Generator().manual_seed(7)
    seqs = [torch.randint(0, 512, (n,), generator=g) for n in (7, 11)]
    save_file({"input_ids": torch.cat(seqs)[None], "position_ids": torch.cat([torch.arange(len(s)) for s in seqs])[None],
               "cu_seqlens": torch.tensor([0, 7, 18], dtype=torch.int32)}, tmp / "tokens.safetensors")
    return tmp, out, seqs


def _run(py, tmp, export, name, critic):
    out = tmp / f"run_{name}"
    out.mkdir()
    cmd = [py, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", str(WORKER), export, str(out),
           str(tmp / "tokens.safetensors"), "1" if critic else "0"]
    p = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900,
                       env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"})
    assert p.returncode == 0, f"{p.stdout[-3000:]}\n{p.stderr[-8000:]}"
    return [load_file(out / f"rank{r}.safetensors") for r in range(2)]


@pytest.mark.parametrize("name", ["lm", "critic"])
def test_bridge_pieces_equal_the_export(exports, name):
    py = sidevenv.python("SPLITLLAMA_VERLMEG_PYTHON", "SPLITLLAMA_REQUIRE_VERL", script=".ci/verl_venv.sh")
    tmp, paths, seqs = exports
    ranks = _run(py, tmp, paths[name], name, name == "critic")
    ref = load_file(Path(paths[name]) / "model.safetensors")
    for r in ranks:  # export_weights on every rank
        got = {k[2:]: v for k, v in r.items() if k.startswith("w.")}
        assert set(got) == set(ref) and all(torch.equal(got[k], ref[k]) for k in ref)
    out = ranks[1]["out"]  # last stage
    cls = AutoModelForTokenClassification if name == "critic" else AutoModelForCausalLM
    hf = cls.from_pretrained(paths[name], trust_remote_code=True).double().eval()
    start = 0
    for s in seqs:  # per sequence, unpacked: the packed run must not attend across sequences
        with torch.no_grad():
            want = hf(input_ids=s[None]).logits[0]
        got = out[0, start:start + len(s)]
        if name == "critic":
            assert _rel(got, want[:, 0]) <= TOL
        else:
            assert _rel(torch.log_softmax(got.double(), -1), torch.log_softmax(want, -1)) <= TOL
        start += len(s)
