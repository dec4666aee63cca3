"""Field documentation of the config dataclasses, and the config reference `--help` prints.

The one source of a field's meaning is its *attribute docstring*: the string literal on the
line(s) right after the field, as in

    seq_length: int = 128
    \"\"\"Tokens per training sample.\"\"\"

They are read from the class source with `ast` (no import of torch or Megatron), so
`--help` stays fast. `tests/unit/test_config_help.py` fails when a field has no docstring.
"""
from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import re
import textwrap
import typing
from typing import Any, Union, get_args, get_origin, get_type_hints


@functools.lru_cache(maxsize=None)
def field_docs(cls: type) -> dict[str, str]:
    """``{field name: first paragraph of its attribute docstring}`` for a dataclass ``cls``."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body  # the class body
    docs: dict[str, str] = {}
    for node, nxt in zip(body, body[1:]):
        if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
                and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant)
                and isinstance(nxt.value.value, str)):
            text = inspect.cleandoc(nxt.value.value).split("\n\n")[0]
            text = re.sub(r":\w+:`~?([\w.]+)`", r"\1", text).replace("``", "")
            docs[node.target.id] = " ".join(text.split())
    return docs


def type_name(hint: Any) -> str:
    """``Optional[int]`` -> ``int or null``, ``list[str]`` -> ``list[str]``, ``Any`` -> ``any``."""
    if hint is Any:
        return "any"
    if get_origin(hint) is Union:
        args = [a for a in get_args(hint) if a is not type(None)]
        inner = " | ".join(type_name(a) for a in args)
        return f"{inner} or null" if len(args) < len(get_args(hint)) else inner
    if get_origin(hint) is not None:
        return str(hint).replace("typing.", "")
    return getattr(hint, "__name__", str(hint))


def _default(f: dataclasses.Field) -> str:
    if f.default is not dataclasses.MISSING:
        value = f.default
    elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        value = f.default_factory()  # type: ignore[misc]
    else:
        return "(required)"
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    return repr(value) if isinstance(value, str) else str(value)


def section_rows(cls: type) -> list[tuple[str, str, str, str]]:
    """``(key, type, default, meaning)`` for every field of the dataclass ``cls``."""
    hints = get_type_hints(cls)
    docs = field_docs(cls)
    return [(f.name, type_name(hints[f.name]), _default(f), docs.get(f.name, ""))
            for f in dataclasses.fields(cls) if f.init]


def _table(rows: list[tuple[str, str, str, str]], prefix: str, width: int = 100) -> list[str]:
    keys = [prefix + r[0] for r in rows]
    kw = max(len(k) for k in keys)
    tw = max(len(r[1]) for r in rows)
    out = []
    for key, (_, typ, default, doc) in zip(keys, rows):
        head = f"  {key:<{kw}}  {typ:<{tw}}  default {default}"
        out.append(head)
        if doc:
            out.extend(textwrap.wrap(doc, width=width, initial_indent="      ",
                                     subsequent_indent="      "))
    return out


def config_reference(job_cls: type | None = None) -> str:
    """Every section and key of the job config with type, default and meaning (for --help)."""
    if job_cls is None:
        from splitllama.config.job import JobConfig as job_cls  # noqa: N813
    from splitllama.config.model import LlamaBlockConfig

    hints = typing.get_type_hints(job_cls)
    lines = ["config keys (YAML section: key, or on the command line section.key=value):"]
    for f in dataclasses.fields(job_cls):
        sec_cls = hints.get(f.name)
        if not dataclasses.is_dataclass(sec_cls):
            continue
        lines.append("")
        title = (sec_cls.__doc__ or "").strip().split("\n")[0]
        lines.append(f"{f.name}: {title}" if title else f"{f.name}:")
        lines.extend(_table(section_rows(sec_cls), f"{f.name}."))
    lines += ["", "model.lower / model.upper as a YAML mapping (a preset name, a HF config "
              "path, or these keys; {preset: NAME, key: value} overrides a preset):"]
    lines.extend(_table(section_rows(LlamaBlockConfig), "  "))
    return "\n".join(lines)
