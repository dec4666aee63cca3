"""Shared by the real-cluster tests (see .ci/slurm_up.sh): every test here needs a running
SLURM cluster with 2 usable nodes. Without one they skip — or fail, when
SPLITLLAMA_REQUIRE_SLURM=1 (CI), so a cluster that did not come up cannot pass silently."""
import os
import shutil
import subprocess

import pytest


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "slurm: needs a running SLURM cluster with 2 idle nodes (.ci/slurm_up.sh)"
    )


def _usable_nodes() -> set[str]:
    try:  # with no controller sinfo retries for ~9 s: cap it
        out = subprocess.run(["sinfo", "-h", "-N", "-t", "idle,mix,alloc,comp", "-o", "%N"],
                             capture_output=True, text=True, timeout=6)
    except (OSError, subprocess.TimeoutExpired):
        return set()
    return set(out.stdout.split()) if out.returncode == 0 else set()


@pytest.fixture(scope="module", autouse=True)
def _need_cluster():
    why = None
    if shutil.which("sbatch") is None:
        why = "sbatch not on PATH (run .ci/slurm_up.sh)"
    elif len(_usable_nodes()) < 2:
        why = "sinfo shows fewer than 2 usable nodes (run .ci/slurm_up.sh)"
    if why:
        if os.environ.get("SPLITLLAMA_REQUIRE_SLURM") == "1":
            pytest.fail(f"SPLITLLAMA_REQUIRE_SLURM=1 but the SLURM cluster is unavailable: {why}")
        pytest.skip(why)
