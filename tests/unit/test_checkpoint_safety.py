"""Issue 9, items 1-3, 5, 7, 8 and 13 (converter debris) at the unit level: the restricted
`.metadata` reader never runs planted code, damaged checkpoints are one clear error, the save
directory lock names its holder, the resume / overwrite decisions never start from scratch
over checkpoints, pruning keeps `latest`."""
from __future__ import annotations

import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from splitllama.checkpoint import dirs
from splitllama.checkpoint.dcp_metadata import CheckpointMetadataError, read_metadata
from splitllama.checkpoint.lock import CheckpointDirLocked, DirLock
from splitllama.config.train import CheckpointConfig
from splitllama.convert.cli import main as convert_main
from splitllama.convert.import_hf import import_hf
from splitllama.errors import UsageError
from splitllama.training.resume import guard_save_dir, resolve_resume
from tests.distributed.convert_worker import make_sources


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("safety")
    make_sources(root)
    out = root / "ckpt"
    import_hf(str(root / "lower"), str(root / "upper"), 2, 3, str(out), dtype="fp32", progress=False)
    return out


@pytest.fixture
def ckpt(converted, tmp_path) -> Path:
    dst = tmp_path / "ckpt"
    shutil.copytree(converted, dst)
    return dst


def _iter_dir(root: Path) -> Path:
    return root / (root / "latest").read_text().strip()


def _one_error(capsys, rc: int, *needles: str) -> str:
    out = capsys.readouterr()
    lines = [ln for ln in out.err.splitlines() if ln.startswith("error")]  # (library warnings: issue 10)
    assert rc == 2 and len(lines) == 1 and lines[0].startswith("error: "), (rc, out.err[-2000:])
    assert "Traceback" not in out.err + out.out
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


# ---- 5: planted code in .metadata --------------------------------------------------------------
class _Payload:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("cmd", ["inspect", "export-hf"])
def test_planted_metadata_payload_does_not_run(ckpt, tmp_path, capsys, cmd):
    marker = tmp_path / "PWNED"
    it = _iter_dir(ckpt)
    (it / ".metadata").write_bytes(pickle.dumps(_Payload(str(marker))))
    argv = ["inspect", str(ckpt)] if cmd == "inspect" else ["export-hf", "--ckpt", str(ckpt), "--out", str(tmp_path / "hf")]
    line = _one_error(capsys, convert_main(argv), "refusing to load posix.system", "it was not executed")
    assert not marker.exists(), line
    assert not (tmp_path / "hf").exists()


def test_restricted_reader_loads_real_metadata(ckpt):
    md = read_metadata(str(_iter_dir(ckpt)))
    assert "embedding.word_embeddings.weight" in md.state_dict_metadata


def test_dist_reader_has_no_unrestricted_load():
    import inspect

    from splitllama.convert import dist_reader

    src = inspect.getsource(dist_reader)
    assert "pickle.load" not in src and "weights_only=False" not in src and "read_object" not in src


# ---- 7 / 8: damaged checkpoints are one line, exit 2 -----------------------------------------
def _truncate_distcp(it: Path) -> None:
    f = sorted(it.glob("*.distcp"))[0]
    os.truncate(f, f.stat().st_size // 2)


DAMAGE = {  # name: (mutation of the iter dir, text in the error line)
    "corrupt_metadata": (lambda it: (it / ".metadata").write_bytes(b"\x80\x04garbage"), "corrupt checkpoint metadata"),
    "missing_distcp": (lambda it: os.remove(sorted(it.glob("*.distcp"))[0]), ".distcp is missing"),
    "truncated_distcp": (_truncate_distcp, ".distcp is truncated"),
    "corrupt_model_config": (lambda it: (it / dirs.MODEL_CONFIG).write_text("{oops"), "model_config.json: corrupt JSON"),
}


@pytest.mark.parametrize("cmd", ["inspect", "export-hf"])
@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_damaged_checkpoint_is_one_error_line(ckpt, tmp_path, capsys, cmd, damage):
    mutate, text = DAMAGE[damage]
    mutate(_iter_dir(ckpt))
    out = tmp_path / "hf"
    argv = ["inspect", str(ckpt)] if cmd == "inspect" else ["export-hf", "--ckpt", str(ckpt), "--out", str(out)]
    _one_error(capsys, convert_main(argv), text)
    assert not out.exists() and not list(tmp_path.glob("hf.tmp-*"))


def test_inspect_says_it_verified_the_files(ckpt, capsys):
    assert convert_main(["inspect", str(ckpt)]) == 0
    assert "verified: 1 data files present with the sizes the metadata needs" in capsys.readouterr().out


def test_export_of_a_file_names_it(ckpt, tmp_path, capsys):
    f = tmp_path / "file.bin"
    f.write_bytes(b"x")
    _one_error(capsys, convert_main(["export-hf", "--ckpt", str(f), "--out", str(tmp_path / "hf")]),
               "is a file, not a checkpoint directory")


def test_training_load_of_a_truncated_distcp_is_one_line(ckpt, capsys, monkeypatch):
    from splitllama.training import entry, signals

    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setattr(signals, "install", lambda: None)  # keep pytest's own SIGTERM handling
    _truncate_distcp(_iter_dir(ckpt))
    rc = entry.main(["--config", "configs/tiny.yaml", f"checkpoint.load={ckpt}", "checkpoint.finetune=true",
                   "train.eval_only=true"])
    _one_error(capsys, rc, "is damaged", ".distcp is truncated")


def test_import_hf_split_missing_field_is_named(converted, tmp_path, capsys):
    import json

    src = tmp_path / "seed"
    assert convert_main(["export-hf", "--ckpt", str(converted), "--out", str(src), "--no-progress"]) == 0
    cfg = json.loads((src / "config.json").read_text())
    del cfg["num_layers_70"]
    (src / "config.json").write_text(json.dumps(cfg))
    capsys.readouterr()
    _one_error(capsys, convert_main(["import-hf-split", str(src), "--out", str(tmp_path / "o")]),
               "missing field num_layers_70")


# ---- 13: converter debris ----------------------------------------------------------------------
def test_converter_debris_of_a_dead_run_is_removed_a_live_one_named(converted, tmp_path, capsys):
    root = converted.parent
    out = tmp_path / "new"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / f"new.tmp-{dead.pid}").mkdir()
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (tmp_path / f"other.tmp-{live.pid}").mkdir()
        _one_error(capsys, convert_main(["import-hf", "--lower", str(root / "lower"), "--upper", str(root / "upper"),
                                         "--num-layers-lower", "2", "--num-layers-upper", "3", "--no-progress",
                                         "--out", str(tmp_path / "other")]),
                   f"other.tmp-{live.pid} is being written by another conversion (pid {live.pid}")
    finally:
        live.kill()
        live.wait()
    assert convert_main(["import-hf", "--lower", str(root / "lower"), "--upper", str(root / "upper"),
                         "--num-layers-lower", "2", "--num-layers-upper", "3", "--no-progress",
                         "--out", str(out)]) == 0
    assert f"removed {tmp_path}/new.tmp-{dead.pid}" in capsys.readouterr().err
    assert not (tmp_path / f"new.tmp-{dead.pid}").exists() and dirs.is_complete(str(_iter_dir(out)))


_SLOW_CONVERT = """
import sys, time
from splitllama.convert import sources
real = sources.SafetensorsFile.read
def slow(self, *a, **k):
    print("reading", flush=True); time.sleep(0.5); return real(self, *a, **k)
sources.SafetensorsFile.read = slow
from splitllama.convert.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_sigterm_to_the_converter_removes_its_partial_output(converted, tmp_path):
    root, out = converted.parent, tmp_path / "out"
    p = subprocess.Popen([sys.executable, "-c", _SLOW_CONVERT, "import-hf", "--lower", str(root / "lower"),
                          "--upper", str(root / "upper"), "--num-layers-lower", "2", "--num-layers-upper", "3",
                          "--no-progress", "--out", str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True, env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])})
    assert p.stdout.readline().strip() == "reading"
    assert list(tmp_path.glob("out.tmp-*"))  # mid-write
    p.send_signal(15)
    _, err = p.communicate(timeout=60)
    assert p.returncode == 128 + 15 and "error: terminated by signal 15; removing the partial output" in err
    assert not out.exists() and not list(tmp_path.glob("out.tmp-*"))


# ---- 1 / 3: where a run starts ------------------------------------------------------------------
def _complete(root: Path, it: int) -> Path:
    d = root / dirs.iter_dirname(it)
    d.mkdir(parents=True)
    (d / "data").write_text(str(it))
    dirs.mark_complete(str(d))
    return d


def _said():
    lines = []
    return lines, lines.append


def test_resume_or_start_from_an_empty_or_debris_only_dir(tmp_path):
    (tmp_path / "ck" / "iter_0000004.tmp").mkdir(parents=True)  # a crashed first save
    c = CheckpointConfig(save=str(tmp_path / "ck"), load=str(tmp_path / "ck"))
    lines, say = _said()
    c = resolve_resume(c, say)
    assert c.load is None and "starting from scratch" in lines[0]
    guard_save_dir(c)  # nothing to protect


def test_broken_latest_falls_back_to_the_newest_complete(tmp_path):
    root = tmp_path / "ck"
    _complete(root, 2)
    four = _complete(root, 4)
    (root / "iter_0000006").mkdir()  # no COMPLETE marker
    (root / "latest").write_text("iter_0000006\n")
    c = CheckpointConfig(save=str(root), load=str(root))
    lines, say = _said()
    c = resolve_resume(c, say)
    assert c.load == str(four)
    assert "iter_0000006, which is not a complete checkpoint" in lines[0] and "newest complete" in lines[0]
    guard_save_dir(c)


def test_no_complete_checkpoint_refuses_to_start_from_scratch(tmp_path):
    root = tmp_path / "ck"
    (root / "iter_0000006").mkdir(parents=True)
    (root / "latest").write_text("iter_0000006\n")
    c = CheckpointConfig(save=str(root), load=str(root))
    with pytest.raises(UsageError, match="holds no complete checkpoint to fall back to; refusing to train from scratch"):
        resolve_resume(c, print)
    c.overwrite = True
    c = resolve_resume(c, print)
    assert c.load is None


@pytest.mark.parametrize("load, finetune", [(None, False), ("other", False), ("other", True), ("same", True)])
def test_a_run_not_resuming_from_save_refuses_a_used_dir(tmp_path, load, finetune):
    root = tmp_path / "ck"
    _complete(root, 20)
    (root / "latest").write_text("iter_0000020\n")
    other = tmp_path / "other"
    _complete(other, 5)
    (other / "latest").write_text("iter_0000005\n")
    path = {None: None, "other": str(other), "same": str(root)}[load]
    c = CheckpointConfig(save=str(root), load=path, finetune=finetune)
    with pytest.raises(UsageError, match=r"already holds checkpoints of another run \(1 complete checkpoint, "
                                         r"newest iter_0000020, latest -> iter_0000020\)"):
        guard_save_dir(c)
    c.overwrite = True
    guard_save_dir(c)


def test_resume_from_an_older_checkpoint_refuses_newer_ones(tmp_path):
    root = tmp_path / "ck"
    ten = _complete(root, 10)
    _complete(root, 20)
    (root / "latest").write_text("iter_0000020\n")
    guard_save_dir(CheckpointConfig(save=str(root), load=str(root)))  # resume from latest: fine
    with pytest.raises(UsageError, match=r"holds newer checkpoints \(iter_0000020\)"):
        guard_save_dir(CheckpointConfig(save=str(root), load=str(ten)))


def test_prune_never_deletes_what_latest_names(tmp_path):
    root = tmp_path / "ck"
    for it in (10, 20, 30):
        _complete(root, it)
    five = _complete(root, 5)  # a newer run with lower iteration numbers (overwrite=true)
    (root / "latest").write_text("iter_0000005\n")
    removed = dirs.prune(str(root), 1)
    assert five.is_dir() and dirs.resolve(str(root)) == str(five)
    assert sorted(os.path.basename(p) for p in removed) == ["iter_0000010", "iter_0000020"]


# ---- 2: the save directory lock -----------------------------------------------------------------
_HOLD = "import sys, time; from splitllama.checkpoint.lock import DirLock; DirLock(sys.argv[1]).acquire(); " \
        "print('held', flush=True); time.sleep(60)"


def test_second_writer_is_refused_naming_the_holder(tmp_path):
    import socket

    root = tmp_path / "ck"
    holder = subprocess.Popen([sys.executable, "-c", _HOLD, str(root)], stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])})
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(CheckpointDirLocked, match=rf"in use by another run \(host {socket.gethostname()}, "
                                                      rf"pid {holder.pid}, since "):
            DirLock(str(root)).acquire()
    finally:
        holder.kill()
        holder.wait()
    lock = DirLock(str(root)).acquire()  # the kernel dropped the dead holder's lock
    assert "stale lock" in lock.note and f"pid {holder.pid}" in lock.note
    lock.release()
    again = DirLock(str(root)).acquire()  # a clean release leaves no stale note
    assert again.note is None
    again.release()


def test_lock_without_flock_detects_a_stale_holder(tmp_path, monkeypatch):
    import errno
    import socket

    from splitllama.checkpoint import lock as lock_mod

    def no_flock(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(lock_mod.fcntl, "flock", no_flock)
    root = tmp_path / "ck"
    root.mkdir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (root / ".lock").write_text(f"{socket.gethostname()} {dead.pid} 2026-01-01T00:00:00\n")
    lk = DirLock(str(root)).acquire()
    assert "stale" in lk.note
    lk.release()
    (root / ".lock").write_text(f"otherhost {os.getpid()} 2026-01-01T00:00:00\n")
    with pytest.raises(CheckpointDirLocked, match=r"host otherhost, pid \d+.*no flock, so if that run is dead remove"):
        DirLock(str(root)).acquire()
