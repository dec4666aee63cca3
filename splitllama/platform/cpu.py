"""CPU harness: run Megatron-Core's real code paths on CPU with the gloo backend.

Megatron-Core assumes CUDA in many places (``torch.cuda.current_device()`` as a device,
``device="cuda"`` literals, ``.cuda()``, CUDA RNG state, streams/events, and dtype checks by
type string such as ``param.type() == 'torch.cuda.FloatTensor'``). `enable()` redirects each
of these to the CPU: the attribute patches in `PATCHES` (each naming the version it was
written for) plus a torch-function mode that rewrites CUDA device arguments. It is switched on
(by `platform.dist.init_distributed`) only when no GPU is present or when asked for with
``SPLITLLAMA_DEVICE=cpu``.

`enable()` checks every target exists in the installed torch / megatron-core (one error
naming the missing ``module.attr`` and the installed version), records every original and
returns a `Harness`; `Harness.disable()` (or leaving ``with cpu.enable():``) restores every
one. Enabling while enabled counts: the originals come back when the last handle is disabled.
The device code runs on is `platform.device.device()`, not this module.

Use it as a feature: a CPU smoke run of a real config's code path before booking GPUs.
"""
from __future__ import annotations

import contextlib
import os

import torch
import torch.overrides
from torch.overrides import TorchFunctionMode

from splitllama.platform import patching
from splitllama.platform.patching import Patch, Requirement

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


class _Inert:
    """A CUDA object on CPU: every call returns at once (nothing runs asynchronously on CPU)."""

    def __init__(self, *a, **k):
        pass

    def _nothing(self, *a, **k):
        pass

    synchronize = _nothing


class _Event(_Inert):
    record = wait = _Inert._nothing

    def query(self):
        return True

    def elapsed_time(self, other):
        return 0.0


class _Stream(_Inert):
    wait_stream = wait_event = _Inert._nothing

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


def _causal_mask(sq: int) -> torch.Tensor:
    return torch.triu(torch.ones(sq, sq, device="cpu"), diagonal=1).bool()


def _const(value):
    return lambda: value


def _zero():
    return lambda *a, **k: 0


_TORCH = "torch 2.13.0"
_MCORE = "megatron-core 0.16.1"
_NO_GPU = "no CUDA device: a no-op on CPU"
_RNG = "Megatron's model-parallel RNG tracker keeps CUDA generator states; a CPU stand-in generator"
_MASK = ("causal masks are built with a literal device='cuda'; under activation recomputation that "
         "code runs inside autograd's backward, where no torch-function mode is active")

# Read, not patched: disable() makes sure the harness's mode is the innermost before popping it.
REQUIRES = (Requirement("torch.overrides._get_current_function_mode_stack", _TORCH,
                        "disable() checks that the harness's torch-function mode is the innermost"),)

# The attribute patches of the harness: (target, version written for, why, replacement factory).
PATCHES: tuple[Patch, ...] = (
    Patch("torch.cuda.current_device", _TORCH, "Megatron uses it as the device of new tensors",
          lambda: (lambda: torch.device("cpu"))),
    Patch("torch.cuda.set_device", _TORCH, _NO_GPU, _noop_factory),
    Patch("torch.cuda.synchronize", _TORCH, _NO_GPU, _noop_factory),
    Patch("torch.cuda.empty_cache", _TORCH, _NO_GPU, _noop_factory),
    Patch("torch.cuda.Event", _TORCH, "timers and DDP overlap record CUDA events", _const(_Event)),
    Patch("torch.cuda.Stream", _TORCH, "DDP / checkpointing create side streams", _const(_Stream)),
    Patch("torch.cuda.current_stream", _TORCH, _NO_GPU, lambda: (lambda *a, **k: _Stream())),
    Patch("torch.cuda.default_stream", _TORCH, _NO_GPU, lambda: (lambda *a, **k: _Stream())),
    Patch("torch.cuda.stream", _TORCH, _NO_GPU, lambda: (lambda *a, **k: contextlib.nullcontext())),
    *(Patch(f"torch.cuda.{name}", _TORCH, "memory reports: 0 bytes of GPU memory on CPU", _zero)
      for name in ("memory_allocated", "max_memory_allocated", "memory_reserved", "max_memory_reserved")),
    Patch("torch.cuda.reset_peak_memory_stats", _TORCH, _NO_GPU, _noop_factory),
    Patch("torch.cuda.get_rng_state", _TORCH, _RNG,
          lambda: (lambda *a, **k: _FAKE_CUDA_GEN.get_state())),
    Patch("torch.cuda.set_rng_state", _TORCH, _RNG,
          lambda: (lambda state, *a, **k: _FAKE_CUDA_GEN.set_state(state))),
    Patch("torch.cuda.manual_seed", _TORCH, _RNG, _const(_manual_seed)),
    Patch("torch.cuda.manual_seed_all", _TORCH, _RNG, lambda: (lambda seed: _manual_seed(seed))),
    Patch("torch.cuda.nvtx.range_push", _TORCH, "profiling ranges: no NVTX on CPU", _noop_factory),
    Patch("torch.cuda.nvtx.range_pop", _TORCH, "profiling ranges: no NVTX on CPU", _noop_factory),
    Patch("torch.nn.Module.cuda", _TORCH, "Megatron moves modules with .cuda()",
          lambda: (lambda self, *a, **k: self)),
    Patch("megatron.core.tensor_parallel.random._get_cuda_rng_state", _MCORE, _RNG,
          _const(_get_rng_state)),
    Patch("megatron.core.tensor_parallel.random._set_cuda_rng_state", _MCORE, _RNG,
          _const(_set_rng_state)),
    Patch("megatron.core.transformer.utils.get_default_causal_mask", _MCORE, _MASK,
          _const(_causal_mask)),
    Patch("megatron.core.fusions.fused_softmax.get_default_causal_mask", _MCORE, _MASK,
          _const(_causal_mask)),
)


class Harness:
    """One `enable()`; `disable()` (idempotent) or leaving the `with` block releases it."""

    def __init__(self) -> None:
        self.active = True

    def disable(self) -> None:
        if self.active:
            self.active = False
            _release()

    def __enter__(self) -> "Harness":
        return self

    def __exit__(self, *exc) -> bool:
        self.disable()
        return False


_users = 0
_applied: "patching.Applied | None" = None
_mode: "_CpuDeviceMode | None" = None


def active() -> bool:
    """Is the harness enabled in this process?"""
    return _users > 0


def enable() -> Harness:
    """Check every target, install the redirections (recording the originals) and return a
    handle that restores them. Call before building Megatron objects."""
    global _users, _applied, _mode
    if _users == 0:
        patching.check(REQUIRES)
        _applied = patching.apply(PATCHES)
        _mode = _CpuDeviceMode()
        _mode.__enter__()
    _users += 1
    return Harness()


def _release() -> None:
    global _users, _applied, _mode
    _users -= 1
    if _users > 0:
        return
    stack = torch.overrides._get_current_function_mode_stack()
    if not stack or stack[-1] is not _mode:
        raise RuntimeError("CPU harness: another torch function mode was entered after enable() "
                           "and is still active; exit it before disabling the harness")
    _mode.__exit__(None, None, None)
    _applied.restore()
    _applied = _mode = None


