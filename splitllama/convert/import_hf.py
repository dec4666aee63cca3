"""HF -> torch_dist: stream two LLaMA checkpoints (or one seed split checkpoint) into a
megatron-core checkpoint that SplitLlamaModel loads at any TP/PP.

Everything is checked before anything is written (configs, N/M, vocab, every needed tensor's
presence, shape and dtype, shard headers vs file sizes); the checkpoint is then written into
``OUT.tmp-<pid>`` (layout: OUT/latest, OUT/iter_0000000/{DCP files, model_config.json,
COMPLETE}) and renamed to OUT only when complete. Only the shards holding needed tensors are
opened; tensors are read one at a time (large ones in row blocks of ≤ `max_chunk_bytes`).
"""
from __future__ import annotations

import glob
import os
import shutil
import sys
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from splitllama.checkpoint import dirs
from splitllama.config.model import HEADS, LlamaBlockConfig, ModelConfig
from splitllama.convert.buffers import BufferPool
from splitllama.convert.dist_writer import Piece, write_torch_dist
from splitllama.convert.keys import schema
from splitllama.convert.mapping import Mapping, source_name
from splitllama.convert.progress import Progress
from splitllama.convert.sources import DTYPE_NAMES, FLOAT_DTYPES, ConversionError, HFCheckpoint
from splitllama.platform.lifecycle import pid_alive

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}
DEFAULT_MAX_CHUNK_BYTES = 512 << 20
Resolver = Callable[[str], tuple[HFCheckpoint, str]]


@dataclass
class ImportResult:
    path: str  # the written iter_ directory
    config: ModelConfig
    bytes_read: dict[str, int] = field(default_factory=dict)  # per source file
    bytes_written: int = 0
    tensors: int = 0
    seconds: float = 0.0


def check_llama_config(d: dict, what: str, source: str) -> LlamaBlockConfig:
    """The block config of a HF config.json dict, refusing anything that is not plain LLaMA."""
    try:
        blk = LlamaBlockConfig.from_hf_dict(d, source=source)
    except ValueError as e:
        raise ConversionError(f"{what}: {e}") from None
    problems = []
    if d.get("model_type") != "llama":
        problems.append(f"model_type is {d.get('model_type')!r}, expected 'llama'")
    if d.get("hidden_act", "silu") != "silu":
        problems.append(f"hidden_act is {d.get('hidden_act')!r}, expected 'silu'")
    for flag in ("attention_bias", "mlp_bias"):
        if d.get(flag):
            problems.append(f"{flag} is true, expected false")
    if problems:
        raise ConversionError(f"{what}: {source} is not a LLaMA config: {'; '.join(problems)}")
    return blk


def _validate(cfg: ModelConfig, where: str) -> None:
    try:
        cfg.validate(1)
    except ValueError as e:
        raise ConversionError(f"{e} ({where})") from None


def _row_blocks(shape: tuple[int, ...], itemsize: int, limit: int) -> list[Optional[tuple[int, int]]]:
    """Row ranges of ≤ `limit` bytes each; [None] (whole tensor) when one block suffices."""
    row_bytes = itemsize
    for s in shape[1:]:
        row_bytes *= s
    if len(shape) < 2 or shape[0] * row_bytes <= limit:
        return [None]
    step = max(1, limit // row_bytes)
    return [(r, min(r + step, shape[0])) for r in range(0, shape[0], step)]


class _PieceBuilder:
    """Checks every source tensor and turns the key schema into lazily produced pieces."""

    def __init__(self, cfg: ModelConfig, resolve: Resolver, generated: dict[str, Callable[[], torch.Tensor]],
                 dtype: torch.dtype, max_chunk_bytes: int) -> None:
        self.cfg, self.resolve, self.generated = cfg, resolve, generated
        self.dtype, self.limit = dtype, max_chunk_bytes
        self.expected_dtype: dict[str, torch.dtype] = {}
        self.pool = BufferPool(max_cached_bytes=2 * max_chunk_bytes)

    def load(self, ckpt: HFCheckpoint, name: str, rows: Optional[tuple[int, int]] = None) -> torch.Tensor:
        """Tensor (rows) in the output dtype, in pooled buffers."""
        src = ckpt.read(name, rows, out=self.pool.take(ckpt.nbytes(name, rows)))
        if src.dtype == self.dtype:
            return src
        dst = self.pool.take(src.numel() * self.dtype.itemsize, self.dtype, tuple(src.shape))
        dst.copy_(src)
        self.pool.give_back(src)
        return dst

    def merged(self, m: Mapping, srcs: list[tuple[HFCheckpoint, str]]) -> torch.Tensor:
        """`m.merge` of the source tensors into a pooled buffer (for layouts that interleave)."""
        parts = [self.load(c, n) for c, n in srcs]
        out = self.pool.take(sum(t.numel() for t in parts) * self.dtype.itemsize, self.dtype, m.shape)
        m.merge(parts, out=out)
        for t in parts:
            self.pool.give_back(t)
        return out

    def source(self, hf_name: str, shape: tuple[int, ...], m: Mapping) -> tuple[HFCheckpoint, str]:
        ckpt, name = self.resolve(hf_name)
        info = ckpt.info(name)
        where = f"{ckpt.what}: tensor {name} in {ckpt.path}/{ckpt.weight_map[name]}"
        if info.shape != shape:
            raise ConversionError(f"{where} has shape {list(info.shape)}, expected {list(shape)} "
                                  f"(for {m.mcore})")
        want = self.expected_dtype.setdefault(ckpt.path, ckpt.declared_dtype() or info.dtype)
        if info.dtype not in FLOAT_DTYPES or info.dtype != want:
            raise ConversionError(f"{where} has dtype {DTYPE_NAMES[info.dtype]}, expected "
                                  f"{DTYPE_NAMES.get(want, want)}")
        return ckpt, name

    def _order(self, ckpt: HFCheckpoint, name: str, rows: Optional[tuple[int, int]]) -> tuple:
        fname, start = ckpt.location(name)
        info = ckpt.info(name)
        return (1, f"{ckpt.path}/{fname}", start + (rows[0] * info.nbytes // info.shape[0] if rows else 0))

    def _copy(self, key: str, gshape: tuple, ckpt: HFCheckpoint, name: str, row0: int = 0) -> list[Piece]:
        shape = ckpt.info(name).shape
        out = []
        for rows in _row_blocks(shape, self.dtype.itemsize, self.limit):
            r0, r1 = rows if rows else (0, shape[0] if shape else 0)
            sizes = (r1 - r0, *shape[1:]) if rows else shape
            offsets = (row0 + r0,) + (0,) * (len(shape) - 1)
            out.append(Piece(key, gshape, offsets, tuple(sizes), self.dtype,
                             (lambda c=ckpt, n=name, r=rows: self.load(c, n, r)), self._order(ckpt, name, rows)))
        return out

    def pieces(self) -> list[Piece]:
        out: list[Piece] = []
        for key, m in schema(self.cfg).items():
            gshape = m.shape
            if m.hf[0] in self.generated:  # written last: generation overlaps the copying
                out.append(Piece(key, gshape, (0,) * len(gshape), gshape, self.dtype,
                                 self.generated[m.hf[0]], (2, "", len(out))))
                continue
            srcs = [self.source(h, s, m) for h, s in zip(m.hf, m.hf_shapes)]
            if m.row_offsets is None:  # interleaved (q/k/v): merged whole
                out.append(Piece(key, gshape, (0,) * len(gshape), gshape, self.dtype,
                                 (lambda m=m, srcs=srcs: self.merged(m, srcs)), self._order(*srcs[0], None)))
            else:  # each source tensor is a block of rows (gate / up: Megatron's two chunks)
                for src, row0 in zip(srcs, m.row_offsets):
                    out += self._copy(key, gshape, *src, row0=row0)
        return out


def _out_dtype(dtype: str, ckpt: HFCheckpoint, name: str) -> torch.dtype:
    if dtype == "auto":
        return ckpt.info(name).dtype
    if dtype not in DTYPES:
        raise ConversionError(f"--dtype must be one of auto, {', '.join(DTYPES)}; got {dtype!r}")
    return DTYPES[dtype]


def prepare_out(out: str) -> str:
    """`out` as an absolute path that does not exist yet (missing parent folders are created
    when writing starts, after every input check; an ancestor that is a file is refused); the
    `OUT.tmp-<pid>` debris of a conversion killed earlier (its pid gone) is removed, a live one
    refused."""
    out = os.path.abspath(out)
    if os.path.exists(out):
        raise ConversionError(f"output {out} already exists; choose a new path")
    ancestor = os.path.dirname(out)
    while not os.path.exists(ancestor):
        ancestor = os.path.dirname(ancestor)
    if not os.path.isdir(ancestor):
        raise ConversionError(f"output {out}: {ancestor} is a file, not a directory")
    for debris in sorted(glob.glob(glob.escape(out) + ".tmp-*")):
        pid = debris.rsplit("-", 1)[-1]
        if pid.isdigit() and pid_alive(int(pid)):
            raise ConversionError(f"{debris} is being written by another conversion (pid {pid}, still "
                                  f"running); wait for it or choose another output")
        shutil.rmtree(debris, ignore_errors=True)
        print(f"removed {debris}: partial output of an earlier conversion that was killed", file=sys.stderr)
    return out


def convert(cfg: ModelConfig, resolve: Resolver, generated: dict[str, Callable[[], torch.Tensor]],
            sources: list[HFCheckpoint], out: str, dtype: torch.dtype, progress: bool = True,
            max_chunk_bytes: int = DEFAULT_MAX_CHUNK_BYTES,
            on_checked: Optional[Callable[[], None]] = None) -> ImportResult:
    """Check, then write the checkpoint for `cfg` (tensors from `resolve`d sources or
    `generated`) to `out` atomically. Nothing is left behind on failure. `on_checked` runs
    once every input check has passed, before writing starts."""
    out = prepare_out(out)
    t0 = time.perf_counter()
    builder = _PieceBuilder(cfg, resolve, generated, dtype, max_chunk_bytes)
    pieces = builder.pieces()
    if on_checked is not None:
        on_checked()
    final, tensors = write_checkpoint(out, pieces, cfg, progress, release=builder.pool.give_back)
    read: dict[str, int] = {}
    for s in sources:
        read.update(s.bytes_read())
    return ImportResult(final, cfg, read, sum(p.nbytes for p in pieces), tensors, time.perf_counter() - t0)


def write_checkpoint(out: str, pieces: list[Piece], cfg: ModelConfig, progress: bool = True,
                     release: Optional[Callable[[torch.Tensor], None]] = None) -> tuple[str, int]:
    """Write `pieces` as iteration 0 of a new checkpoint root `out` (with model_config.json of
    `cfg`), atomically: into ``OUT.tmp-<pid>``, renamed to `out` when complete, removed on any
    failure. Returns (the final iter_ directory, number of tensors)."""
    remaining: dict[str, int] = {}
    nbytes = {}
    for p in pieces:
        remaining[p.key] = remaining.get(p.key, 0) + 1
        nbytes[p.index()] = (p.key, p.nbytes)
    bar = Progress(sum(p.nbytes for p in pieces), len(remaining), "import", progress)

    def on_written(index, _length: int) -> None:
        key, n = nbytes[index]
        remaining[key] -= 1
        bar.update(n, tensors=int(remaining[key] == 0))

    tmp_root = f"{out}.tmp-{os.getpid()}"
    try:
        os.makedirs(tmp_root)
        iter_tmp = os.path.join(tmp_root, dirs.tmp_dirname(0))
        write_torch_dist(iter_tmp, pieces, on_written, release=release)
        dirs.write_json(iter_tmp, dirs.MODEL_CONFIG, cfg.to_dict())
        final = dirs.finalize(tmp_root, iter_tmp, 0)
        os.replace(tmp_root, out)
    except BaseException:
        shutil.rmtree(tmp_root, ignore_errors=True)
        raise
    finally:
        bar.close()
    return os.path.join(out, os.path.basename(final)), len(remaining)


def import_hf(lower: str, upper: str, num_layers_lower: int, num_layers_upper: int, out: str,
              mlp: bool = False, adapter_init: str = "random", seed: int = 0, dtype: str = "auto",
              progress: bool = True, max_chunk_bytes: int = DEFAULT_MAX_CHUNK_BYTES,
              head: str = "lm", value_head_init: Optional[str] = None) -> ImportResult:
    """Embedding + layers 0..N-1 of `lower`, a new adapter, layers L-M..L-1 + norm + lm_head of `upper`.
    `head="value"`: a critic initialisation — the same trunk, and instead of the lm_head a new
    value head (`splitllama.hf.build.value_head_weights(value_head_init)`, default zeros, seeded
    by `seed`)."""
    from splitllama.hf.build import VALUE_HEAD_INITS, adapter_weights, value_head_weights

    if head not in HEADS:
        raise ConversionError(f"--head must be one of {', '.join(HEADS)}, got {head!r}")
    if head == "lm" and value_head_init is not None:
        raise ConversionError("--value-head-init initialises a critic's value head: it needs --head value")
    value_head_init = value_head_init or "zeros"
    if value_head_init not in VALUE_HEAD_INITS:
        raise ConversionError(f"--value-head-init must be one of {', '.join(VALUE_HEAD_INITS)}, "
                              f"got {value_head_init!r}")

    out = prepare_out(out)
    hf_ckpts = {"lower": HFCheckpoint(lower, "lower"), "upper": HFCheckpoint(upper, "upper")}
    blocks = {w: check_llama_config(c.config, w, os.path.join(c.path, "config.json")) for w, c in hf_ckpts.items()}
    cfg = ModelConfig(lower=blocks["lower"], upper=blocks["upper"], num_layers_lower=num_layers_lower,
                      num_layers_upper=num_layers_upper, mlp=mlp, path_lower=os.path.abspath(lower),
                      path_upper=os.path.abspath(upper), head=head)
    _validate(cfg, f"lower {lower}, upper {upper}")
    if adapter_init not in ("random", "identity"):
        raise ConversionError(f"--adapter-init must be random or identity (lstsq is deferred), got {adapter_init!r}")
    if adapter_init == "identity" and cfg.lower.hidden_size > cfg.upper.hidden_size:
        raise ConversionError(f"identity adapter needs lower hidden size ≤ upper: "
                              f"{cfg.lower.hidden_size} > {cfg.upper.hidden_size}")
    out_dtype = _out_dtype(dtype, hf_ckpts["lower"], "model.embed_tokens.weight")

    def resolve(hf_name: str) -> tuple[HFCheckpoint, str]:
        which, name = source_name(hf_name, cfg)
        if name == "lm_head.weight" and not hf_ckpts[which].has(name) and cfg.upper.tie_word_embeddings:
            name = "model.embed_tokens.weight"
        return hf_ckpts[which], name

    # The adapter (same values as splitllama.hf.build for the same seed) is generated on a helper
    # thread from the moment the inputs are checked, overlapping the tensor copies.
    pool = ThreadPoolExecutor(1)
    adapter: list[Future] = []

    def start() -> None:
        adapter.append(pool.submit(adapter_weights, cfg.lower.hidden_size, cfg.upper.hidden_size, mlp,
                                   adapter_init, seed, dtype=out_dtype))

    def gen(name: str) -> Callable[[], torch.Tensor]:
        return lambda: adapter[0].result().pop(name[len("model."):])

    names = ["model.adapter_linear_1.weight", "model.adapter_linear_2.weight"] if mlp else ["model.adapter.weight"]
    generated = {n: gen(n) for n in names}
    if head == "value":
        generated.update({n: (lambda n=n: value_head_weights(cfg.upper.hidden_size, value_head_init, seed=seed,
                                                             dtype=out_dtype)[n]) for n in ("score.weight", "score.bias")})
    try:
        return convert(cfg, resolve, generated, list(hf_ckpts.values()), out, out_dtype,
                       progress, max_chunk_bytes, on_checked=start)
    finally:
        pool.shutdown(wait=True)


def import_hf_split(src: str, out: str, dtype: str = "auto", progress: bool = True,
                    max_chunk_bytes: int = DEFAULT_MAX_CHUNK_BYTES) -> ImportResult:
    """A seed-format HF split model (CustomSplitLLamaForCausalLM) directory, adapter included."""
    out = prepare_out(out)
    hf_ckpt = HFCheckpoint(src, "split model")
    cfg_file = os.path.join(src, "config.json")
    try:
        cfg = ModelConfig.from_seed_dict(hf_ckpt.config, source=cfg_file)
    except ValueError as e:  # names cfg_file already
        raise ConversionError(f"split model: {e}") from None
    except (KeyError, TypeError) as e:
        raise ConversionError(f"split model: {cfg_file}: {e}") from None
    for which, key in (("lower", "config8b"), ("upper", "config70b")):
        if isinstance(hf_ckpt.config.get(key), dict):
            check_llama_config(hf_ckpt.config[key], which, f"{cfg_file} [{key}]")
    _validate(cfg, src)
    out_dtype = _out_dtype(dtype, hf_ckpt, "model.embed_tokens.weight")
    return convert(cfg, lambda name: (hf_ckpt, name), {}, [hf_ckpt], out, out_dtype, progress, max_chunk_bytes)
