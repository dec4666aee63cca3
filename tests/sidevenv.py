"""The side venvs the suite drives (.ci/vllm_venv.sh, .ci/verl_venv.sh) and the files they need:
found by environment variable (else the default path), skipped when absent, failed instead when
the matching SPLITLLAMA_REQUIRE_* variable is 1 (as CI sets it)."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import pytest

ROOT = Path(__file__).resolve().parents[1]


def required(path: str, why: str, require: str) -> str:
    """`path` when it exists; else skip with `why`, or fail when `require`=1."""
    if not Path(path).exists():
        if os.environ.get(require) == "1":
            pytest.fail(f"{require}=1 but {why}")
        pytest.skip(why)
    return path


def python(var: str, require: str, default: Optional[str] = None, script: str = "") -> str:
    """The python of the side venv named by environment variable `var` (else ROOT/`default`)."""
    path = os.environ.get(var) or (str(ROOT / default / "bin" / "python") if default else "")
    return required(path, f"no venv at {path!r} ({var}{'; bash ' + script if script else ''})", require)


def vllm_python() -> str:
    return python("SPLITLLAMA_VLLM_PYTHON", "SPLITLLAMA_REQUIRE_VLLM", ".venv-vllm", ".ci/vllm_venv.sh")


def verl_python() -> str:
    return python("SPLITLLAMA_VERL_PYTHON", "SPLITLLAMA_REQUIRE_VERL", ".venv-verl", ".ci/verl_venv.sh")
