"""Smoke test of the CI SLURM cluster: a 2-node sbatch job whose srun tasks do a
gloo all_reduce. Needs .ci/slurm_up.sh to have run (see conftest.py)."""

import re
import socket
import subprocess
import sys
import textwrap


import pytest

pytestmark = pytest.mark.slurm


def _free_port():
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


# Runs once per srun task; rank r contributes r + 1.
ALLREDUCE_PY = textwrap.dedent("""
    import os, torch, torch.distributed as dist
    rank, world = int(os.environ["SLURM_PROCID"]), int(os.environ["SLURM_NTASKS"])
    dist.init_process_group("gloo", init_method="env://", rank=rank, world_size=world)
    t = torch.tensor([float(rank + 1)])
    dist.all_reduce(t)
    print(f"node={os.environ['SLURMD_NODENAME']} rank={rank} sum={t.item():g}", flush=True)
    dist.destroy_process_group()
""")

# MASTER_ADDR: first node of the allocation, resolved via /etc/hosts (n1 -> 127.0.0.2).
BATCH_SH = """#!/bin/bash
set -euo pipefail
head=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -1)
export MASTER_ADDR=$(getent hosts "$head" | awk '{{print $1; exit}}')
export MASTER_PORT={port}
echo "head=$head MASTER_ADDR=$MASTER_ADDR"
srun --kill-on-bad-exit=1 {python} {script}
"""


def test_two_node_gloo_allreduce(tmp_path):
    (tmp_path / "allreduce.py").write_text(ALLREDUCE_PY)
    (tmp_path / "job.sh").write_text(BATCH_SH.format(
        port=_free_port(), python=sys.executable, script=tmp_path / "allreduce.py"))
    out = tmp_path / "job.out"
    proc = subprocess.run(
        ["sbatch", "--wait", "-N", "2", "--ntasks-per-node=1", "--time=2",
         "--job-name=ci-smoke", f"--chdir={tmp_path}", f"--output={out}",
         str(tmp_path / "job.sh")],
        capture_output=True, text=True, timeout=120)
    log = out.read_text() if out.exists() else ""
    assert proc.returncode == 0, f"sbatch rc={proc.returncode}\n{proc.stderr}\n{log}"
    results = dict(re.findall(r"node=(\S+) rank=\d+ sum=(\S+)", log))
    assert set(results) == {"n1", "n2"}, log
    assert all(float(v) == 3.0 for v in results.values()), log  # 1 + 2
