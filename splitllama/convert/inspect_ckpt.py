"""`inspect`: what a checkpoint holds — a torch_dist checkpoint (root or iter_ dir) or a HF
model directory: every tensor's key, shape, dtype, size (and chunks / file), then the config."""
from __future__ import annotations

import json
import os
import re
from typing import Iterable

from splitllama.checkpoint.dcp_metadata import DCP_METADATA
from splitllama.convert.dist_reader import DistCheckpoint
from splitllama.convert.progress import fmt_bytes
from splitllama.convert.sources import DTYPE_NAMES, ConversionError, HFCheckpoint


def _table(rows: Iterable[tuple[str, ...]], header: tuple[str, ...]) -> list[str]:
    rows = [header, *rows]
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    return ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]


def _natural(s: str) -> list:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", s)]


def _is_dist(path: str) -> bool:
    if os.path.isfile(os.path.join(path, DCP_METADATA)) or os.path.isfile(os.path.join(path, "latest")):
        return True
    return not os.path.isfile(os.path.join(path, "config.json"))


def inspect_dist(path: str) -> list[str]:
    dist_ckpt = DistCheckpoint(path)
    lines = [f"torch_dist checkpoint {dist_ckpt.path}"]
    meta = os.path.join(dist_ckpt.path, "metadata.json")
    if os.path.isfile(meta):
        with open(meta) as f:
            lines.append(f"format: {json.load(f)}")
    rows, total = [], 0
    for key in sorted(dist_ckpt.tensor_keys(), key=_natural):
        md = dist_ckpt.tensor_meta(key)
        n = dist_ckpt.nbytes(key)
        total += n
        rows.append((key, str(list(md.size)), DTYPE_NAMES.get(md.properties.dtype, str(md.properties.dtype)),
                     fmt_bytes(n), str(len(md.chunks))))
    lines += _table(rows, ("key", "shape", "dtype", "size", "chunks"))
    objects = sorted(dist_ckpt.object_keys())
    lines.append(f"{len(rows)} tensors, {fmt_bytes(total)}; {len(objects)} objects"
                 + (f" (e.g. {objects[0]})" if objects else ""))
    lines.append("model_config.json: " + (json.dumps(dist_ckpt.model_config, indent=2, sort_keys=True)
                                          if dist_ckpt.model_config is not None else "(absent)"))
    dist_ckpt.verify()  # a damaged checkpoint is an error (exit 2), not a report
    files = {info.relative_path for info in dist_ckpt.metadata.storage_data.values()}
    lines.append(f"verified: {len(files)} data files present with the sizes the metadata needs")
    return lines


def inspect_hf(path: str) -> list[str]:
    hf_ckpt = HFCheckpoint(path, "model")
    lines = [f"HF checkpoint {os.path.abspath(path)}"]
    rows, total = [], 0
    for name in sorted(hf_ckpt.weight_map, key=_natural):
        try:
            info = hf_ckpt.info(name)
        except ConversionError as e:
            rows.append((name, "?", "?", "?", f"{hf_ckpt.weight_map[name]} ({e})"))
            continue
        total += info.nbytes
        rows.append((name, str(list(info.shape)), DTYPE_NAMES[info.dtype], fmt_bytes(info.nbytes),
                     hf_ckpt.weight_map[name]))
    lines += _table(rows, ("tensor", "shape", "dtype", "size", "file"))
    lines.append(f"{len(rows)} tensors, {fmt_bytes(total)} in {len(set(hf_ckpt.weight_map.values()))} files")
    lines.append("config.json: " + json.dumps(hf_ckpt.config, indent=2, sort_keys=True))
    return lines


def inspect(path: str) -> str:
    """A printable report of `path` (torch_dist checkpoint or HF directory)."""
    if not os.path.isdir(path):
        raise ConversionError(f"{path} is not a directory")
    return "\n".join(inspect_dist(path) if _is_dist(path) else inspect_hf(path))
