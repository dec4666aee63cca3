"""`export-hf --tp T --pp P` under torchrun: load the checkpoint sharded at TP x PP (x DP) and
write the HF export from `stream_hf_weights`, so no rank ever holds the whole model.

    torchrun --nproc-per-node 4 tools/convert_checkpoint.py export-hf --ckpt CKPT --out DIR --tp 2 --pp 2

Same files as the one-process `export-hf` (`export_hf.py`'s shard plan, headers, tensor writer and
config): every rank streams, global rank 0 writes ``DIR.tmp-<pid>`` and renames it when complete.
Input checks (output path, checkpoint, dtype, sizes) run on every rank before torch.distributed
starts, so a bad input is one ``error:`` line from rank 0 and nothing is written.
"""
from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import BinaryIO, Optional

import torch

from splitllama.convert import export_tokenizer
from splitllama.convert.dist_reader import DistCheckpoint
from splitllama.convert.export_hf import (DEFAULT_MAX_SHARD_BYTES, ExportResult, _close, _header, _plan,
                                          _write_tensor, model_config_of, write_hf_config)
from splitllama.convert.import_hf import DTYPES, prepare_out
from splitllama.convert.progress import Progress
from splitllama.convert.sources import INDEX_FILE, SINGLE_FILE, ConversionError
from splitllama.convert.stream import DEFAULT_BUCKET_BYTES, StreamStats, stream_hf_weights


def _world() -> tuple[int, int]:
    return int(os.environ.get("RANK", "0") or 0), int(os.environ.get("WORLD_SIZE", "1") or 1)


def _check(ckpt: str, out: str, tp: int, pp: int, dtype: Optional[str]):
    """Every input check, on every rank, read-only: (checkpoint, model config, output dtype)."""
    rank, world = _world()
    if tp < 1 or pp < 1:
        raise ConversionError(f"--tp and --pp must be >= 1; got --tp {tp} --pp {pp}")
    if world % (tp * pp):
        raise ConversionError(f"--tp {tp} x --pp {pp} = {tp * pp} processes do not divide the {world} started; "
                              f"launch with torchrun --nproc-per-node {tp * pp}")
    out = os.path.abspath(out)
    if os.path.exists(out):
        raise ConversionError(f"output {out} already exists; choose a new path")
    if not os.path.isdir(os.path.dirname(out)):
        raise ConversionError(f"output parent directory {os.path.dirname(out)} does not exist")
    if dtype is not None and dtype not in DTYPES:
        raise ConversionError(f"--dtype must be one of {', '.join(DTYPES)}; got {dtype!r}")
    dist_ckpt = DistCheckpoint(ckpt)
    dist_ckpt.verify()
    cfg = model_config_of(dist_ckpt)
    stored = {dist_ckpt.dtype(k) for k in dist_ckpt.tensor_keys() if not k.startswith("optimizer")}
    if len(stored) != 1:
        raise ConversionError(f"{dist_ckpt.path}: tensors of several dtypes ({sorted(map(str, stored))}); "
                              f"the sharded export loads one params dtype: use the one-process export-hf")
    cfg.validate(tp)
    from splitllama.pipeline.layout import PipelineLayout

    PipelineLayout.uniform(cfg.num_layers_lower, cfg.num_layers_upper, pp).validate(
        cfg.num_layers_lower, cfg.num_layers_upper, pp)
    return dist_ckpt, cfg, stored.pop()


def _load_stage(ckpt_path: str, cfg, tp: int, pp: int, params_dtype: torch.dtype):
    """This rank's model stage at TP x PP (uniform layout), filled from the checkpoint."""
    from splitllama.checkpoint.model_io import load_model_weights
    from splitllama.config.parallel import ParallelConfig
    from splitllama.model.build import build_model
    from splitllama.model.megatron_config import Numerics
    from splitllama.pipeline.layout import PipelineLayout
    from splitllama.platform.dist import init_distributed

    parallel = ParallelConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)
    init_distributed(parallel)
    cfg.transformer_impl = "local"  # weights only: the layer spec does not change them
    layout = PipelineLayout.uniform(cfg.num_layers_lower, cfg.num_layers_upper, pp)
    numerics = Numerics(params_dtype=params_dtype, bf16=params_dtype == torch.bfloat16,
                        use_cpu_initialization=True)
    model = build_model(cfg, parallel, numerics, layout).model.eval()
    load_model_weights(model, ckpt_path)
    return model


def export_hf_parallel(ckpt: str, out: str, tp: int, pp: int, dtype: Optional[str] = None,
                       progress: bool = True, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
                       bucket_bytes: int = DEFAULT_BUCKET_BYTES, tokenizer: Optional[str] = None) -> ExportResult:
    """Collective (every torchrun rank): export `ckpt` to `out` through the live-model stream, with
    the tokenizer `export_hf` would choose (`export_tokenizer`, checked on every rank first)."""
    import torch.distributed as dist

    from splitllama.platform.dist import shutdown

    t0 = time.perf_counter()
    rank, _ = _world()
    dist_ckpt, cfg, params_dtype = _check(ckpt, out, tp, pp, dtype)
    tok_choice = export_tokenizer.choose(tokenizer, dist_ckpt.path)
    tok = export_tokenizer.load(tok_choice, cfg.vocab_size)
    tok_line = export_tokenizer.describe(tok_choice, tok)
    out_dtype = DTYPES[dtype] if dtype else params_dtype
    shards = _plan(dist_ckpt, cfg, out_dtype, max_shard_bytes)
    names = [SINGLE_FILE] if len(shards) == 1 else \
        [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    total = sum(torch.Size(s).numel() for sh in shards for _, _, p in sh for _, s in p) * out_dtype.itemsize
    todo = [(fname, name, shape) for fname, shard in zip(names, shards) for _, _, parts in shard
            for name, shape in parts]
    out = prepare_out(out) if rank == 0 else os.path.abspath(out)
    try:
        model = _load_stage(dist_ckpt.path, cfg, tp, pp, params_dtype)
        tmp = Path(f"{out}.tmp-{os.getpid()}")
        stats = StreamStats()
        stream = stream_hf_weights([model], cfg, bucket_bytes=bucket_bytes, stats=stats)
        if rank != 0:
            for _ in stream:
                pass
            dist.barrier()
            return ExportResult(out, names, total, len(todo), time.perf_counter() - t0, tok_line)
        bar = Progress(total, len(todo), "export", progress)
        weight_map: dict[str, str] = {}
        f: Optional[BinaryIO] = None
        try:
            tmp.mkdir()
            for (fname, want, shape), (name, t) in zip(todo, stream, strict=True):
                if name != want or tuple(t.shape) != tuple(shape):
                    raise RuntimeError(f"stream gave {name} {tuple(t.shape)}, the export plan expects {want} {shape}")
                if f is None or f.name != str(tmp / fname):
                    _close(f)
                    f = open(tmp / fname, "wb")
                    f.write(_header(shards[names.index(fname)], out_dtype))
                _write_tensor(f, t.to(device="cpu", dtype=out_dtype))
                weight_map[name] = fname
                bar.update(t.numel() * out_dtype.itemsize)
            _close(f)
            f = None
            if len(shards) > 1:
                index = {"metadata": {"total_size": total}, "weight_map": weight_map}
                (tmp / INDEX_FILE).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
            if tok is not None:
                export_tokenizer.write(tok, tmp)
            write_hf_config(tmp, cfg, out_dtype, None if tok is None else tok.ids)
            os.replace(tmp, out)
        except BaseException:
            if f is not None:
                f.close()
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        finally:
            bar.close()
        dist.barrier()
        return ExportResult(out, names, total, len(weight_map), time.perf_counter() - t0, tok_line)
    finally:
        shutdown()
