"""The CPU harness is reversible and every declared private target exists in the installed
torch / megatron-core (a version change fails here, naming the target)."""
import importlib.metadata

import pytest
import torch

from splitllama.platform import cpu, device, patching
from splitllama.platform.compat import requirements
from splitllama.platform.patching import Patch, PatchTargetMissing


def _current(target: str):
    owner, attr = patching.resolve(target)
    return patching._own(owner, attr)


@pytest.fixture
def no_harness():
    if cpu.active():
        pytest.skip("the harness is enabled by another test in this process")
    yield
    assert not cpu.active(), "a test left the harness enabled"


@pytest.mark.parametrize("req", requirements(), ids=lambda r: r.target)
def test_every_declared_target_exists(req):
    patching.resolve(req.target)
    pkg = patching.package_of(req.target)
    assert req.written_for.startswith(pkg + " "), req.written_for
    assert req.why


def test_harness_table_covers_torch_and_megatron():
    targets = [p.target for p in cpu.PATCHES]
    assert len(targets) == len(set(targets)) >= 25
    assert {patching.package_of(t) for t in targets} == {"torch", "megatron-core"}


def test_enable_patches_and_disable_restores_every_original(no_harness):
    originals = {p.target: _current(p.target) for p in cpu.PATCHES}
    modes_before = torch.overrides._get_current_function_mode_stack()
    handle = cpu.enable()
    try:
        assert cpu.active()
        for target, original in originals.items():
            assert _current(target) is not original, target
        assert torch.cuda.current_device() == torch.device("cpu")
        assert torch.zeros(1, device="cuda").device.type == "cpu"  # the torch-function mode
        assert device.device() == torch.device("cpu")
    finally:
        handle.disable()
    assert not cpu.active()
    for target, original in originals.items():
        assert _current(target) is original, target
    assert torch.overrides._get_current_function_mode_stack() == modes_before
    if not torch.cuda.is_available():
        with pytest.raises((AssertionError, RuntimeError)):  # "Torch not compiled with CUDA"
            torch.zeros(1, device="cuda")


def test_enable_twice_counts_and_context_manager_restores(no_harness):
    original = torch.cuda.current_device
    from megatron.core.tensor_parallel import random as mrandom
    original_rng = mrandom._get_cuda_rng_state
    with cpu.enable():
        patched = torch.cuda.current_device
        inner = cpu.enable()
        assert torch.cuda.current_device is patched  # not patched twice over
        inner.disable()
        inner.disable()  # idempotent: releases once
        assert cpu.active() and torch.cuda.current_device is patched
    assert torch.cuda.current_device is original
    assert mrandom._get_cuda_rng_state is original_rng


def test_missing_target_is_named_with_installed_version(no_harness, monkeypatch):
    bogus = Patch("megatron.core.transformer.utils.no_such_symbol", "megatron-core 0.16.1",
                  "test", lambda: None)
    original = torch.cuda.current_device
    monkeypatch.setattr(cpu, "PATCHES", cpu.PATCHES + (bogus,))
    with pytest.raises(PatchTargetMissing) as e:
        cpu.enable()
    version = importlib.metadata.version("megatron-core")
    assert "megatron.core.transformer.utils.no_such_symbol" in str(e.value)
    assert f"megatron-core {version}" in str(e.value)
    assert "written for megatron-core 0.16.1" in str(e.value)
    assert not cpu.active() and torch.cuda.current_device is original  # nothing half-applied


def test_missing_module_is_named():
    with pytest.raises(PatchTargetMissing, match=r"torch\.no_such_module\.thing does not exist "
                                                 r"in the installed torch"):
        patching.check([patching.Requirement("torch.no_such_module.thing", "torch 2.13.0", "t")])
