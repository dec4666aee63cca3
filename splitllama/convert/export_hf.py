"""torch_dist -> HF split model (the seed's HF layout, docs/design.md §1), streamed tensor by tensor.

Writes sharded safetensors (+ index when more than one shard), config.json in the seed schema
(CustomSplitLLamaConfig with embedded LLaMA configs and ``auto_map``), generation_config.json and
the modeling code, so ``AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)``
loads it without splitllama installed (a critic, ``model.head=value``: architecture
CustomSplitLLamaForTokenClassification with ``num_labels=1``, loaded with
``AutoModelForTokenClassification``). Each safetensors header is computed from the
checkpoint metadata first, then tensors are read (one Megatron tensor at a time), split into
their HF tensors and appended — memory is one tensor, not a shard. Written to ``DIR.tmp-<pid>``
and renamed when complete.
"""
from __future__ import annotations

import json
import os
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, fields
from pathlib import Path
from typing import BinaryIO, Optional

import torch

from splitllama.config.model import SEED_ARCHITECTURES, ModelConfig
from splitllama.convert import export_tokenizer
from splitllama.convert.dist_reader import DistCheckpoint
from splitllama.convert.import_hf import DTYPES, prepare_out
from splitllama.convert.keys import schema
from splitllama.convert.progress import Progress
from splitllama.convert.sources import DTYPE_NAMES, INDEX_FILE, SINGLE_FILE, ConversionError

DEFAULT_MAX_SHARD_BYTES = 5 * 1024 ** 3
_TORCH_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


@dataclass
class ExportResult:
    path: str
    files: list[str]
    bytes_written: int
    tensors: int
    seconds: float
    tokenizer: str  # one line: which tokenizer the export carries (or why none)


def model_config_of(dist_ckpt: DistCheckpoint) -> ModelConfig:
    if dist_ckpt.model_config is None:
        raise ConversionError(f"{dist_ckpt.path}: no model_config.json; cannot tell the model's shape")
    known = {f.name for f in fields(ModelConfig)}
    try:
        return ModelConfig(**{k: v for k, v in dist_ckpt.model_config.items() if k in known})
    except (TypeError, ValueError) as e:
        raise ConversionError(f"{dist_ckpt.path}/model_config.json: {e}") from None


def _plan(dist_ckpt: DistCheckpoint, cfg: ModelConfig, dtype: torch.dtype, max_shard: int) -> list[list[tuple]]:
    """Shards as lists of (key, mapping, [(hf name, shape)]); one Megatron tensor never spans shards."""
    shards: list[list[tuple]] = [[]]
    size = 0
    for key, m in schema(cfg).items():
        shape = m.shape
        if key not in dist_ckpt:
            raise ConversionError(f"{dist_ckpt.path}: checkpoint lacks tensor {key}")
        if dist_ckpt.shape(key) != shape:
            raise ConversionError(f"{dist_ckpt.path}: tensor {key} has shape {list(dist_ckpt.shape(key))}, model_config.json "
                                  f"implies {list(shape)}")
        parts = list(zip(m.hf, m.hf_shapes))
        n = sum(torch.Size(s).numel() for _, s in parts) * dtype.itemsize
        if size and size + n > max_shard:
            shards.append([])
            size = 0
        shards[-1].append((key, m, parts))
        size += n
    return shards


def _header(shard: list[tuple], dtype: torch.dtype) -> bytes:
    entries, pos = {}, 0
    for _, _, parts in shard:
        for name, shape in parts:
            n = torch.Size(shape).numel() * dtype.itemsize
            entries[name] = {"dtype": DTYPE_NAMES[dtype], "shape": list(shape), "data_offsets": [pos, pos + n]}
            pos += n
    entries["__metadata__"] = {"format": "pt"}
    raw = json.dumps(entries, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return len(raw).to_bytes(8, "little") + raw


def _write_tensor(f: BinaryIO, t: torch.Tensor) -> None:
    t = t.contiguous()
    f.write(memoryview(t.reshape(-1).view(torch.uint8).numpy()))


def _close(f: Optional[BinaryIO]) -> None:
    if f is not None:
        f.flush()
        os.fsync(f.fileno())
        f.close()


def write_hf_config(out: Path, cfg: ModelConfig, dtype: torch.dtype,
                    special: Optional[export_tokenizer.SpecialIds] = None) -> None:
    """config.json (seed schema + auto_map), generation_config.json (with the tokenizer's bos /
    eos / pad ids when the export carries one) and the modeling code."""
    from transformers import GenerationConfig

    from splitllama.hf import build
    from splitllama.hf.configuration_splitllama import CustomSplitLLamaConfig

    critic = {"num_labels": 1} if cfg.head == "value" else {}
    hf_cfg = CustomSplitLLamaConfig(path8b=cfg.path_lower, path70b=cfg.path_upper,
                                    num_layers_8=cfg.num_layers_lower, num_layers_70=cfg.num_layers_upper,
                                    mlp=cfg.mlp, config8b=cfg.lower.to_hf_dict(), config70b=cfg.upper.to_hf_dict(),
                                    **critic)
    hf_cfg.auto_map = dict(build.AUTO_MAP)
    hf_cfg.architectures = [SEED_ARCHITECTURES[cfg.head]]
    hf_cfg.dtype = _TORCH_DTYPE_NAMES[dtype]
    hf_cfg.save_pretrained(out)
    gen = GenerationConfig.from_model_config(hf_cfg)
    if special is not None:
        gen.bos_token_id, gen.eos_token_id, gen.pad_token_id = special.bos, special.eos, special.pad
    gen.save_pretrained(out)
    here = Path(build.__file__).resolve().parent
    for name in build._CODE_FILES:
        shutil.copyfile(here / name, out / name)


def export_hf(ckpt: str, out: str, dtype: Optional[str] = None, progress: bool = True,
              max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, tokenizer: Optional[str] = None) -> ExportResult:
    """Export checkpoint `ckpt` (root or iter_ dir) to the HF split-model directory `out`, with the
    tokenizer `tokenizer` (a tokenizer.json or HF tokenizer directory; default: the one the
    checkpoint's training job used, if an HF tokenizer; see ``export_tokenizer``)."""
    t0 = time.perf_counter()
    out = prepare_out(out)
    dist_ckpt = DistCheckpoint(ckpt)
    dist_ckpt.verify()  # every data file the metadata names is there, with its bytes
    cfg = model_config_of(dist_ckpt)
    tok_choice = export_tokenizer.choose(tokenizer, dist_ckpt.path)
    tok = export_tokenizer.load(tok_choice, cfg.vocab_size)  # refused here, before anything is written
    if dtype is not None and dtype not in DTYPES:
        raise ConversionError(f"--dtype must be one of {', '.join(DTYPES)}; got {dtype!r}")
    out_dtype = DTYPES[dtype] if dtype else dist_ckpt.dtype("embedding.word_embeddings.weight")
    shards = _plan(dist_ckpt, cfg, out_dtype, max_shard_bytes)
    names = [SINGLE_FILE] if len(shards) == 1 else \
        [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    total = sum(torch.Size(s).numel() for sh in shards for _, _, p in sh for _, s in p) * out_dtype.itemsize
    bar = Progress(total, sum(len(sh) for sh in shards), "export", progress)
    tmp = Path(f"{out}.tmp-{os.getpid()}")
    weight_map: dict[str, str] = {}
    todo = [(fname, key, m, parts) for fname, shard in zip(names, shards) for key, m, parts in shard]
    try:
        tmp.mkdir(parents=True)  # missing parent folders too (prepare_out checked the path)
        with ThreadPoolExecutor(1) as pool:  # reads the next tensor while this one is written
            ahead = pool.submit(dist_ckpt.read, todo[0][1])
            f: Optional[BinaryIO] = None
            for i, (fname, key, m, parts) in enumerate(todo):
                full = ahead.result()
                ahead = pool.submit(dist_ckpt.read, todo[i + 1][1]) if i + 1 < len(todo) else None
                if f is None or f.name != str(tmp / fname):
                    _close(f)
                    f = open(tmp / fname, "wb")
                    f.write(_header(shards[names.index(fname)], out_dtype))
                tensors = m.split(full)
                for (name, shape), t in zip(parts, tensors):
                    assert tuple(t.shape) == tuple(shape), (name, t.shape, shape)
                    _write_tensor(f, t.to(out_dtype))
                    weight_map[name] = fname
                bar.update(sum(t.numel() for t in tensors) * out_dtype.itemsize)
                del full, tensors
            _close(f)
        if len(shards) > 1:
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            (tmp / INDEX_FILE).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        if tok is not None:
            export_tokenizer.write(tok, tmp)
        write_hf_config(tmp, cfg, out_dtype, None if tok is None else tok.ids)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        bar.close()
    return ExportResult(out, names, total, len(weight_map), time.perf_counter() - t0,
                        export_tokenizer.describe(tok_choice, tok))
