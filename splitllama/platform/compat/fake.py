"""What the dry run (`splitllama.dryrun`) relies on to run a real training step on fake tensors
under a fake process group, in ONE process standing for one rank of a W-rank job (torch 2.13.0,
megatron-core 0.16.1). Applied only inside a dry-run worker process (`enable()`), never in
training.

* `REQUIRES`: the fake-tensor tools (`FakeTensorMode`, the "fake" backend's `FakeStore`,
  `MemTracker` and its per-op peak update), torch's FakeWork factory for collectives on meta /
  fake tensors, and Megatron's `_init_optimizer_states_with_dummy_values` (the optimizer state
  of a step >= 2, without running step 1).
* `PATCHES`: object collectives cannot carry objects over a fake group, so
  `torch.distributed.all_gather_object` answers as if every rank held this rank's object
  (Megatron only checks that all ranks have the same param-group keys: true for the
  representative rank's peers); Megatron's CPU fallback l2 norm builds a tensor from Python
  floats (`torch.tensor([norms])` reads data), replaced by the same norm on tensors.
* `register_coalesced_meta()`: torch registers Meta kernels for the c10d collectives but not for
  the coalesced ones Megatron's DDP bucket reduce-scatter / all-gather use; the same FakeWork
  answer is registered for them.
* `ScalarAnswers`: fake tensors hold no values; a data-dependent ``.item()`` (a grad norm,
  Megatron's RNG-state comparison) answers the tensor's constant when the fake tensor has one
  (tensors built from Python literals, e.g. the attention mask type), else 0 / False. Those
  values only steer control flow (no clipping, no skipped step), never a tensor's size.
* `PeakTracker`: `MemTracker` updates every module's local peak (with a deep copy) on every op;
  the dry run reads only the global peak and its breakdown, so its per-op update keeps just that
  (the module hooks still run; ``reset_mod_stats`` before each micro-batch lets the root module
  run several forwards before their backwards, as 1F1B does).
"""
from __future__ import annotations

from copy import deepcopy

import torch
import torch.distributed as dist
from torch.distributed._tools.mem_tracker import MemTracker
from torch.utils._python_dispatch import TorchDispatchMode

from splitllama.platform import patching
from splitllama.platform.patching import Patch, Requirement

_TORCH = "torch 2.13.0"
_MCORE = "megatron-core 0.16.1"

REQUIRES = (
    Requirement("torch._subclasses.fake_tensor.FakeTensorMode", _TORCH, "tensors without storage"),
    Requirement("torch.testing._internal.distributed.fake_pg.FakeStore", _TORCH,
                "a 'fake' process group of any world size in one process"),
    Requirement("torch.distributed._tools.mem_tracker.MemTracker._update_peak_stats", _TORCH,
                "PeakTracker keeps only the global peak per op"),
    Requirement("torch.distributed._tools.mem_tracker.MemTracker.get_tracker_snapshot", _TORCH,
                "the peak and its breakdown by reference type"),
    Requirement("torch.distributed._meta_registrations.create_fakework", _TORCH,
                "the FakeWork answer of c10d collectives on meta / fake tensors"),
    Requirement("megatron.core.optimizer.distrib_optimizer.DistributedOptimizer."
                "_init_optimizer_states_with_dummy_values", _MCORE,
                "Adam state as after the first step, without running it"),
)


def _all_gather_object():
    def all_gather_object(object_list, obj, group=None):
        for i in range(len(object_list)):
            object_list[i] = obj

    return all_gather_object


def _l2_norm():
    def l2_norm(chunk_size, noop_flag, tensor_lists, per_tensor, *args):
        norms = [torch.linalg.vector_norm(t.float()) for tl in tensor_lists for t in tl]
        total = torch.linalg.vector_norm(torch.stack(norms)).reshape(1) if norms else torch.zeros(1)
        return total, None

    return l2_norm


PATCHES = (
    Patch("torch.distributed.all_gather_object", _TORCH,
          "objects cannot travel over a fake group: every rank answers this rank's object",
          _all_gather_object),
    Patch("megatron.core.optimizer.clip_grads.l2_norm_impl", _MCORE,
          "the CPU fallback builds a tensor from tensor values (torch.tensor(list))", _l2_norm),
)

_COALESCED = ("allreduce_coalesced_", "allgather_coalesced_", "allgather_into_tensor_coalesced_",
              "reduce_scatter_tensor_coalesced_")


def register_coalesced_meta() -> torch.library.Library:
    """Meta kernels (a FakeWork) for the coalesced c10d collectives; keep the returned
    library alive for as long as they are needed."""
    from torch.distributed._meta_registrations import create_fakework

    lib = torch.library.Library("c10d", "IMPL")
    for op in _COALESCED:
        lib.impl(op, lambda *args: create_fakework(args, return_first_arg=False), "Meta")
    return lib


class ScalarAnswers(TorchDispatchMode):
    """Answers data-dependent scalar reads of fake tensors (see the module docstring)."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in (torch.ops.aten._local_scalar_dense.default, torch.ops.aten.item.default):
            t = args[0]
            constant = getattr(t, "constant", None)
            if constant is not None:
                return constant.item()
            if t.dtype == torch.bool:
                return False
            return 0.0 if t.dtype.is_floating_point else 0
        return func(*args, **(kwargs or {}))


class PeakTracker(MemTracker):
    """`MemTracker` whose per-op update keeps only the global peak (see the module docstring)."""

    def _update_peak_stats(self, peak_state) -> None:  # noqa: ARG002 (signature of MemTracker's)
        for dev, snap in self._curr_mem_snap.items():
            if self._peak_mem.get(dev, 0) < snap["Total"]:
                self._peak_mem[dev] = snap["Total"]
                self._peak_mem_snap[dev] = deepcopy(snap)


def init_fake_group(rank: int, world_size: int) -> None:
    """torch.distributed on the 'fake' backend: this process is `rank` of `world_size`."""
    from torch.testing._internal.distributed.fake_pg import FakeStore

    dist.init_process_group("fake", rank=rank, world_size=world_size, store=FakeStore())


def enable() -> patching.Applied:
    """Check every declared target and apply `PATCHES` (restore with the result's restore())."""
    patching.check(REQUIRES)
    return patching.apply(PATCHES)
