"""megatron.core's compiled dataset helpers: present, or built by ensure_helpers.

The compile test needs pybind11 and g++ (skipped otherwise) and takes ~20 s.
"""
from __future__ import annotations

import os

import pytest


def test_helpers_import():
    from splitllama.data.helpers import ensure_helpers, helpers_available

    ensure_helpers()
    assert helpers_available()


@pytest.mark.slow
def test_helpers_compile_fallback(tmp_path):
    """Where helpers_cpp is missing, ensure_helpers builds helpers.cpp and GPTDataset works."""
    pytest.importorskip("pybind11")
    import shutil
    import subprocess
    import sys

    if shutil.which(os.environ.get("CXX", "g++")) is None:
        pytest.skip("no C++ compiler")
    script = f"""
import sys, numpy
sys.modules["megatron.core.datasets.helpers_cpp"] = None  # as if the wheel lacked it
from splitllama.data.helpers import ensure_helpers, helpers_available
assert not helpers_available()
ensure_helpers({str(tmp_path)!r})
from megatron.core.datasets import helpers
assert helpers.build_sample_idx.__module__ and helpers_available()
idx = helpers.build_sample_idx(numpy.array([5, 7], numpy.int32), numpy.array([0, 1], numpy.int32),
                               4, 1, 12, True, True)
print(idx.tolist())
"""
    out = subprocess.run([sys.executable, "-W", "ignore", "-c", script], capture_output=True,
                         text=True, env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[[0, 0], [0, 4], [1, 3]]"
    assert any(name.startswith("helpers_cpp") for name in os.listdir(tmp_path))
