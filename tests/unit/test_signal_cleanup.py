"""No signal handler outlives its command; preprocessing cleans up after SIGTERM and after a
killed run.

The hang this guards against (issue 21): `convert/cli.py` installed a process-wide SIGTERM
handler that raised SystemExit and never removed it; a later `preprocess_jsonl(workers=2)` in
the same process forked pool workers that inherited it, `Pool.terminate()`'s SIGTERM made one
of them raise inside the pool's queue lock, and `Pool.terminate()` waited forever
(reproduced: hung at the 12th of 300 calls with the handler installed; 0 hangs without it).
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from splitllama.data.preprocess import TokenizerSpec, preprocess_jsonl

REPO = Path(__file__).resolve().parents[2]


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": str(REPO)}


def test_convert_cli_restores_the_sigterm_handler(tmp_path):
    from splitllama.convert.cli import main

    before = signal.getsignal(signal.SIGTERM)
    assert main(["inspect", str(tmp_path / "missing")]) == 2  # an input error: one line, exit 2
    assert signal.getsignal(signal.SIGTERM) is before
    assert main(["export-hf", "--ckpt", str(tmp_path / "missing"), "--out", str(tmp_path / "o")]) == 2
    assert signal.getsignal(signal.SIGTERM) is before


_HANG_SCRIPT = r"""
import os, signal, sys, tempfile
from splitllama.platform.lifecycle import terminate_unwinds
from splitllama.data.preprocess import TokenizerSpec, preprocess_jsonl
terminate_unwinds().__enter__()  # a raising SIGTERM handler left installed by an earlier command
for i in range(25):
    d = tempfile.mkdtemp(dir=sys.argv[1])
    src = os.path.join(d, "in.jsonl")
    with open(src, "w") as f:
        f.write('{"text": "1 2"}\n{"txt": "3"}\n')
    try:
        preprocess_jsonl(src, os.path.join(d, "o"), TokenizerSpec("null", vocab_size=10), workers=2,
                         progress=False)
    except ValueError:
        pass
    assert os.listdir(d) == ["in.jsonl"], os.listdir(d)
print("done", flush=True)
"""


def test_preprocess_pool_ends_despite_a_leaked_raising_handler(tmp_path):
    """Before the fix this hung within ~12 calls (the workers inherited the raising handler)."""
    try:
        proc = subprocess.run([sys.executable, "-c", _HANG_SCRIPT, str(tmp_path)], env=_env(), cwd=REPO,
                              capture_output=True, text=True, timeout=240)
    except subprocess.TimeoutExpired:
        pytest.fail("preprocess_jsonl(workers=2) hung with a raising SIGTERM handler installed")
    assert proc.returncode == 0 and "done" in proc.stdout, proc.stderr[-3000:]


def _big_input(path: Path, lines: int = 400_000) -> None:
    row = json.dumps({"text": " ".join(str(i) for i in range(40))}) + "\n"
    with open(path, "w") as f:
        f.write(row * lines)


def test_preprocess_sigterm_removes_its_partial_files(tmp_path):
    src = tmp_path / "in.jsonl"
    _big_input(src)
    out = tmp_path / "o"
    cmd = [sys.executable, str(REPO / "tools" / "preprocess_data.py"), "--input", str(src),
           "--output-prefix", str(out), "--tokenizer-type", "null", "--vocab-size", "100",
           "--workers", "2", "--no-progress"]
    proc = subprocess.Popen(cmd, env=_env(), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        t0 = time.time()
        while not any(".tmp" in p for p in os.listdir(tmp_path)):
            assert proc.poll() is None, f"ended before writing (exit {proc.returncode}): {proc.communicate()}"
            assert time.time() - t0 < 180, "no temporary output appeared within 180 s"
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 128 + signal.SIGTERM, err[-3000:]
    assert "error: terminated by signal 15" in err
    assert sorted(os.listdir(tmp_path)) == ["in.jsonl"]


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_preprocess_removes_a_killed_runs_temporaries_only(tmp_path):
    src = tmp_path / "in.jsonl"
    src.write_text('{"text": "1 2"}\n')
    final = tmp_path / "o_text_document"
    dead, alive = _dead_pid(), os.getppid()
    killed = [f"{final}.tmp{dead}.bin", f"{final}.tmp{dead}.idx", f"{final}.tmp{dead}_values.bin"]
    kept = [f"{final}.tmp{alive}.bin", f"{final}.tmpnotapid.bin", f"{tmp_path}/other.tmp{dead}.bin"]
    for path in killed + kept:
        Path(path).write_bytes(b"partial")
    stats = preprocess_jsonl(str(src), str(tmp_path / "o"), TokenizerSpec("null", vocab_size=10),
                             progress=False)
    assert stats.stale_removed == tuple(sorted(killed))
    assert all(not os.path.exists(p) for p in killed)
    assert all(os.path.exists(p) for p in kept)  # a live run's files and foreign names are left alone
    assert f"removed {killed[0]} (partial output of a killed run)" in stats.summary()
    assert stats.documents == 1
