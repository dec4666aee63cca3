"""`stream_hf_weights` on a live sharded model equals the one-process `export-hf`, bit for bit,
on every rank: TP=2 (x DP=2), PP=2 (x DP=2) and TP=2 x PP=2, for an fp32 LM with the two-layer
adapter and a bf16 critic (value head); with a small scratch bucket (row-parallel slices go
through it in row blocks) the stream's peak bytes stay <= the largest tensor + the bucket.
`torchrun ... export-hf --tp 2 --pp 2` (and --tp 2 at DP=2 with several safetensors shards)
writes files byte-identical to the one-process export. One 4-process gloo launch per command."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from splitllama.convert.dist_reader import DistCheckpoint
from splitllama.convert.export_hf import export_hf
from splitllama.convert.import_hf import import_hf
from tests.distributed.convert_worker import make_sources
from tests.launch import REPO, torchrun

pytestmark = pytest.mark.distributed
WORKER = "tests/distributed/stream_worker.py"
TOOL = "tools/convert_checkpoint.py"
SMALL_BUCKET = 1000  # bytes: smaller than one row-parallel slice, so the scratch path runs row blocks
CASES = {  # name -> (checkpoint, dtype, tp, pp, layout, bucket)
    "lm_tp2_dp2": ("lm", "float32", 2, 1, None, 64 << 20),
    "lm_pp2_dp2": ("lm", "float32", 1, 2, "L2|A,U3", 64 << 20),
    "lm_tp2pp2": ("lm", "float32", 2, 2, "L1|L1,A,U3", 64 << 20),
    "lm_tp2pp2_small_bucket": ("lm", "float32", 2, 2, "L2,A,U1|U2", SMALL_BUCKET),
    "critic_tp2pp2_bf16": ("critic", "bfloat16", 2, 2, "L1|L1,A,U3", SMALL_BUCKET),
}


def _names_in_file_order(path: Path) -> list[str]:
    raw = path.read_bytes()
    header = json.loads(raw[8:8 + int.from_bytes(raw[:8], "little")])
    header.pop("__metadata__", None)
    return sorted(header, key=lambda n: header[n]["data_offsets"][0])


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("stream")
    make_sources(tmp)
    ckpts = {
        "lm": import_hf(str(tmp / "lower"), str(tmp / "upper"), 2, 3, str(tmp / "ckpt_lm"), mlp=True, seed=3,
                        dtype="fp32", progress=False).path,
        "critic": import_hf(str(tmp / "lower"), str(tmp / "upper"), 2, 3, str(tmp / "ckpt_critic"), seed=3,
                            dtype="bf16", progress=False, head="value", value_head_init="normal").path,
    }
    largest = {k: max(DistCheckpoint(p).nbytes(key) for key in DistCheckpoint(p).tensor_keys())
               for k, p in ckpts.items()}
    exports = {k: Path(export_hf(p, str(tmp / f"export_{k}"), progress=False).path) for k, p in ckpts.items()}
    cases = []
    for name, (ck, dtype, tp, pp, layout, bucket) in CASES.items():
        (tmp / name).mkdir()
        cases.append({"name": name, "ckpt": ckpts[ck], "dtype": dtype, "tp": tp, "pp": pp, "layout": layout,
                      "bucket_bytes": bucket, "out_dir": str(tmp / name)})
    spec = tmp / "spec.json"
    spec.write_text(json.dumps({"cases": cases}))
    torchrun(4, WORKER, spec)
    return {"tmp": tmp, "ckpts": ckpts, "exports": exports, "largest": largest}


@pytest.mark.parametrize("name", list(CASES))
def test_stream_equals_export_on_every_rank(env, name):
    ck, dtype, tp, pp, _, bucket = CASES[name]
    ref_file = env["exports"][ck] / "model.safetensors"
    ref, order = load_file(ref_file), _names_in_file_order(ref_file)
    seen = set()
    for rank in range(4):
        meta = json.loads((env["tmp"] / name / f"rank{rank}.json").read_text())
        got = load_file(env["tmp"] / name / f"rank{rank}.safetensors")
        assert meta["names"] == order, rank  # export names, export order
        assert set(got) == set(ref)
        for k in ref:
            assert got[k].dtype == ref[k].dtype == getattr(torch, dtype), (rank, k)
            assert torch.equal(got[k], ref[k]), (rank, k)  # bit for bit
        assert meta["tensors"] == len(ref) and meta["live_bytes_after"] == 0
        # bound: the largest tensor the stream moves (a Megatron tensor, e.g. fused gate+up, as
        # stored in the checkpoint) plus the scratch bucket
        largest = env["largest"][ck]
        assert meta["largest_tensor_bytes"] == largest
        assert meta["peak_bytes"] <= largest + bucket, meta
        seen.add((meta["tp_rank"], meta["pp_rank"], meta["dp_rank"]))
    assert len(seen) == 4 and {s[0] for s in seen} == set(range(tp)) and {s[1] for s in seen} == set(range(pp))
    if 4 // (tp * pp) == 2:
        assert {s[2] for s in seen} == {0, 1}  # both data-parallel replicas streamed


def _files(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir())}


@pytest.mark.parametrize("tp,pp,shard_gb", [(2, 2, 5.0), (2, 1, 0.0004)])
def test_torchrun_export_hf_is_the_one_process_export(env, tp, pp, shard_gb):
    """Files byte-identical (safetensors headers, tensor bytes, index, config, code)."""
    tmp = env["tmp"]
    ref = tmp / f"ref_{tp}_{pp}"
    export_hf(env["ckpts"]["lm"], str(ref), progress=False, max_shard_bytes=int(shard_gb * 1024 ** 3))
    out = tmp / f"par_{tp}_{pp}"
    proc = torchrun(4, TOOL, "export-hf", "--ckpt", env["ckpts"]["lm"], "--out", out, "--tp", str(tp),
                    "--pp", str(pp), "--no-progress", "--max-shard-size", str(shard_gb))
    assert proc.stdout.count("wrote ") == 1 and f"TP={tp} x PP={pp}" in proc.stdout, proc.stdout
    got, want = _files(out), _files(ref)
    assert set(got) == set(want)
    if shard_gb < 1:
        assert len([n for n in want if n.endswith(".safetensors")]) > 1
    for name in want:
        assert got[name] == want[name], name
    assert not list(tmp.glob(f"par_{tp}_{pp}.tmp-*"))


def test_sharded_export_refuses_a_layout_the_processes_cannot_fill(env, tmp_path):
    out = tmp_path / "x"
    proc = subprocess.run([sys.executable, TOOL, "export-hf", "--ckpt", env["ckpts"]["lm"], "--out", str(out),
                           "--tp", "2", "--pp", "2"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert lines == ["error: --tp 2 x --pp 2 = 4 processes do not divide the 1 started; "
                     "launch with torchrun --nproc-per-node 4"], proc.stderr
    assert not out.exists() and not list(tmp_path.glob("x.tmp-*"))
