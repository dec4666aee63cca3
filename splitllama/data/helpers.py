"""Make megatron.core's compiled dataset helpers (``helpers_cpp``) importable.

GPTDataset (sample index) and BlendedDataset (blending indices) call C++ functions from
``megatron.core.datasets.helpers_cpp``. The megatron-core wheel ships it prebuilt, so usually
:func:`ensure_helpers` only imports it. Where it is missing (a source checkout, another Python),
Megatron's own ``compile_helpers()`` runs ``make`` in the package directory, which needs a
Makefile the wheel lacks and a writable site-packages. So we compile ``helpers.cpp`` ourselves
with the same flags (``g++ -O3 -shared -std=c++11 -fPIC`` + pybind11 includes) into a build
directory and register the result under the module name megatron imports. That needs ``g++``
and the ``pybind11`` package. Only local rank 0 of each node compiles (atomic rename, so nodes
sharing a filesystem do not clash); the other ranks wait at a barrier and load the result.
"""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import sysconfig
import tempfile

MODULE = "megatron.core.datasets.helpers_cpp"


def helpers_available() -> bool:
    """True when megatron's compiled helpers import."""
    try:
        importlib.import_module(MODULE)
        return True
    except ImportError:
        return False


def compile_helpers_to(out_dir: str) -> str:
    """Compile megatron's ``helpers.cpp`` into ``out_dir``; return the shared library path."""
    import megatron.core.datasets as mds

    try:
        import pybind11
    except ImportError:
        raise RuntimeError(
            "megatron.core.datasets.helpers_cpp is missing and pybind11 is not installed to "
            "build it: pip install pybind11 (and apt-get install -y g++)"
        ) from None
    src = os.path.join(os.path.dirname(mds.__file__), "helpers.cpp")
    if not os.path.isfile(src):
        raise RuntimeError(f"cannot build the dataset helpers: {src} not found")
    os.makedirs(out_dir, exist_ok=True)
    target = os.path.join(out_dir, "helpers_cpp" + sysconfig.get_config_var("EXT_SUFFIX"))
    tmp = f"{target}.tmp{os.getpid()}"
    cmd = [
        os.environ.get("CXX", "g++"), "-O3", "-Wall", "-shared", "-std=c++11", "-fPIC",
        f"-I{pybind11.get_include()}", f"-I{sysconfig.get_paths()['include']}", src, "-o", tmp,
    ]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True)
    except FileNotFoundError:
        raise RuntimeError(f"cannot build the dataset helpers: {cmd[0]} not found "
                           "(apt-get install -y g++)") from None
    if proc.returncode != 0:
        raise RuntimeError(f"building the dataset helpers failed: {' '.join(cmd)}\n{proc.stderr}")
    os.replace(tmp, target)
    return target


def load_helpers_from(path: str) -> None:
    """Import a compiled helpers library under the name megatron expects."""
    spec = importlib.util.spec_from_file_location(MODULE, path)
    if spec is None or spec.loader is None:
        raise RuntimeError(f"cannot load the dataset helpers from {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    sys.modules[MODULE] = module


def ensure_helpers(build_dir: str | None = None) -> None:
    """Import megatron's helpers, compiling them first if needed (collective when distributed).

    Args:
        build_dir: where to put a compiled library (default: ``$TMPDIR/splitllama_helpers``).
    """
    if helpers_available():
        return
    import torch.distributed as dist

    distributed = dist.is_available() and dist.is_initialized()
    local_rank = int(os.environ.get("LOCAL_RANK", dist.get_rank() if distributed else 0))
    out_dir = build_dir or os.path.join(tempfile.gettempdir(), "splitllama_helpers")
    target = os.path.join(out_dir, "helpers_cpp" + sysconfig.get_config_var("EXT_SUFFIX"))
    error: Exception | None = None
    if local_rank == 0 and not os.path.exists(target):
        try:
            compile_helpers_to(out_dir)
        except Exception as err:  # every rank must still reach the barrier
            error = err
    if distributed:
        dist.barrier()
    if error is not None:
        raise error
    if not os.path.exists(target):
        raise RuntimeError(f"dataset helpers were not built at {target} (see local rank 0's log)")
    load_helpers_from(target)
