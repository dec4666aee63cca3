"""Which parameters train: all, the adapter only (warmup), or the adapter plus named groups."""
from __future__ import annotations

import torch


def trainable_predicate(spec: str):
    """`model.freeze`: "none" | "all_but_adapter" | "all_but:<substr>[,<substr>...]"
    (the adapter always trains unless spec is "all"). Returns name -> trains?"""
    spec = (spec or "none").strip()
    if spec == "none":
        return lambda name: True
    if spec == "all":
        return lambda name: False
    if spec == "all_but_adapter":
        return lambda name: name.startswith("adapter.")
    if spec.startswith("all_but:"):
        keep = [s for s in spec[len("all_but:"):].split(",") if s]
        return lambda name: name.startswith("adapter.") or any(k in name for k in keep)
    raise ValueError(f"model.freeze: '{spec}' is not none | all | all_but_adapter | all_but:<names>")


def apply_freeze(model: torch.nn.Module, spec: str) -> tuple[int, int]:
    """Set requires_grad per the spec (before DDP / optimizer are built).
    Returns (trainable, frozen) parameter counts on this rank."""
    trains = trainable_predicate(spec)
    counts = [0, 0]
    for name, p in model.named_parameters():
        p.requires_grad_(trains(name))
        counts[0 if p.requires_grad else 1] += p.numel()
    return counts[0], counts[1]
