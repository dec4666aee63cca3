"""Issue 9 end to end (real training runs on CPU/gloo): the data-loss cases check that no
checkpoint file was deleted or rewritten; faults (kill -9 of torchrun's group, SIGTERM without a
save directory, a full disk) end the way docs/reliability.md says."""
from __future__ import annotations

import hashlib
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest

from splitllama.checkpoint import dirs
from tests import apprun

pytestmark = pytest.mark.distributed


def _digest(root: Path) -> dict[str, str]:
    """Every file under the checkpoint iter_ directories -> sha256 (what must never change)."""
    out = {}
    for p in sorted(root.glob("iter_*/**/*")):
        if p.is_file():
            out[str(p.relative_to(root))] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def _error_lines(p) -> list[str]:
    return [ln for ln in (p.stderr + p.stdout).splitlines() if ln.startswith("error:")]


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> tuple[Path, str]:
    """A run that saved iter_2 and iter_4 (shared, copied per test) and its output."""
    root = tmp_path_factory.mktemp("saved") / "ck"
    p = apprun.run(1, ["train.train_iters=4", "checkpoint.save_interval=2", f"checkpoint.save={root}"])
    assert (root / "latest").read_text().strip() == "iter_0000004"
    return root, p.stdout + p.stderr


@pytest.fixture
def ckpt(saved, tmp_path) -> Path:
    dst = tmp_path / "ck"
    shutil.copytree(saved[0], dst)
    return dst


def test_saves_do_not_trigger_megatrons_overwrite_warning(saved):
    """13: the temp directory is empty when Megatron's save starts."""
    assert "Overwriting old incomplete" not in saved[1]


def test_broken_latest_resumes_from_newest_complete_and_keeps_every_checkpoint(ckpt, tmp_path):
    """1: `latest` names an incomplete checkpoint -> resume from iter_4 (said), never from scratch."""
    before = _digest(ckpt)
    (ckpt / "iter_0000006").mkdir()
    (ckpt / "latest").write_text("iter_0000006\n")
    m = tmp_path / "m.jsonl"
    p = apprun.run(1, ["train.train_iters=6", f"checkpoint.save={ckpt}", f"checkpoint.load={ckpt}",
                       f"logging.metrics_file={m}"])
    assert sorted(apprun.losses(m)) == [5, 6], p.stdout[-2000:]
    assert "resuming from the newest complete checkpoint" in p.stdout
    after = _digest(ckpt)
    assert {k: v for k, v in after.items() if k in before} == before  # nothing rewritten or deleted
    assert (ckpt / "latest").read_text().strip() == "iter_0000006" and dirs.is_complete(str(ckpt / "iter_0000006"))


def test_fresh_run_into_a_used_directory_is_refused_unless_told(ckpt, tmp_path):
    """3: a fresh run (lower iterations) into a directory holding iter_2/iter_4 refuses; with
    checkpoint.overwrite=true and keep_last=1 it keeps the checkpoint it just saved (latest)."""
    before = _digest(ckpt)
    p = apprun.run(1, ["train.train_iters=1", f"checkpoint.save={ckpt}", "checkpoint.keep_last=1"], check=False)
    assert p.returncode == 2 and len(_error_lines(p)) == 1, p.stderr[-3000:]
    assert "already holds checkpoints of another run" in _error_lines(p)[0]
    assert _digest(ckpt) == before
    apprun.run(1, ["train.train_iters=1", f"checkpoint.save={ckpt}", "checkpoint.keep_last=1",
                   "checkpoint.overwrite=true"])
    assert (ckpt / "latest").read_text().strip() == "iter_0000001"
    assert dirs.resolve(str(ckpt)).endswith("iter_0000001")  # latest names an existing, complete checkpoint


def test_second_concurrent_writer_is_refused_naming_the_holder(ckpt, tmp_path):
    """2: while a run trains into the directory, a second run refuses (host, pid) and writes nothing."""
    m = tmp_path / "a.jsonl"
    # A must still hold the lock when B starts: on a loaded machine 200 iterations ended (and saved)
    # before B had imported Megatron. A never finishes; it is killed below.
    a = apprun.start(1, ["train.train_iters=100000", f"checkpoint.save={ckpt}", f"checkpoint.load={ckpt}",
                         f"logging.metrics_file={m}"])
    try:
        apprun.wait_until(a, lambda: 6 in apprun.losses(m))
        before = _digest(ckpt)
        b = apprun.run(1, ["train.train_iters=8", f"checkpoint.save={ckpt}", f"checkpoint.load={ckpt}"], check=False)
        assert b.returncode == 2 and len(_error_lines(b)) == 1, b.stderr[-3000:]
        assert f"is in use by another run (host {os.uname().nodename}, pid {a.pid}," in _error_lines(b)[0]
        assert _digest(ckpt) == before
    finally:
        os.killpg(a.pid, signal.SIGKILL)
        a.wait()


def _alive(pids: list[int]) -> list[int]:
    out = []
    for pid in pids:
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                out.append(pid)
        except psutil.NoSuchProcess:
            pass
    return out


def test_workers_die_with_torchrun_on_kill_9_of_its_group(tmp_path):
    """4: `kill -9 -PGID` of torchrun kills its workers too (they run in their own sessions)."""
    m, save = tmp_path / "m.jsonl", tmp_path / "ck"
    proc = apprun.start(2, ["train.train_iters=500", "parallel.pipeline_model_parallel_size=2",
                            f"checkpoint.save={save}", "checkpoint.save_interval=3", f"logging.metrics_file={m}"])
    apprun.wait_until(proc, lambda: 2 in apprun.losses(m))
    workers = [c.pid for c in psutil.Process(proc.pid).children()]
    assert len(workers) == 2 and all(os.getpgid(w) != proc.pid for w in workers)  # own sessions
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    deadline = time.time() + 20
    while _alive(workers) and time.time() < deadline:
        time.sleep(0.2)
    left = _alive(workers)
    for pid in left:
        os.kill(pid, signal.SIGKILL)
    assert not left, f"workers outlived torchrun: {left}"
    n = len(apprun.metrics(m))
    time.sleep(2)
    assert len(apprun.metrics(m)) == n  # nobody trains on


def test_sigterm_without_a_save_directory_says_so_and_exits_nonzero(tmp_path):
    """10: SIGTERM mid-run with no checkpoint.save -> 'NO checkpoint saved', exit 128+15."""
    m = tmp_path / "m.jsonl"
    proc = apprun.start(1, ["train.train_iters=300", f"logging.metrics_file={m}"])
    apprun.wait_until(proc, lambda: 3 in apprun.losses(m))
    os.kill(proc.pid, signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, out[-3000:]
    assert "[signal] SIGTERM at iteration" in out and "NO checkpoint saved (checkpoint.save is not set)" in out


def _tmpfs(path: Path, size: str) -> bool:
    path.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True)
    return r.returncode == 0


@pytest.mark.parametrize("how", ["injected", "tmpfs"])
def test_full_disk_during_save_says_so_and_leaves_no_tmp(tmp_path, how):
    """11: a save that hits a full disk removes its .tmp, says 'no space left on device' in one
    line (exit 1), and the previous checkpoint stays `latest`. `tmpfs`: a real 16 MiB
    filesystem (one 11 MB checkpoint fits, the second does not), where mounting is allowed."""
    env = {}
    if how == "tmpfs":
        save = tmp_path / "small"
        if not _tmpfs(save, "16m"):
            pytest.skip("cannot mount a tmpfs here (not root); the injected case covers the path")
        save = save / "ck"
    else:
        save = tmp_path / "ck"
        env = {"SPLITLLAMA_FAULT_ENOSPC_IN_SAVE": "4"}
    try:
        p = apprun.run(1, ["train.train_iters=4", "checkpoint.save_interval=2", f"checkpoint.save={save}"],
                       check=False, extra_env=env)
        errors = _error_lines(p)
        assert p.returncode == 1 and len(errors) == 1, (p.returncode, p.stderr[-4000:])
        assert errors[0].startswith("error: no space left on device saving the checkpoint of iteration 4")
        assert "removed the partial iter_0000004.tmp; latest still names iter_0000002" in errors[0]
        assert "Traceback" not in p.stderr
        assert sorted(os.listdir(save)) == [".lock", "iter_0000002", "latest"]
        assert dirs.resolve(str(save)).endswith("iter_0000002")
    finally:
        if how == "tmpfs":
            subprocess.run(["umount", str(save.parent)], capture_output=True)


def test_bad_input_under_torchrun_is_one_line_from_rank_0(tmp_path):
    """6: under torchrun (2 ranks) a bad override is one `error:` line, no worker traceback."""
    p = apprun.run(2, ["train.micro_batch_size=0"], check=False, timeout=300)
    errors = _error_lines(p)
    assert p.returncode != 0 and errors == ["error: train.micro_batch_size must be >= 1, got 0"], p.stderr[-4000:]
    assert "splitllama/" not in p.stderr  # no frame of ours: torchrun's own summary only


def _lrs(metrics: Path) -> dict[int, float]:
    import json

    out = {}
    for ln in metrics.read_text().splitlines():
        rec = json.loads(ln)
        if "lr" in rec and "iteration" in rec:
            out[rec["iteration"]] = rec["lr"]
    return out


def test_resume_that_changes_the_lr_schedule_or_batch_is_refused_or_applied_and_said(ckpt, tmp_path):
    """Issue 20 point 2: a changed LR schedule (or global batch) on resume was accepted while the
    checkpoint's lr kept running; now refused naming each key and the override, and with
    checkpoint.override_opt_param_scheduler=true applied, said per key, and saved as run."""
    base = ["train.train_iters=6", f"checkpoint.save={ckpt}", f"checkpoint.load={ckpt}", "logging.log_interval=1"]
    before = _digest(ckpt)
    p = apprun.run(1, base + ["optimizer.lr=0.5", "optimizer.lr_decay_style=linear"], check=False)
    lines = _error_lines(p)
    assert p.returncode == 2 and len(lines) == 1, (p.returncode, p.stderr[-2000:])
    assert "optimizer.lr: checkpoint 0.01, this run 0.5" in lines[0]
    assert "optimizer.lr_decay_style: checkpoint 'cosine', this run 'linear'" in lines[0]
    assert "checkpoint.override_opt_param_scheduler=true" in lines[0]
    p = apprun.run(1, base + ["train.global_batch_size=16"], check=False)
    assert p.returncode == 2 and "train.global_batch_size: checkpoint 8, this run 16" in _error_lines(p)[0]
    assert _digest(ckpt) == before
    m = tmp_path / "m.jsonl"
    p = apprun.run(1, base + ["optimizer.lr=0.5", "optimizer.lr_decay_style=linear", f"logging.metrics_file={m}",
                              "checkpoint.override_opt_param_scheduler=true"])
    assert "resume: optimizer.lr 0.01 (checkpoint) -> 0.5 (applied: checkpoint.override_opt_param_scheduler=true)" in p.stdout
    assert "resume: optimizer.lr_decay_style 'cosine' (checkpoint) -> 'linear'" in p.stdout
    lrs = _lrs(m)
    assert sorted(lrs) == [5, 6] and max(lrs.values()) > 0.1, lrs  # the checkpoint's peak was 0.01
    saved_job = (ckpt / "iter_0000006" / dirs.JOB_CONFIG).read_text()
    assert "lr: 0.5" in saved_job and "lr_decay_style: linear" in saved_job


def test_resume_with_a_longer_run_keeps_the_checkpoints_decay_and_says_so(ckpt, tmp_path):
    """The decay length followed train_iters (lr_decay_iters null): the checkpoint's is kept,
    written into the job (its saved config says lr_decay_iters: 4) and said."""
    p = apprun.run(1, ["train.train_iters=6", f"checkpoint.save={ckpt}", f"checkpoint.load={ckpt}"])
    assert "resume: train.train_iters 4 (checkpoint) -> 6 (this run's value applies)" in p.stdout
    assert "keeps the checkpoint's decay over 4 iterations (optimizer.lr_decay_iters=4)" in p.stdout
    assert "lr_decay_iters: 4" in (ckpt / "iter_0000006" / dirs.JOB_CONFIG).read_text()


def test_latest_naming_a_path_outside_its_root_is_not_followed(ckpt, tmp_path):
    """Issue 20 point 3: `latest` with an absolute path to another run's checkpoint."""
    other = tmp_path / "other"
    shutil.copytree(ckpt, other)
    (ckpt / "latest").write_text(str(other / "iter_0000004") + "\n")
    with pytest.raises(ValueError, match=r"which is not an iter_NNNNNNN directory of"):
        dirs.resolve(str(ckpt))
    (ckpt / "latest").write_text("../other/iter_0000004\n")
    with pytest.raises(ValueError, match=r"'\.\./other/iter_0000004', which is not an iter_NNNNNNN"):
        dirs.resolve(str(ckpt))


def test_ctrl_c_saves_and_exits_130_without_a_traceback(tmp_path):
    """Issue 20 point 4: SIGINT was a KeyboardInterrupt traceback with no checkpoint."""
    ckpt, m = tmp_path / "ck", tmp_path / "m.jsonl"
    proc = apprun.start(1, ["train.train_iters=100000", f"checkpoint.save={ckpt}", f"logging.metrics_file={m}",
                            "logging.log_interval=1"])
    out, _ = apprun.signal_when(proc, lambda: len(apprun.losses(m)) >= 2, signal.SIGINT, "two logged iterations",
                                timeout=300)
    assert proc.returncode == 130, out[-3000:]
    assert "Traceback" not in out and "KeyboardInterrupt" not in out
    assert "[signal] SIGINT: checkpoint saved at iteration" in out
    assert dirs.is_complete(str(ckpt / (ckpt / "latest").read_text().strip()))
