"""On-disk layout of SplitLlama checkpoints (pure file handling, no torch.distributed).

    ROOT/
      latest                      "iter_0000020" — written (atomically) only after a save completed
      iter_0000020/               megatron-core torch_dist checkpoint (model, optimizer, ...)
        model_config.json         the stitched model's shape (ModelConfig.to_dict())
        job_config.yaml           the resolved job config of the run that saved it (if any)
        train_state.json          iteration, consumed samples, skipped steps, ... (if any)
        COMPLETE                  marker written last; a directory without it is never loaded

A save writes into ``iter_X.tmp`` and renames it when everything is on disk, so a
crash mid-save leaves the previous checkpoint as `latest` and no half-written directory
that looks valid.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from typing import Optional

TRACKER = "latest"
COMPLETE = "COMPLETE"
MODEL_CONFIG = "model_config.json"
JOB_CONFIG = "job_config.yaml"
TRAIN_STATE = "train_state.json"
_ITER_RE = re.compile(r"^iter_(\d{7,})$")


def iter_dirname(iteration: int) -> str:
    return f"iter_{iteration:07d}"


def tmp_dirname(iteration: int) -> str:
    return f"{iter_dirname(iteration)}.tmp"


def is_complete(path: str) -> bool:
    return os.path.isfile(os.path.join(path, COMPLETE))


def mark_complete(path: str) -> None:
    with open(os.path.join(path, COMPLETE), "w") as f:
        f.write("ok\n")
        f.flush()
        os.fsync(f.fileno())


def write_atomic(path: str, text: str) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def finalize(root: str, tmp_path: str, iteration: int) -> str:
    """Mark a fully written temp directory complete, move it into place, update `latest`."""
    mark_complete(tmp_path)
    final = os.path.join(root, iter_dirname(iteration))
    if os.path.exists(final):
        shutil.rmtree(final)
    os.replace(tmp_path, final)
    write_atomic(os.path.join(root, TRACKER), iter_dirname(iteration) + "\n")
    return final


def resolve(path: str) -> str:
    """A loadable checkpoint directory from a root (via `latest`) or an iter_ directory.
    Raises FileNotFoundError / ValueError naming what is wrong."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise NotADirectoryError(f"checkpoint path {path} is a file, not a checkpoint directory "
                                 f"(give the checkpoint root or one of its iter_ directories)")
    if not os.path.isdir(path):
        raise FileNotFoundError(f"checkpoint path {path} does not exist")
    if is_complete(path):
        return path
    tracker = os.path.join(path, TRACKER)
    if os.path.isfile(tracker):
        with open(tracker) as f:
            name = f.read().strip()
        if not _ITER_RE.match(name):  # never followed out of its root (an absolute path, ../)
            raise ValueError(f"{tracker} names {name!r}, which is not an iter_NNNNNNN directory of {path} "
                             f"(a root's '{TRACKER}' names one of its own iter_ directories)")
        target = os.path.join(path, name)
        if not is_complete(target):
            raise ValueError(f"{tracker} names {name}, which is not a complete checkpoint")
        return target
    raise ValueError(f"{path} is neither a complete checkpoint (no {COMPLETE} marker) nor a "
                     f"checkpoint root (no '{TRACKER}' file)")


def list_complete(root: str) -> list[tuple[int, str]]:
    out = []
    for name in os.listdir(root) if os.path.isdir(root) else []:
        m = _ITER_RE.match(name)
        if m and is_complete(os.path.join(root, name)):
            out.append((int(m.group(1)), os.path.join(root, name)))
    return sorted(out)


def latest_name(root: str) -> Optional[str]:
    """What `latest` names (None without a `latest` file)."""
    tracker = os.path.join(root, TRACKER)
    if not os.path.isfile(tracker):
        return None
    with open(tracker) as f:
        return f.read().strip()


def holds_checkpoints(root: str) -> bool:
    """True when `root` holds a `latest` file or any iter_ directory (complete or not)."""
    if not os.path.isdir(root):
        return False
    return any(name == TRACKER or _ITER_RE.match(name) for name in os.listdir(root))


def iteration_of(path: str) -> Optional[int]:
    m = _ITER_RE.match(os.path.basename(os.path.normpath(path)))
    return int(m.group(1)) if m else None


def prune(root: str, keep_last: Optional[int]) -> list[str]:
    """Delete all but the newest `keep_last` complete checkpoints; never the one `latest`
    names (a run with lower iteration numbers than older checkpoints keeps its own)."""
    if not keep_last:
        return []
    keep = {latest_name(root)}
    done = list_complete(root)
    removed = []
    for _, path in done[:-keep_last]:
        if os.path.basename(path) in keep:
            continue
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    return removed


def _read_mapping(path: str, name: str, load, errors: tuple, what: str) -> Optional[dict]:
    """A mapping file of a checkpoint read with `load` (None when absent); ValueError naming the
    file when `load` raises one of `errors` or the file holds no mapping."""
    p = os.path.join(path, name)
    if not os.path.isfile(p):
        return None
    try:
        with open(p) as f:
            obj = load(f)
    except errors as e:
        raise ValueError(f"{p}: corrupt {what} ({' '.join(str(e).split())})") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{p}: corrupt: expected a {what} object, found {type(obj).__name__}")
    return obj


def read_json(path: str, name: str) -> Optional[dict]:
    """A JSON object file of a checkpoint (None when absent); ValueError naming a corrupt one."""
    return _read_mapping(path, name, json.load, (json.JSONDecodeError, UnicodeDecodeError), "JSON")


def read_job_config(path: str) -> Optional[dict]:
    """The saved job config (``job_config.yaml``) of a checkpoint directory as a mapping of
    sections (None when absent); ValueError naming a corrupt one. Read with the config loader
    (no aliases, no duplicate keys)."""
    import yaml

    from splitllama.config import yaml_load

    obj = _read_mapping(path, JOB_CONFIG, yaml_load.load, (yaml.YAMLError, UnicodeDecodeError), "job config")
    if obj is not None and not all(isinstance(v, dict) for v in obj.values()):
        raise ValueError(f"{os.path.join(path, JOB_CONFIG)}: corrupt job config: expected a mapping of sections")
    return obj


def write_json(path: str, name: str, obj: dict) -> None:
    with open(os.path.join(path, name), "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
