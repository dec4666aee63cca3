"""The whole job's configuration: sections, YAML files and `key=value` overrides.

Dataclass defaults are the one source of defaults; a YAML file holds only overrides; the
command line overrides both (``train.train_iters=20`` or ``--train.train_iters 20``).
"""
from __future__ import annotations

import ast
import dataclasses
from dataclasses import dataclass, field, fields
from typing import Any, Optional, Union, get_args, get_origin, get_type_hints

import yaml

from splitllama.config.model import ModelConfig
from splitllama.config.parallel import ParallelConfig
from splitllama.config.rl import RLConfig
from splitllama.config.train import CheckpointConfig, LoggingConfig, OptimizerConfig, TrainConfig
from splitllama.config.data import DataConfig


@dataclass
class JobConfig:
    """The whole job: one typed section per concern."""

    model: ModelConfig = field(default_factory=ModelConfig)
    """The stitched model."""
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    """Parallel layout."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """Training loop."""
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    """Optimizer and schedule."""
    data: DataConfig = field(default_factory=DataConfig)
    """Training data."""
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    """Checkpoints."""
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    """Logging."""
    rl: RLConfig = field(default_factory=RLConfig)
    """RL hand-off: weight syncs of the live model."""
    explicit: set = field(default_factory=set, repr=False, compare=False)
    """Dotted keys set by the YAML file or the command line (bookkeeping, not a config section)."""

    def to_dict(self) -> dict:
        d = {}
        for f in fields(self):
            if f.name == "explicit":
                continue
            sec = getattr(self, f.name)
            d[f.name] = sec.to_dict() if hasattr(sec, "to_dict") else dataclasses.asdict(sec)
        return d

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


def _parse_scalar(text: str, hint: Any = Any) -> Any:
    """A command-line value as the field's type reads it: a string field keeps the text as
    typed (``data.split=98,2,0`` stays ``"98,2,0"``, not a tuple; quotes are dropped), and
    ``null`` means None only where the field accepts None."""
    optional = get_origin(hint) is Union and type(None) in get_args(hint)
    target = _unwrap_optional(hint)
    low = text.lower()
    if low in ("null", "none", "~") and (optional or hint is Any or target is Any):
        return None
    if target is str:
        stripped = text.strip()
        if len(stripped) >= 2 and stripped[0] == stripped[-1] and stripped[0] in "'\"":
            return stripped[1:-1]
        return text
    if low in ("true", "false"):
        return low == "true"
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def _unwrap_optional(hint: Any) -> Any:
    if get_origin(hint) is Union:
        args = [a for a in get_args(hint) if a is not type(None)]
        return args[0] if len(args) == 1 else Any
    return hint


def _coerce(section: str, name: str, hint: Any, value: Any) -> Any:
    """Check/convert a value against the field's type hint; one clear error when it cannot."""
    if value is None:
        return None
    target = _unwrap_optional(hint)
    if target is Any or target is object:
        return value
    if target is bool and not isinstance(value, bool):
        raise ValueError(f"{section}.{name}: expected true/false, got {value!r}")
    if target is int and not (isinstance(value, int) and not isinstance(value, bool)):
        raise ValueError(f"{section}.{name}: expected an integer, got {value!r}")
    if target is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if target is float:
        raise ValueError(f"{section}.{name}: expected a number, got {value!r}")
    if target is str and not isinstance(value, str):
        return str(value)
    if get_origin(target) is list and isinstance(value, str):  # a,b or [a, b] unquoted
        return [v.strip().strip("'\"") for v in value.strip().strip("[]").split(",") if v.strip()]
    return value


def _apply(job: JobConfig, section: str, key: str, value: Any, text: Optional[str] = None) -> None:
    """Set ``section.key`` to ``value`` (from YAML) or to the command-line ``text``."""
    sec_names = {f.name for f in fields(JobConfig)} - {"explicit"}
    if section not in sec_names:
        raise ValueError(f"unknown config section '{section}' (sections: {sorted(sec_names)})")
    sec = getattr(job, section)
    hints = get_type_hints(type(sec))
    if key not in hints:
        raise ValueError(f"unknown config key '{section}.{key}' (known: {sorted(hints)})")
    if text is not None:
        value = _parse_scalar(text, hints[key])
    setattr(sec, key, _coerce(section, key, hints[key], value))
    job.explicit.add(f"{section}.{key}")


def load_job_config(path: Optional[str] = None, overrides: Optional[list[str]] = None) -> JobConfig:
    """Defaults <- YAML file <- overrides (``section.key=value``)."""
    job = JobConfig()
    raw: dict = {}
    if path:
        with open(path) as f:
            raw = yaml.safe_load(f) or {}
        if not isinstance(raw, dict):
            raise ValueError(f"{path}: expected a mapping of sections at top level")
    for section, values in raw.items():
        if not isinstance(values, dict):
            raise ValueError(f"{path}: section '{section}' must be a mapping")
        for key, value in values.items():
            _apply(job, section, key, value)
    for item in overrides or []:
        if "=" not in item or "." not in item.split("=", 1)[0]:
            raise ValueError(f"override '{item}' is not of the form section.key=value")
        dotted, text = item.split("=", 1)
        section, key = dotted.split(".", 1)
        _apply(job, section, key, None, text=text)
    # re-resolve block presets / paths given as strings or dicts
    job.model.__post_init__()
    return job


def normalize_argv(argv: list[str]) -> list[str]:
    """Accept ``--section.key value`` and ``--section.key=value`` as well as ``section.key=value``."""
    out, i = [], 0
    while i < len(argv):
        a = argv[i]
        if a.startswith("--") and "." in a.split("=", 1)[0]:
            if "=" in a:
                out.append(a[2:])
            else:
                if i + 1 >= len(argv):
                    raise ValueError(f"{a} needs a value")
                out.append(f"{a[2:]}={argv[i + 1]}")
                i += 1
        else:
            out.append(a)
        i += 1
    return out
