"""Run pretrain_splitllama.py (plain python or torchrun) from tests and read its metrics."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Optional

from tests.launch import REPO

BASE = ["--config", "configs/tiny.yaml", "logging.log_interval=1", "train.eval_interval=0",
        "logging.progress=false"]


def cmd(nproc: int, overrides: list[str]) -> list[str]:
    entry = [str(REPO / "pretrain_splitllama.py"), *BASE, *overrides]
    if nproc == 1:
        return [sys.executable, *entry]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", *entry]


def env() -> dict:
    return {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def run(nproc: int, overrides: list[str], timeout: int = 600, check: bool = True,
        extra_env: Optional[dict] = None) -> subprocess.CompletedProcess:
    p = subprocess.run(cmd(nproc, overrides), cwd=REPO, env={**env(), **(extra_env or {})},
                       capture_output=True, text=True, timeout=timeout)
    if check and p.returncode != 0:
        raise AssertionError(f"training run failed (exit {p.returncode}): {' '.join(overrides)}\n"
                             f"--- stdout ---\n{p.stdout[-4000:]}\n--- stderr ---\n{p.stderr[-8000:]}")
    return p


def start(nproc: int, overrides: list[str], extra_env: Optional[dict] = None) -> subprocess.Popen:
    return subprocess.Popen(cmd(nproc, overrides), cwd=REPO, env={**env(), **(extra_env or {})},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def wait_until(proc: subprocess.Popen, cond: Callable[[], bool], timeout: float = 300) -> None:
    t0 = time.time()
    while not cond():
        if proc.poll() is not None:
            raise AssertionError(f"run ended (exit {proc.returncode}) before the condition:\n"
                                 f"{proc.stdout.read()[-6000:]}")
        if time.time() - t0 > timeout:
            os.killpg(proc.pid, signal.SIGKILL)
            raise AssertionError("timed out waiting for the run")
        time.sleep(0.2)


def signal_when(proc: subprocess.Popen, cond: Callable[[], bool], sig: int, what: str,
                timeout: float = 180, poll: float = 0.2) -> tuple[str, str]:
    """Wait (bounded) until `cond()` while `proc` runs, send it `sig`, and return its
    (stdout, stderr); a process still running afterwards (a failed wait) is killed."""
    try:
        t0 = time.time()
        while not cond():
            assert proc.poll() is None, f"ended before {what} (exit {proc.returncode}):\n{proc.communicate()}"
            assert time.time() - t0 < timeout, f"no {what} within {timeout} s"
            time.sleep(poll)
        proc.send_signal(sig)
        return proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def metrics(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def losses(path: Path) -> dict[int, float]:
    return {r["iteration"]: r["loss"] for r in metrics(path) if "loss" in r}
