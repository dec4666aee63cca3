"""launch/torchrun.sh on one node: the tiny config at PP=2 (2 processes, gloo on CPU), its run dir,
and SIGUSR1 to the script -> checkpoint -> exit 0 -> a rerun with the same RUN_DIR resumes with no
gap and no repeat in the iterations."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys

import pytest

from tests import apprun
from tests.launch import REPO

pytestmark = pytest.mark.distributed

ITERS = 24
ARGS = ["parallel.pipeline_model_parallel_size=2", f"train.train_iters={ITERS}", "train.eval_interval=0",
        "logging.log_interval=1", "optimizer.lr_warmup_iters=2"]


def _iterations(text: str) -> list[int]:
    return [int(n) for n in re.findall(r"^iter\s+(\d+)/\d+ \|", text, re.M)]


def test_torchrun_sh_pp2_signal_and_resume(tmp_path):
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_", "SLURM_", "SPLITLLAMA_HOME",
                                "RUN_DIR", "CKPT_DIR", "INIT_CKPT"))}
    env.update(NPROC="2", CONFIG="configs/tiny.yaml", RUN_ROOT=str(tmp_path), RUN_NAME="pp2",
               PYTHON=sys.executable, OMP_NUM_THREADS="1")
    run_dir, cmd = tmp_path / "pp2", [str(REPO / "launch/torchrun.sh"), *ARGS]
    log = run_dir / "train.log"

    first = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out, _ = apprun.signal_when(first, lambda: any(i >= 3 for i in _iterations(log.read_text() if log.exists() else "")),
                                signal.SIGUSR1, "iteration 3", timeout=120)
    assert first.returncode == 0, out[-5000:]
    assert f"run dir: {run_dir}" in out
    assert re.search(r"^pipeline layout: \S+\|\S+ \| tp=1 pp=2 dp=1 ", out, re.M), out[-5000:]
    saved = [int(k) for k in re.findall(r"^\[signal\] checkpoint saved at iteration (\d+) ", out, re.M)]
    assert len(saved) == 1 and saved[0] < ITERS, out[-5000:]
    k = saved[0]
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == f"iter_{k:07d}"

    second = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=180)
    assert second.returncode == 0, second.stdout[-5000:] + second.stderr[-3000:]
    assert f"resumed from {run_dir}/checkpoints/iter_{k:07d} at iteration {k}" in second.stdout
    assert f"done: {ITERS - k} iterations this run" in second.stdout
    # one log for both runs: iterations 1..ITERS once each
    assert _iterations(log.read_text()) == list(range(1, ITERS + 1))
    metrics = [json.loads(ln)["iteration"] for ln in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert metrics == list(range(1, ITERS + 1))
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == f"iter_{ITERS:07d}"
