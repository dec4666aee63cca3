"""Registers the `slurm` marker for the real-cluster tests (see .ci/slurm_up.sh)."""


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "slurm: needs a running SLURM cluster with 2 idle nodes (.ci/slurm_up.sh)"
    )
