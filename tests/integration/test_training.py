"""The training application end to end on CPU/gloo (issue 4 acceptance).

Each test launches pretrain_splitllama.py for real (python or torchrun) on the tiny config."""
from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import psutil
import pytest

from splitllama.checkpoint import dirs
from tests import apprun

pytestmark = pytest.mark.distributed


def _first_last(losses: dict[int, float], k: int = 10) -> tuple[float, float]:
    its = sorted(losses)
    return sum(losses[i] for i in its[:3]) / 3, sum(losses[i] for i in its[-k:]) / k


@pytest.mark.parametrize("nproc, extra", [(1, []), (2, ["parallel.pipeline_model_parallel_size=2"])],
                         ids=["pp1", "pp2"])
def test_loss_falls(tmp_path, nproc, extra):
    m = tmp_path / "m.jsonl"
    apprun.run(nproc, ["train.train_iters=100", f"logging.metrics_file={m}", *extra])
    losses = apprun.losses(m)
    assert sorted(losses) == list(range(1, 101))
    first, last = _first_last(losses)
    assert first > 6.0 and last < first - 0.7, (first, last)
    rec = apprun.metrics(m)[-1]
    for key in ("iteration", "loss", "lr", "grad_norm", "tokens_per_s", "consumed_tokens", "skipped_iterations"):
        assert key in rec


def _straight_and_killed(tmp_path: Path, nproc: int, extra: list[str]):
    straight = tmp_path / "straight.jsonl"
    apprun.run(nproc, ["train.train_iters=20", f"logging.metrics_file={straight}", *extra])
    save, m1 = tmp_path / "ckpt", tmp_path / "part1.jsonl"
    proc = apprun.start(nproc, ["train.train_iters=20", "checkpoint.save_interval=10", f"checkpoint.save={save}",
                                f"logging.metrics_file={m1}", *extra])
    # kill -9 (the whole process group) once iteration 12 ran, i.e. after the save at 10 completed
    apprun.wait_until(proc, lambda: 12 in apprun.losses(m1) and (save / "latest").exists())
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert (save / "latest").read_text().strip() == "iter_0000010"
    return apprun.losses(straight), save


@pytest.mark.parametrize("nproc, extra", [(1, []), (2, ["parallel.pipeline_model_parallel_size=2"]),
                                          (1, ["checkpoint.async_save=true"])],
                         ids=["pp1", "pp2", "pp1_async_save"])
def test_exact_resume_after_kill9(tmp_path, nproc, extra):
    straight, save = _straight_and_killed(tmp_path, nproc, extra)
    m2 = tmp_path / "part2.jsonl"
    p = apprun.run(nproc, ["train.train_iters=20", f"checkpoint.save={save}", f"checkpoint.load={save}",
                           f"logging.metrics_file={m2}", *extra])
    resumed = apprun.losses(m2)
    assert sorted(resumed) == list(range(11, 21)), p.stdout[-2000:]
    assert (p.stdout + p.stderr).count("resumed from") == 1  # once, from rank 0 (issue 10)
    for i in range(11, 21):
        assert abs(resumed[i] - straight[i]) <= 1e-6 * abs(straight[i]), (i, resumed[i], straight[i])


def test_resume_with_a_different_layout(tmp_path):
    """Saved at PP=2, resumed at TP=2: same losses within fp32 tolerance (optimizer resharded)."""
    straight, save = _straight_and_killed(tmp_path, 2, ["parallel.pipeline_model_parallel_size=2"])
    m2 = tmp_path / "tp2.jsonl"
    apprun.run(2, ["train.train_iters=20", f"checkpoint.save={save}", f"checkpoint.load={save}",
                   f"logging.metrics_file={m2}", "parallel.tensor_model_parallel_size=2"])
    resumed = apprun.losses(m2)
    assert sorted(resumed) == list(range(11, 21))
    for i in range(11, 21):
        assert abs(resumed[i] - straight[i]) <= 1e-4 * abs(straight[i]), (i, resumed[i], straight[i])


def test_crash_during_save_keeps_previous_checkpoint(tmp_path):
    save, m = tmp_path / "ckpt", tmp_path / "m.jsonl"
    p = apprun.run(1, ["train.train_iters=20", "checkpoint.save_interval=10", f"checkpoint.save={save}",
                       f"logging.metrics_file={m}"], check=False,
                   extra_env={"SPLITLLAMA_FAULT_KILL_IN_SAVE": "20"})
    assert p.returncode != 0  # killed while writing iteration 20
    assert (save / "latest").read_text().strip() == "iter_0000010"
    assert (save / "iter_0000020.tmp").is_dir() and not (save / "iter_0000020").exists()
    assert dirs.resolve(str(save)).endswith("iter_0000010")
    m2 = tmp_path / "m2.jsonl"
    p = apprun.run(1, ["train.train_iters=20", f"checkpoint.save={save}", f"checkpoint.load={save}",
                       f"logging.metrics_file={m2}"])
    assert sorted(apprun.losses(m2)) == list(range(11, 21))
    assert (save / "latest").read_text().strip() == "iter_0000020" and dirs.is_complete(str(save / "iter_0000020"))
    assert not (save / "iter_0000020.tmp").exists()


@pytest.mark.parametrize("nproc", [1, 2], ids=["python", "torchrun_pp2"])
def test_sigterm_saves_exits_zero_and_resume_continues(tmp_path, nproc):
    """SIGTERM to the training processes (a plain python run, or torchrun's workers — which
    is what SLURM / the launch scripts deliver) -> checkpoint at the current iteration,
    exit 0, and a resumed run continues the count."""
    pp = ["parallel.pipeline_model_parallel_size=2"] if nproc == 2 else []
    save, m1 = tmp_path / "ckpt", tmp_path / "m1.jsonl"
    proc = apprun.start(nproc, ["train.train_iters=200", f"checkpoint.save={save}",
                                f"logging.metrics_file={m1}", *pp])
    apprun.wait_until(proc, lambda: 5 in apprun.losses(m1))
    targets = [proc.pid] if nproc == 1 else [c.pid for c in psutil.Process(proc.pid).children()]
    assert len(targets) == nproc
    for pid in targets:
        os.kill(pid, signal.SIGTERM)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-3000:]
    done = max(apprun.losses(m1))
    assert f"[signal] checkpoint saved at iteration {done}" in out
    assert (save / "latest").read_text().strip() == dirs.iter_dirname(done)
    m2 = tmp_path / "m2.jsonl"
    apprun.run(nproc, [f"train.train_iters={done + 3}", f"checkpoint.save={save}", f"checkpoint.load={save}",
                       f"logging.metrics_file={m2}", *pp])
    assert sorted(apprun.losses(m2)) == [done + 1, done + 2, done + 3]


def test_checkpoint_loads_under_other_layouts_with_equal_eval_loss(tmp_path):
    """Saved with PP=2 (cost plan), evaluated at PP=2, PP=4 (uniform) and TP=2xPP=2."""
    save = tmp_path / "ckpt"
    apprun.run(2, ["train.train_iters=5", f"checkpoint.save={save}", "parallel.pipeline_model_parallel_size=2"])
    vals = {}
    for nproc, extra in ((2, ["parallel.pipeline_model_parallel_size=2"]),
                         (4, ["parallel.pipeline_model_parallel_size=4"]),
                         (4, ["parallel.pipeline_model_parallel_size=2", "parallel.tensor_model_parallel_size=2"])):
        p = apprun.run(nproc, [f"checkpoint.load={save}", "train.eval_only=true", "train.eval_iters=2", *extra])
        line = [ln for ln in p.stdout.splitlines() if ln.startswith('{"eval_loss"')]
        assert len(line) == 1, p.stdout[-2000:]
        vals[" ".join(extra)] = json.loads(line[0])["eval_loss"]
    ref = next(iter(vals.values()))
    assert all(abs(v - ref) <= 1e-5 * ref for v in vals.values()), vals


def test_non_finite_steps_are_skipped_then_stop(tmp_path):
    """NaN loss/gradients (injected at chosen iterations) skip the update and are counted;
    too many in a row stop the run with a clear message."""
    m = tmp_path / "m.jsonl"
    apprun.run(1, ["train.train_iters=6", f"logging.metrics_file={m}"], extra_env={"SPLITLLAMA_FAULT_NAN_ITERS": "3"})
    recs = {r["iteration"]: r for r in apprun.metrics(m)}
    assert recs[3]["loss"] != recs[3]["loss"] and recs[3]["grad_norm"] is None  # NaN, no update
    assert recs[2]["skipped_iterations"] == 0 and recs[6]["skipped_iterations"] == 1
    assert all(recs[i]["loss"] == recs[i]["loss"] for i in (4, 5, 6))  # training went on, finite
    p = apprun.run(1, ["train.train_iters=10", "train.max_consecutive_skipped=3"], check=False,
                   extra_env={"SPLITLLAMA_FAULT_NAN_ITERS": "4,5,6"})
    assert p.returncode != 0
    assert "stopping: 3 iterations in a row had non-finite loss/gradients" in p.stderr + p.stdout


def test_checkpoint_model_config_is_used_and_conflicts_refused(tmp_path):
    save = tmp_path / "ckpt"
    apprun.run(1, ["train.train_iters=2", "model.num_layers_upper=2", "model.mlp=true", f"checkpoint.save={save}"])
    saved = json.loads((save / "iter_0000002" / dirs.MODEL_CONFIG).read_text())
    assert (saved["num_layers_upper"], saved["mlp"]) == (2, True)
    # configs/tiny.yaml sets model.num_layers_upper: 3 explicitly -> one clear error
    p = apprun.run(1, [f"checkpoint.load={save}", "train.eval_only=true"], check=False)
    assert p.returncode != 0
    assert p.returncode == 2
    # configs/tiny.yaml sets model.mlp: false too: both differing fields are named, with both values
    assert (f"error: the model section conflicts with the checkpoint {save}: model.num_layers_upper: "
            f"config 3, checkpoint 2; model.mlp: config False, checkpoint True; drop the model section") in p.stderr
    # without a model section the checkpoint's model (2 upper layers, MLP adapter) is built
    cmd = apprun.cmd(1, [])
    cmd = [c for c in cmd if c not in ("--config", "configs/tiny.yaml")]
    import subprocess
    q = subprocess.run(cmd + [f"checkpoint.load={save}", "train.eval_only=true", "data.mock_pattern=true",
                              "data.seq_length=64", "train.micro_batch_size=4", "train.global_batch_size=8"],
                       cwd=apprun.REPO, env=apprun.env(), capture_output=True, text=True, timeout=300)
    assert q.returncode == 0, q.stderr[-3000:]
    assert "U2" in q.stdout and '{"eval_loss"' in q.stdout


def test_activation_recomputation_gives_the_same_losses(tmp_path):
    runs = {}
    for mode in ("null", "full", "selective"):
        m = tmp_path / f"{mode}.jsonl"
        apprun.run(1, ["train.train_iters=3", f"train.recompute_granularity={mode}", f"logging.metrics_file={m}"])
        runs[mode] = apprun.losses(m)
    assert runs["full"] == runs["null"] and runs["selective"] == runs["null"]


def test_attention_backends_give_same_losses(tmp_path):
    """pretrain_splitllama.py --config configs/tiny.yaml with model.attention_backend=local and
    =sdpa: the same losses for the first 10 iterations (≤ 1e-4)."""
    runs = {}
    for backend in ("local", "sdpa"):
        m = tmp_path / f"{backend}.jsonl"
        p = apprun.run(1, ["train.train_iters=10", f"model.attention_backend={backend}", f"logging.metrics_file={m}"])
        assert f"attention: {backend}" in p.stdout
        runs[backend] = apprun.losses(m)
    assert sorted(runs["sdpa"]) == list(range(1, 11))
    for it in range(1, 11):
        assert abs(runs["sdpa"][it] - runs["local"][it]) <= 1e-4, (it, runs["sdpa"][it], runs["local"][it])


def test_packed_sequences_train_at_pp2(tmp_path):
    """data.packed_sequences (variable-length THD packs of whole documents, static packed
    length through the p2p hook) through the whole application at PP=2: the loss falls.
    (Correctness against transformers: tests/distributed/test_packed_parity.py.)"""
    m = tmp_path / "m.jsonl"
    apprun.run(2, ["train.train_iters=12", "data.packed_sequences=true", "train.micro_batch_size=1",
                   "parallel.pipeline_model_parallel_size=2", f"logging.metrics_file={m}"])
    losses = apprun.losses(m)
    assert sorted(losses) == list(range(1, 13))
    assert losses[1] > 6.0 and losses[12] < losses[1] - 0.2, losses
