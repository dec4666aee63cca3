"""Checkpoint conversion, single process: import-hf writes exactly the mapping table's tensors
(bit-exact, fp32), export-hf gives a from_pretrained-loadable model with the reference's
weights and logits, import → export → import is bit-exact, only needed shards are read,
bf16 / identity / chunked variants, import-hf-split, inspect, and the CLI.
(Loading into Megatron at TP/PP: tests/distributed/test_convert_load.py.)"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM

from splitllama.checkpoint import dirs
from splitllama.convert.cli import main as cli_main
from splitllama.convert.dist_reader import DistCheckpoint
from splitllama.convert.export_hf import export_hf
from splitllama.convert.import_hf import import_hf, import_hf_split
from splitllama.convert.inspect_ckpt import inspect
from splitllama.convert.keys import ckpt_key
from splitllama.convert.mapping import hf_to_mcore
from splitllama.hf.build import save_pretrained_with_code
from tests.distributed.convert_worker import M, N, SEED, make_sources, reference
from tests.launch import REPO


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    root = tmp_path_factory.mktemp("convert")
    lower, upper = make_sources(root)
    return {"root": root, "lower": str(root / "lower"), "upper": str(root / "upper"), "models": (lower, upper)}


def _import(src, out, **kw):
    kw = {"mlp": True, "seed": SEED, "dtype": "fp32", "progress": False, **kw}
    return import_hf(src["lower"], src["upper"], N, M, str(out), **kw)


def _tensors(path) -> dict[str, torch.Tensor]:
    dist_ckpt = DistCheckpoint(str(path))
    return {k: dist_ckpt.read(k) for k in dist_ckpt.tensor_keys()}


def _expected(src, mlp: bool) -> dict[str, torch.Tensor]:
    ref = reference(*src["models"], mlp=mlp)
    return {ckpt_key(k): v for k, v in hf_to_mcore(ref.state_dict(), ref_cfg(ref)).items()}


def ref_cfg(ref):
    from splitllama.config.model import ModelConfig

    return ModelConfig.from_seed_dict(ref.config.to_dict())


@pytest.mark.parametrize("mlp", [False, True])
def test_import_writes_the_mapping_tables_tensors(src, tmp_path, mlp):
    res = _import(src, tmp_path / "ckpt", mlp=mlp)
    got, want = _tensors(res.path), _expected(src, mlp)
    assert set(got) == set(want)
    for k in want:
        assert got[k].dtype == torch.float32 and torch.equal(got[k], want[k]), k
    # layout: root/latest -> iter_0000000 with COMPLETE, model_config.json, Megatron metadata
    assert dirs.resolve(str(tmp_path / "ckpt")) == res.path and res.path.endswith("iter_0000000")
    cfg = json.loads(open(os.path.join(res.path, dirs.MODEL_CONFIG)).read())
    assert (cfg["num_layers_lower"], cfg["num_layers_upper"], cfg["mlp"]) == (N, M, mlp)
    assert json.load(open(os.path.join(res.path, "metadata.json")))["sharded_backend"] == "torch_dist"
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]  # no temp directory left


def test_export_loads_with_from_pretrained(src, tmp_path):
    ckpt = _import(src, tmp_path / "ckpt").path
    out = export_hf(ckpt, str(tmp_path / "hf"), progress=False, max_shard_bytes=300_000)
    assert len(out.files) > 1 and os.path.isfile(tmp_path / "hf" / "model.safetensors.index.json")
    model = AutoModelForCausalLM.from_pretrained(out.path, trust_remote_code=True).eval()
    assert type(model).__name__ == "CustomSplitLLamaForCausalLM"
    ref = reference(*src["models"], mlp=True)
    got, want = model.state_dict(), ref.state_dict()
    assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)
    tokens = torch.randint(0, 512, (2, 11), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.allclose(model(input_ids=tokens).logits, ref(input_ids=tokens).logits, atol=1e-6, rtol=0)
    gen = model.generate(tokens[:1, :4], max_new_tokens=3, do_sample=False)
    assert gen.shape == (1, 7)
    seed_cfg = json.load(open(tmp_path / "hf" / "config.json"))
    assert seed_cfg["architectures"] == ["CustomSplitLLamaForCausalLM"]
    assert (seed_cfg["num_layers_8"], seed_cfg["num_layers_70"], seed_cfg["mlp"]) == (N, M, True)


def test_import_export_import_is_bit_exact(src, tmp_path):
    first = _import(src, tmp_path / "a")
    export_hf(first.path, str(tmp_path / "hf"), progress=False, max_shard_bytes=500_000)
    second = import_hf_split(str(tmp_path / "hf"), str(tmp_path / "b"), progress=False)
    a, b = _tensors(first.path), _tensors(second.path)
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) and a[k].dtype == b[k].dtype for k in a)
    export_hf(second.path, str(tmp_path / "hf2"), progress=False, max_shard_bytes=500_000)
    for name in os.listdir(tmp_path / "hf"):
        if name.endswith(".safetensors"):
            assert (tmp_path / "hf" / name).read_bytes() == (tmp_path / "hf2" / name).read_bytes(), name


def test_import_hf_split_of_a_seed_checkpoint(src, tmp_path):
    """A checkpoint saved by the seed's transformers model (save_pretrained, one file)."""
    ref = reference(*src["models"], mlp=False)
    save_pretrained_with_code(ref, tmp_path / "seed")
    res = import_hf_split(str(tmp_path / "seed"), str(tmp_path / "ckpt"), progress=False)
    got, want = _tensors(res.path), _expected(src, False)
    assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)


def test_reads_only_the_shards_it_needs(src, tmp_path):
    """The upper index lists shards that are not on disk, except those holding needed tensors."""
    full = _import(src, tmp_path / "full")
    needed = {os.path.basename(p) for p in full.bytes_read if p.startswith(src["upper"] + "/")}
    index = json.load(open(os.path.join(src["upper"], "model.safetensors.index.json")))
    all_shards = set(index["weight_map"].values())
    assert needed < all_shards  # the first upper layers' shards are not needed
    sparse = tmp_path / "upper_sparse"
    shutil.copytree(src["upper"], sparse, ignore=lambda d, names: [n for n in names if n in all_shards - needed])
    res = import_hf(src["lower"], str(sparse), N, M, str(tmp_path / "ckpt"), mlp=True, seed=SEED,
                    dtype="fp32", progress=False)
    assert {os.path.basename(p) for p in res.bytes_read if p.startswith(str(sparse))} == needed
    a, b = _tensors(full.path), _tensors(res.path)
    assert all(torch.equal(a[k], b[k]) for k in a)
    # exactly the needed bytes were read: each source tensor once
    assert sum(res.bytes_read.values()) == res.bytes_written - sum(a[k].nbytes for k in a if k.startswith("adapter"))


def test_bf16_identity_and_row_chunks(src, tmp_path):
    res = _import(src, tmp_path / "ckpt", mlp=False, dtype="bf16", adapter_init="identity", max_chunk_bytes=2048)
    dist_ckpt = DistCheckpoint(res.path)
    emb = dist_ckpt.tensor_meta("embedding.word_embeddings.weight")
    assert len(emb.chunks) == 512 * 64 * 2 // 2048  # 64 row blocks of 16 rows
    got, want = _tensors(res.path), _expected(src, False)
    for k in want:
        if k == "adapter.linear.weight":
            assert torch.equal(got[k], torch.eye(128, 64, dtype=torch.bfloat16))
        else:
            assert got[k].dtype == torch.bfloat16 and torch.equal(got[k], want[k].bfloat16()), k


def test_inspect_prints_keys_shapes_dtypes_sizes_config(src, tmp_path):
    ckpt = _import(src, tmp_path / "ckpt").path
    text = inspect(str(tmp_path / "ckpt"))
    assert re.search(r"upper\.layers\.2\.self_attention\.linear_qkv\.weight +\[192, 128\] +F32 +96\.00 KiB +1\n", text)
    assert "lower.layers.1.mlp.linear_fc1.weight" in text and '"num_layers_upper": 3' in text
    assert "35 tensors" in text and "0 objects" in text and ckpt in text
    hf = inspect(src["upper"])
    assert "model.layers.5.self_attn.k_proj.weight" in hf and "[32, 128]" in hf and '"model_type": "llama"' in hf


def test_cli_import_export_inspect(src, tmp_path, capsys):
    """The documented command line (import-hf as a real subprocess, the rest in-process)."""
    out = tmp_path / "ckpt"
    cmd = ["import-hf", "--lower", src["lower"], "--upper", src["upper"], "--num-layers-lower", "2",
           "--num-layers-upper", "3", "--mlp", "--adapter-init", "random", "--seed", str(SEED), "--dtype", "fp32",
           "--out", str(out)]
    proc = subprocess.run([sys.executable, "tools/convert_checkpoint.py", *cmd], cwd=REPO, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "read (bytes per file):" in proc.stdout and "tensors" in proc.stderr  # summary + progress bar
    assert cli_main(["export-hf", "--ckpt", str(out), "--out", str(tmp_path / "hf"), "--no-progress"]) == 0
    assert cli_main(["inspect", str(tmp_path / "hf")]) == 0
    assert "model.layers_last.2.mlp.up_proj.weight" in capsys.readouterr().out
    a = _tensors(out)
    want = _expected(src, True)
    assert all(torch.equal(a[k], want[k]) for k in want)
