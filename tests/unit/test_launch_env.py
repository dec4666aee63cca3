"""`launch_env.rank()`: the one answer to "which rank am I" before the process group starts,
used by the error lines (rank 0 only) and the logging set-up."""
from __future__ import annotations

import pytest

from splitllama import errors, launch_env


@pytest.mark.parametrize("env, want", [({}, 0), ({"RANK": "3"}, 3), ({"SLURM_PROCID": "2"}, 2),
                                       ({"RANK": "1", "SLURM_PROCID": "5"}, 1), ({"RANK": ""}, 0),
                                       ({"RANK": "x", "SLURM_PROCID": "4"}, 4)])
def test_rank_from_the_launcher(monkeypatch, env, want):
    for var in ("RANK", "SLURM_PROCID"):
        monkeypatch.delenv(var, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    assert launch_env.rank() == want


def test_error_line_only_from_rank_zero_also_under_srun(monkeypatch, capsys):
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.setenv("SLURM_PROCID", "1")
    assert errors.report(ValueError("bad value")) == errors.EXIT_USAGE
    assert capsys.readouterr().err == ""
    monkeypatch.setenv("SLURM_PROCID", "0")
    errors.report(ValueError("bad value"))
    assert capsys.readouterr().err == "error: bad value\n"
