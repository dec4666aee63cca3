"""CPU harness: run Megatron-Core's real code paths on CPU with the gloo backend.

Megatron-Core assumes CUDA in many places (``torch.cuda.current_device()`` as a device,
``device="cuda"`` literals, ``.cuda()``, CUDA RNG state, streams/events, and dtype checks by
type string such as ``param.type() == 'torch.cuda.FloatTensor'``). `enable()` redirects each
of these to the CPU. It is switched on only when no GPU is present (or when asked for with
``SPLITLLAMA_DEVICE=cpu``), and it is the only place in SplitLlama that patches anything.

Use it as a feature: a CPU smoke run of a real config's code path before booking GPUs.
"""
from __future__ import annotations

import contextlib
import os

import torch
from torch.overrides import TorchFunctionMode

_ENABLED = False
_MODE: "TorchFunctionMode | None" = None
# Stand-in for the CUDA default generator (kept apart from the CPU generator so that
# Megatron's RNG tracker forks do not disturb ordinary CPU randomness).
_FAKE_CUDA_GEN = torch.Generator()

_CUDA_TYPE_NAMES = {
    "torch.FloatTensor": "torch.cuda.FloatTensor",
    "torch.HalfTensor": "torch.cuda.HalfTensor",
    "torch.BFloat16Tensor": "torch.cuda.BFloat16Tensor",
    "torch.DoubleTensor": "torch.cuda.DoubleTensor",
    "torch.LongTensor": "torch.cuda.LongTensor",
    "torch.IntTensor": "torch.cuda.IntTensor",
    "torch.ByteTensor": "torch.cuda.ByteTensor",
    "torch.BoolTensor": "torch.cuda.BoolTensor",
}


def wanted() -> bool:
    """Should this process run on CPU? (no CUDA device, or SPLITLLAMA_DEVICE=cpu)"""
    forced = os.environ.get("SPLITLLAMA_DEVICE", "").lower()
    if forced:
        return forced == "cpu"
    return not torch.cuda.is_available()


def enabled() -> bool:
    return _ENABLED


def _is_cuda_device(d) -> bool:
    if isinstance(d, bool):
        return False
    if isinstance(d, int):
        return True  # a bare ordinal means a CUDA device
    if isinstance(d, str):
        return d.startswith("cuda")
    if isinstance(d, torch.device):
        return d.type == "cuda"
    return False


class _CpuDeviceMode(TorchFunctionMode):
    """Rewrites CUDA device arguments of every torch call to CPU."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if "device" in kwargs and _is_cuda_device(kwargs["device"]):
            kwargs["device"] = "cpu"
        if kwargs.get("pin_memory"):
            kwargs["pin_memory"] = False
        if func is torch.Tensor.to:
            args = tuple("cpu" if i > 0 and _is_cuda_device(a) else a for i, a in enumerate(args))
        elif func is torch.Tensor.cuda or func is torch.Tensor.pin_memory:
            return args[0]
        if getattr(func, "__name__", "") == "apply":
            # torch runs a mode's handler with the mode switched off, so the Python forward of
            # an autograd.Function (e.g. activation recomputation's CheckpointFunction) would
            # otherwise escape the redirection: keep it on inside.
            with self:
                out = func(*args, **kwargs)
        else:
            out = func(*args, **kwargs)
        if func is torch.Tensor.type and len(args) == 1 and not kwargs and isinstance(out, str):
            return _CUDA_TYPE_NAMES.get(out, out)
        return out


class _Event:
    def __init__(self, *a, **k):
        pass

    def record(self, *a, **k):
        pass

    def synchronize(self):
        pass

    def wait(self, *a, **k):
        pass

    def query(self):
        return True

    def elapsed_time(self, other):
        return 0.0


class _Stream:
    def __init__(self, *a, **k):
        pass

    def synchronize(self):
        pass

    def wait_stream(self, *a, **k):
        pass

    def wait_event(self, *a, **k):
        pass

    def record_event(self, *a, **k):
        return _Event()

    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


def _noop_factory():
    # A distinct function per patched attribute: torch._dynamo's trace rules refuse one
    # function object registered under several torch names.
    def _noop(*a, **k):
        return None

    return _noop


def _get_rng_state(device="cuda", clone=False, graph_safe=False):
    return _FAKE_CUDA_GEN.get_state()


def _set_rng_state(new_state, device=-1, graph_safe=False):
    _FAKE_CUDA_GEN.set_state(new_state)


def _manual_seed(seed):
    _FAKE_CUDA_GEN.manual_seed(int(seed))


def enable() -> None:
    """Install the redirections (idempotent). Call before building Megatron objects."""
    global _ENABLED, _MODE
    if _ENABLED:
        return
    cuda = torch.cuda
    cuda.current_device = lambda: torch.device("cpu")
    cuda.set_device = _noop_factory()
    cuda.synchronize = _noop_factory()
    cuda.empty_cache = _noop_factory()
    cuda.Event = _Event
    cuda.Stream = _Stream
    cuda.current_stream = lambda *a, **k: _Stream()
    cuda.default_stream = lambda *a, **k: _Stream()
    cuda.stream = lambda *a, **k: contextlib.nullcontext()
    for name in ("memory_allocated", "max_memory_allocated", "memory_reserved",
                 "max_memory_reserved"):
        setattr(cuda, name, (lambda: (lambda *a, **k: 0))())
    cuda.reset_peak_memory_stats = _noop_factory()
    cuda.get_rng_state = lambda *a, **k: _FAKE_CUDA_GEN.get_state()
    cuda.set_rng_state = lambda state, *a, **k: _FAKE_CUDA_GEN.set_state(state)
    cuda.manual_seed = _manual_seed
    cuda.manual_seed_all = _manual_seed
    cuda.nvtx.range_push = _noop_factory()
    cuda.nvtx.range_pop = _noop_factory()
    torch.nn.Module.cuda = lambda self, *a, **k: self

    from megatron.core.tensor_parallel import random as mrandom

    mrandom._get_cuda_rng_state = _get_rng_state
    mrandom._set_cuda_rng_state = _set_rng_state

    # Causal masks are built with a literal device="cuda"; under activation recomputation that
    # code runs inside autograd's backward, where no torch-function mode is active.
    from megatron.core.fusions import fused_softmax
    from megatron.core.transformer import utils as mutils

    def causal_mask(sq: int) -> torch.Tensor:
        return torch.triu(torch.ones(sq, sq, device="cpu"), diagonal=1).bool()

    mutils.get_default_causal_mask = causal_mask
    fused_softmax.get_default_causal_mask = causal_mask

    _MODE = _CpuDeviceMode()
    _MODE.__enter__()
    _ENABLED = True


def device() -> torch.device:
    """The device tensors of this process live on (CPU under the harness)."""
    return torch.device("cpu") if _ENABLED or not torch.cuda.is_available() else \
        torch.device("cuda", torch.cuda.current_device())
