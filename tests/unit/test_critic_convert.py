"""Critic checkpoints, single process: `import-hf --head value` and `lm-to-critic` write the same
critic initialisation (trunk bit-exact, value head as stated); `export-hf` of a critic loads with
`AutoModelForTokenClassification.from_pretrained(DIR, trust_remote_code=True)` (num_labels=1,
logits [batch, seq, 1]) and equals the transformers critic built from the same sources; the
export re-imports with `import-hf-split`; a critic config refuses to train from an LM checkpoint.
(Loading into Megatron at TP/PP: tests/distributed/test_critic_convert_load.py.)"""
from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForTokenClassification

from splitllama.checkpoint import dirs
from splitllama.convert.cli import main as cli_main
from splitllama.convert.dist_reader import DistCheckpoint
from splitllama.hf.build import critic_from_causal_lm, value_head_weights
from tests.distributed.convert_worker import M, N, SEED, make_sources, reference

H_UP = 128


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("critic_convert")
    lower, upper = make_sources(root)
    common = ["--lower", str(root / "lower"), "--upper", str(root / "upper"), "--num-layers-lower", str(N),
              "--num-layers-upper", str(M), "--seed", str(SEED), "--dtype", "fp32", "--no-progress"]
    assert cli_main(["import-hf", *common, "--out", str(root / "lm")]) == 0
    assert cli_main(["import-hf", *common, "--head", "value", "--value-head-init", "normal",
                     "--out", str(root / "critic_hf")]) == 0
    assert cli_main(["lm-to-critic", "--ckpt", str(root / "lm"), "--value-head-init", "normal", "--seed",
                     str(SEED), "--out", str(root / "critic_lm"), "--no-progress"]) == 0
    assert cli_main(["lm-to-critic", "--ckpt", str(root / "lm"), "--out", str(root / "critic_zeros"),
                     "--no-progress"]) == 0
    return root, (lower, upper)


def _tensors(path) -> dict[str, torch.Tensor]:
    dist_ckpt = DistCheckpoint(str(path))
    return {k: dist_ckpt.read(k) for k in dist_ckpt.tensor_keys()}


def test_import_hf_head_value_and_lm_to_critic_agree(ckpts):
    root, _ = ckpts
    lm, a, b, z = (_tensors(root / n) for n in ("lm", "critic_hf", "critic_lm", "critic_zeros"))
    head = value_head_weights(H_UP, "normal", seed=SEED)
    for crit in (a, b, z):
        assert set(crit) == (set(lm) - {"output_layer.weight"}) | {"output_layer.weight", "output_layer.bias"}
        for k in set(lm) - {"output_layer.weight"}:  # the trunk: copied bit for bit
            assert torch.equal(crit[k], lm[k]), k
        assert crit["output_layer.weight"].shape == (1, H_UP) and torch.equal(crit["output_layer.bias"], torch.zeros(1))
    for crit in (a, b):  # normal(0, 0.02) from the seed
        assert torch.equal(crit["output_layer.weight"], head["score.weight"])
        assert 0.01 < crit["output_layer.weight"].std().item() < 0.03
    assert torch.equal(z["output_layer.weight"], torch.zeros(1, H_UP))
    for name in ("critic_hf", "critic_lm"):
        cfg = dirs.read_json(dirs.resolve(str(root / name)), dirs.MODEL_CONFIG)
        assert cfg["head"] == "value"
    assert dirs.read_json(dirs.resolve(str(root / "lm")), dirs.MODEL_CONFIG)["head"] == "lm"


def test_export_critic_loads_as_token_classification_and_equals_reference(ckpts, tmp_path):
    root, (lower, upper) = ckpts
    out = tmp_path / "hf_critic"
    assert cli_main(["export-hf", "--ckpt", str(root / "critic_lm"), "--out", str(out), "--no-progress"]) == 0
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architectures"] == ["CustomSplitLLamaForTokenClassification"]
    assert cfg["auto_map"]["AutoModelForTokenClassification"] == \
        "modeling_splitllama.CustomSplitLLamaForTokenClassification"
    model = AutoModelForTokenClassification.from_pretrained(out, trust_remote_code=True)
    assert model.config.num_labels == 1
    model.set_attn_implementation("eager")
    ref = critic_from_causal_lm(reference(lower, upper, mlp=False), init="normal", seed=SEED)
    ref.set_attn_implementation("eager")
    tokens = torch.randint(0, 512, (2, 11), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        got, want = model.double()(input_ids=tokens).logits, ref.double()(input_ids=tokens).logits
    assert got.shape == (2, 11, 1)
    assert torch.allclose(got, want, rtol=0, atol=1e-12)


def test_critic_export_reimports_with_import_hf_split(ckpts, tmp_path):
    root, _ = ckpts
    assert cli_main(["export-hf", "--ckpt", str(root / "critic_hf"), "--out", str(tmp_path / "hf"),
                     "--no-progress"]) == 0
    assert cli_main(["import-hf-split", str(tmp_path / "hf"), "--out", str(tmp_path / "back"), "--no-progress"]) == 0
    a, b = _tensors(root / "critic_hf"), _tensors(tmp_path / "back")
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_lm_to_critic_refusals(ckpts, capsys):
    root, _ = ckpts
    assert cli_main(["import-hf", "--lower", str(root / "lower"), "--upper", str(root / "upper"),
                     "--num-layers-lower", str(N), "--num-layers-upper", str(M), "--value-head-init", "normal",
                     "--out", str(root / "x"), "--no-progress"]) == 2  # an LM has no value head to initialise
    assert "needs --head value" in capsys.readouterr().err
    assert cli_main(["lm-to-critic", "--ckpt", str(root / "lm"), "--seed", "4", "--out", str(root / "x"),
                     "--no-progress"]) == 2
    assert "--value-head-init zeros has no randomness" in capsys.readouterr().err
    assert cli_main(["lm-to-critic", "--ckpt", str(root / "critic_lm"), "--out", str(root / "x"),
                     "--no-progress"]) == 2
    assert "is already a critic" in capsys.readouterr().err
    assert cli_main(["lm-to-critic", "--ckpt", str(root / "lm"), "--out", str(root / "critic_lm"),
                     "--no-progress"]) == 2
    assert "already exists" in capsys.readouterr().err
    assert not (root / "x").exists()


def test_critic_config_refuses_an_lm_checkpoint(ckpts):
    from splitllama.config.job import load_job_config
    from splitllama.training.app import adopt_checkpoint_model

    root, _ = ckpts
    job = load_job_config(None, ["model.head=value", f"checkpoint.load={root / 'lm'}"])
    with pytest.raises(ValueError, match="model.head: config 'value', checkpoint 'lm'.*lm-to-critic"):
        adopt_checkpoint_model(job)
    job = load_job_config(None, [f"checkpoint.load={root / 'critic_lm'}"])  # adopted from the checkpoint
    job = adopt_checkpoint_model(job)
    assert job.model.head == "value"
