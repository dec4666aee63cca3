"""Declared, checked and reversible patches of torch / Megatron-Core attributes.

Every place where SplitLlama replaces or relies on a private attribute of torch or
megatron-core declares it with these types, as a `Patch` (or a `Requirement` when it only reads,
wraps or overrides it): the dotted target, the version it was written for and why. The
declarations live in `platform/cpu.py` (the CPU harness) and `platform/compat/` (every other
use; `platform.compat.requirements()` lists them all). `check()` runs before any of
them is used, so an upgrade that renamed or removed one fails with ONE message naming the
target and the installed version instead of an AttributeError deep inside a training step.
`apply()` records every original and returns an `Applied` whose `restore()` puts each back.
"""
from __future__ import annotations

import importlib
import importlib.metadata
from dataclasses import dataclass
from typing import Any, Callable, Iterable


class PatchTargetMissing(RuntimeError):
    """A declared patch target does not exist in the installed torch / megatron-core."""


@dataclass(frozen=True)
class Requirement:
    """A private attribute SplitLlama reads or wraps (no replacement installed globally)."""

    target: str        # dotted path: importable module, then attributes ("torch.nn.Module.cuda")
    written_for: str   # e.g. "megatron-core 0.16.1"
    why: str


@dataclass(frozen=True)
class Patch(Requirement):
    """An attribute replaced while a patch set is applied. `make()` builds the replacement
    (a fresh object per application, so no function is registered under two names)."""

    make: Callable[[], Any] = None  # type: ignore[assignment]


def package_of(target: str) -> str:
    top = target.split(".", 1)[0]
    return {"megatron": "megatron-core"}.get(top, top)


def installed_version(target: str) -> str:
    try:
        return importlib.metadata.version(package_of(target))
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def resolve(target: str) -> tuple[Any, str]:
    """(owner object, attribute name) of a dotted target; raises PatchTargetMissing."""
    parts = target.split(".")
    owner, i = None, len(parts) - 1
    while i > 0:  # the longest importable module prefix (excluding the attribute itself)
        try:
            owner = importlib.import_module(".".join(parts[:i]))
            break
        except ImportError:
            i -= 1
    if owner is None:
        raise _missing(target)
    for name in parts[i:-1]:
        if not hasattr(owner, name):
            raise _missing(target)
        owner = getattr(owner, name)
    if not hasattr(owner, parts[-1]):
        raise _missing(target)
    return owner, parts[-1]


def _missing(target: str, written_for: str = "") -> PatchTargetMissing:
    pkg = package_of(target)
    note = f" (the patch was written for {written_for})" if written_for else ""
    return PatchTargetMissing(f"{target} does not exist in the installed {pkg} "
                              f"{installed_version(target)}{note}; SplitLlama supports the "
                              f"versions pinned in setup.py")


def check(requirements: Iterable[Requirement]) -> None:
    """Raise PatchTargetMissing for the first declared target that does not exist."""
    for r in requirements:
        try:
            resolve(r.target)
        except PatchTargetMissing:
            raise _missing(r.target, r.written_for) from None


_INHERITED = object()  # the attribute came from a base class: restoring deletes ours


def _own(owner: Any, attr: str) -> Any:
    """The attribute as stored on `owner` itself (a class's descriptor, not the bound value)."""
    if isinstance(owner, type):
        return owner.__dict__.get(attr, _INHERITED)
    return getattr(owner, attr)


class Applied:
    """The originals of one application of a patch set; `restore()` puts every one back."""

    def __init__(self, originals: list[tuple[Any, str, Any]]) -> None:
        self._originals = originals

    def restore(self) -> None:
        while self._originals:
            owner, attr, original = self._originals.pop()
            if original is _INHERITED:
                delattr(owner, attr)
            else:
                setattr(owner, attr, original)


def apply(patches: Iterable[Patch]) -> Applied:
    """Check every target, then install every replacement, recording the originals."""
    patches = list(patches)
    check(patches)
    originals = []
    for p in patches:
        owner, attr = resolve(p.target)
        originals.append((owner, attr, _own(owner, attr)))
        setattr(owner, attr, p.make())
    return Applied(originals)
