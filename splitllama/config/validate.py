"""Schema validation of the job config, driven by the config dataclasses themselves.

The type of a value is its field's annotation; ranges and choices are declared once, next to
the field, in its ``metadata``::

    lr: float = field(default=3e-3, metadata={"gt": 0})
    lr_decay_style: str = field(default="cosine", metadata={"choices": ("cosine", "linear", "constant")})

Known rules: ``ge`` / ``gt`` / ``le`` / ``lt`` (numbers; ``None`` is not checked), ``choices`` (a
tuple of allowed values), ``finite`` (``False`` allows inf / nan in a float field; floats
are finite by default). Relations between fields of one section are its ``check_values()``
method (called after the fields passed). A field added to a section is covered without an
edit here. Every refusal is one ValueError naming the key, the value and what is allowed.

A leaf module: it imports no other SplitLlama module, nor torch.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Union, get_args, get_origin, get_type_hints

RULES = ("ge", "gt", "le", "lt", "choices", "finite")


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "...(" + str(len(text)) + " chars)"


def _optional(hint: Any) -> tuple[bool, Any]:
    if get_origin(hint) is Union:
        args = [a for a in get_args(hint) if a is not type(None)]
        none_ok = len(args) < len(get_args(hint))
        return none_ok, (args[0] if len(args) == 1 else Any)
    return False, hint


def check_value(key: str, hint: Any, value: Any, meta: Any = None) -> None:
    """Refuse `value` for the field `key` annotated `hint` with rules `meta` (ValueError)."""
    none_ok, target = _optional(hint)
    if value is None:
        if none_ok or target is Any:
            return
        raise ValueError(f"{key}: null is not allowed (expected {_type_word(target)})")
    if target is Any or target is object:
        pass
    elif target is bool:
        if not isinstance(value, bool):
            raise ValueError(f"{key}: expected true/false, got {_short(value)}")
    elif target is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{key}: expected an integer, got {_short(value)}")
    elif target is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{key}: expected a number, got {_short(value)}")
        if (meta or {}).get("finite", True) and not math.isfinite(value):
            raise ValueError(f"{key}: expected a finite number, got {value!r}")
    elif target is str:
        if not isinstance(value, str):
            raise ValueError(f"{key}: expected a string, got {_short(value)}")
    elif get_origin(target) is list or target is list:
        if not isinstance(value, list):
            raise ValueError(f"{key}: expected a list, got {_short(value)}")
        (item,) = get_args(target) or (Any,)
        for i, entry in enumerate(value):
            check_value(f"{key}[{i}]", item, entry)
    elif get_origin(target) is dict or target is dict:
        if not isinstance(value, dict):
            raise ValueError(f"{key}: expected a mapping, got {_short(value)}")
    elif dataclasses.is_dataclass(target):
        if not isinstance(value, target):
            raise ValueError(f"{key}: expected a {target.__name__}, got {_short(value)}")
    _check_rules(key, value, meta or {})


def _type_word(target: Any) -> str:
    return {bool: "true/false", int: "an integer", float: "a number", str: "a string"}.get(
        target, getattr(target, "__name__", str(target)))


def _check_rules(key: str, value: Any, meta: Any) -> None:
    choices = meta.get("choices")
    if choices is not None and value not in choices:
        raise ValueError(f"{key}: {_short(value)} is not one of {' | '.join(map(str, choices))}")
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return
    for rule, ok, word in (("ge", lambda v, b: v >= b, ">="), ("gt", lambda v, b: v > b, ">"),
                           ("le", lambda v, b: v <= b, "<="), ("lt", lambda v, b: v < b, "<")):
        bound = meta.get(rule)
        if bound is not None and not ok(value, bound):
            raise ValueError(f"{key} must be {word} {bound}, got {value!r}")


def check_fields(obj: Any, prefix: str) -> None:
    """Every field of the dataclass instance `obj` (and of dataclass values in it) by its
    annotation and metadata."""
    hints = get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        if not f.init or f.name not in hints:
            continue
        value = getattr(obj, f.name)
        check_value(f"{prefix}.{f.name}", hints[f.name], value, f.metadata)
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            check_fields(value, f"{prefix}.{f.name}")


def check_mapping(cls: type, values: dict, prefix: str) -> None:
    """A mapping meant for the dataclass `cls` (e.g. a block given as YAML): every key known,
    every value of its field's type and rules (before the dataclass is built)."""
    hints = get_type_hints(cls)
    known = {f.name: f for f in dataclasses.fields(cls) if f.init}
    for key, value in values.items():
        if key not in known:
            raise ValueError(f"unknown key '{prefix}.{key}' (known: {sorted(known)})")
        check_value(f"{prefix}.{key}", hints[key], value, known[key].metadata)


def validate_job(job: Any) -> None:
    """Every section of a job config (a dataclass of section dataclasses) field by field, then
    each section's relations (its ``check_values()``), then the job's own (across sections)."""
    hints = get_type_hints(type(job))
    sections = [getattr(job, f.name) for f in dataclasses.fields(job) if dataclasses.is_dataclass(hints.get(f.name))]
    for f in dataclasses.fields(job):
        if dataclasses.is_dataclass(hints.get(f.name)):
            check_fields(getattr(job, f.name), f.name)
    for obj in sections + [job]:
        relations = getattr(obj, "check_values", None)
        if callable(relations):
            relations()
