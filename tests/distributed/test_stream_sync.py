"""rl.sync_interval in a training run (pretrain_splitllama.py, torchrun, TP=2 x PP=2, gloo):
the losses equal those of the same run without it, bit for bit; each sync's logged sha256
equals `export_digest` of `export-hf` of the checkpoint saved at that iteration. An RL
framework's weight consumer (`run_job(job, weight_consumer=...)`, PP=2 x DP=1) receives the
export's names in order on every rank, and the loop drains what it does not read."""
from __future__ import annotations

import json
import re

import pytest
from safetensors import safe_open

from splitllama.convert.export_hf import export_hf
from splitllama.rl.sync import export_digest
from tests import apprun
from tests.launch import torchrun

pytestmark = pytest.mark.distributed
RUN = ["parallel.tensor_model_parallel_size=2", "parallel.pipeline_model_parallel_size=2", "train.train_iters=4",
       "checkpoint.save_interval=2", "train.global_batch_size=4", "train.micro_batch_size=2"]


def _export_stream(path):
    """(name, tensor) of an export's safetensors in file order."""
    f = safe_open(str(path / "model.safetensors"), "pt")
    raw = (path / "model.safetensors").read_bytes()
    header = json.loads(raw[8:8 + int.from_bytes(raw[:8], "little")])
    header.pop("__metadata__", None)
    for name in sorted(header, key=lambda n: header[n]["data_offsets"][0]):
        yield name, f.get_tensor(name)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sync")
    out = {}
    for name, extra in (("sync", ["rl.sync_interval=2"]), ("plain", [])):
        m = tmp / f"{name}.jsonl"
        p = apprun.run(4, [*RUN, *extra, f"logging.metrics_file={m}", f"checkpoint.save={tmp / name}"], timeout=900)
        out[name] = (p.stdout, apprun.metrics(m))
    return tmp, out


def test_losses_equal_with_and_without_syncs(runs):
    _, out = runs
    with_sync = {r["iteration"]: r["loss"] for r in out["sync"][1] if "loss" in r}
    plain = {r["iteration"]: r["loss"] for r in out["plain"][1] if "loss" in r}
    assert sorted(with_sync) == [1, 2, 3, 4] and with_sync == plain
    assert not [r for r in out["plain"][1] if "weight_sync" in r]


def test_logged_digest_is_the_export_of_that_iteration(runs, tmp_path):
    tmp, out = runs
    stdout, recs = out["sync"]
    syncs = {r["iteration"]: r["weight_sync"] for r in recs if "weight_sync" in r}
    assert sorted(syncs) == [2, 4]
    for it, rec in syncs.items():
        exp = export_hf(str(tmp / "sync" / f"iter_{it:07d}"), str(tmp_path / f"e{it}"), progress=False)
        stream = list(_export_stream(tmp_path / f"e{it}"))
        assert rec["tensors"] == len(stream) and rec["bytes"] == exp.bytes_written
        assert rec["sha256"] == export_digest(stream), it
        assert re.search(rf"\[rl-sync\] iteration {it} \| {len(stream)} tensors \| .* sha256 {rec['sha256']}", stdout)
    assert syncs[2]["sha256"] != syncs[4]["sha256"]  # the weights moved between the syncs


def test_rl_framework_consumer_on_every_rank(tmp_path):
    torchrun(2, "tests/distributed/stream_sync_driver.py", tmp_path, "parallel.pipeline_model_parallel_size=2",
             "train.train_iters=2", "rl.sync_interval=1", "logging.log_interval=1", "train.eval_interval=0",
             "logging.progress=false", f"checkpoint.save={tmp_path / 'ck'}", "checkpoint.save_interval=2",
             timeout=900)
    exp = export_hf(str(tmp_path / "ck" / "iter_0000002"), str(tmp_path / "e"), progress=False)
    head = list(_export_stream(tmp_path / "e"))[:25]
    for rank in (0, 1):
        for it in (1, 2):
            rec = json.loads((tmp_path / f"rank{rank}_iter{it}.json").read_text())
            assert rec["names"] == [n for n, _ in head]
        assert rec["sha256"] == export_digest(head)  # iteration 2's weights = the iter_2 checkpoint
    assert exp.tensors > 25  # the consumer stopped early; the loop drained the rest
