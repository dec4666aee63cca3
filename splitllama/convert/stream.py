"""Stream a live TP x PP (x DP) sharded SplitLlama as full HF tensors, on every rank.

    for name, tensor in stream_hf_weights(model_chunks):   # collective: every rank, same order
        ...                                                 # export names, full (TP=1) shapes

`stream_hf_weights` walks the mapping table of `export-hf` (`convert/mapping.py`, model order,
each mapping's HF tensors in its own order) and, for each Megatron tensor:

1. finds the pipeline rank that holds it (the names every stage holds are exchanged once, at
   the start, over the pipeline group; several model chunks per rank — virtual stages — are
   allowed, each chunk numbering its layers from its own `stage`);
2. on that pipeline rank, gathers the TP slices in place into one full-size buffer: rank r's
   slice is broadcast over the TP group straight into the views `Mapping.shard_views` names
   (contiguous row ranges); row-parallel slices (non-contiguous columns) go through a scratch
   buffer of at most `bucket_bytes`, row block by row block. Replicated tensors are not copied;
3. broadcasts the full tensor over the pipeline group from that rank;
4. splits it into its HF tensors (`Mapping.split`) and yields them.

Every data-parallel replica does the same over its own groups (no DP traffic). A rank holds at
most one full Megatron tensor, the scratch buffer and — for q/k/v only, whose split copies —
the HF parts of that one tensor; `StreamStats` records the high-water mark of those bytes.

Yielded tensors may be views of the live parameters (replicated tensors at PP rank = owner) or
of the stream's buffer: read or copy them before advancing the generator, never modify them;
they are valid until the next optimizer step. They keep the model's dtype and device unless
`dtype` is given.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Optional, Sequence

import torch
import torch.distributed as dist

from splitllama.config.model import ModelConfig
from splitllama.convert.live import global_name
from splitllama.convert.mapping import Mapping, canonical_mcore_name, mappings

DEFAULT_BUCKET_BYTES = 64 << 20


@dataclass
class StreamStats:
    """What one stream moved and the most bytes it held at once (buffers it allocated)."""

    tensors: int = 0
    bytes_yielded: int = 0
    live_bytes: int = 0
    peak_bytes: int = 0
    largest_tensor_bytes: int = 0

    def hold(self, n: int) -> None:
        self.live_bytes += n
        self.peak_bytes = max(self.peak_bytes, self.live_bytes)

    def drop(self, n: int) -> None:
        self.live_bytes -= n


def unwrap(chunk: torch.nn.Module) -> torch.nn.Module:
    """The SplitLlamaModel inside DDP / Float16Module wrappers."""
    while not hasattr(chunk, "layout") and hasattr(chunk, "module"):
        chunk = chunk.module
    return chunk


def local_tensors(model_chunks: Sequence[torch.nn.Module]) -> dict[str, torch.Tensor]:
    """Global (TP=1 table) name -> this rank's parameter, over every chunk this rank holds."""
    out: dict[str, torch.Tensor] = {}
    for chunk in model_chunks:
        m = unwrap(chunk)
        for local, p in m.named_parameters():
            name = canonical_mcore_name(global_name(local, m.layout, m.stage))
            if name in out:
                raise ValueError(f"parameter {name} is held by two model chunks of this rank")
            out[name] = p
    return out


def _groups():
    """(tp group, tp size, tp rank, pp group, pp size, pp rank) of Megatron's parallel state."""
    from megatron.core import parallel_state as ps

    return (ps.get_tensor_model_parallel_group(), ps.get_tensor_model_parallel_world_size(),
            ps.get_tensor_model_parallel_rank(), ps.get_pipeline_model_parallel_group(),
            ps.get_pipeline_model_parallel_world_size(), ps.get_pipeline_model_parallel_rank())


def _owners(table: list[Mapping], mine: dict[str, torch.Tensor], pp_group, pp: int) -> dict[str, tuple[int, torch.dtype]]:
    """mcore name -> (pipeline rank holding it, its dtype); every table tensor exactly once."""
    held = {n: str(p.dtype).removeprefix("torch.") for n, p in mine.items()}
    per_rank: list = [None] * pp
    if pp > 1:
        dist.all_gather_object(per_rank, held, group=pp_group)
    else:
        per_rank = [held]
    owners: dict[str, tuple[int, torch.dtype]] = {}
    for r, names in enumerate(per_rank):
        for n, dt in names.items():
            if n in owners:
                raise ValueError(f"parameter {n} is held by pipeline ranks {owners[n][0]} and {r}")
            owners[n] = (r, getattr(torch, dt))
    want = {m.mcore for m in table}
    missing, extra = [n for n in want if n not in owners], [n for n in owners if n not in want]
    if missing or extra:
        raise ValueError(f"the live model does not match the export table: missing {sorted(missing)[:5]}, "
                         f"not in the table {sorted(extra)[:5]}")
    return owners


def _gather_tp(m: Mapping, local: torch.Tensor, full: torch.Tensor, tp_group, tp: int, tp_rank: int,
               scratch_elems: int, stats: StreamStats) -> None:
    """Every TP rank's slice of `m` into `full` (all TP ranks of the holding stage call this)."""
    axis = m.tp_axis
    for r in range(tp):
        views = m.shard_views(full, tp, r)
        pieces = local.split([v.shape[axis] for v in views], dim=axis) if r == tp_rank else [None] * len(views)
        src = dist.get_global_rank(tp_group, r)
        for v, piece in zip(views, pieces):
            if v.is_contiguous():
                if piece is not None:
                    v.copy_(piece)
                dist.broadcast(v, src=src, group=tp_group)
                continue
            row = v[0].numel()  # a row-parallel slice: a block of whole rows through the scratch buffer
            rows = max(1, min(v.shape[0], scratch_elems // max(1, row)))
            buf = torch.empty((rows, *v.shape[1:]), dtype=full.dtype, device=full.device)
            stats.hold(buf.numel() * buf.element_size())
            for r0 in range(0, v.shape[0], rows):
                n = min(rows, v.shape[0] - r0)
                blk = buf[:n]
                if piece is not None:
                    blk.copy_(piece[r0:r0 + n])
                dist.broadcast(blk, src=src, group=tp_group)
                v[r0:r0 + n].copy_(blk)
            stats.drop(buf.numel() * buf.element_size())
            del buf


def stream_hf_weights(model_chunks: Sequence[torch.nn.Module], model_cfg: Optional[ModelConfig] = None, *,
                      dtype: Optional[torch.dtype] = None, bucket_bytes: int = DEFAULT_BUCKET_BYTES,
                      stats: Optional[StreamStats] = None) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(hf_name, full_tensor)`` for the whole model, in `export-hf`'s names and order, on
    every rank. Collective over Megatron's TP and PP groups: every rank must call it and consume
    the generator to the end (or none may). `model_chunks`: this rank's model chunks (a list;
    DDP / Float16Module wrappers are unwrapped). `model_cfg`: default the chunks' own.
    `bucket_bytes`: the most bytes of the scratch buffer that gathers row-parallel slices.
    `dtype`: cast each yielded tensor (default: the model's). `stats`: filled as it goes."""
    chunks = [unwrap(c) for c in model_chunks]
    if not chunks:
        raise ValueError("stream_hf_weights needs this rank's model chunks (got none)")
    cfg = model_cfg or chunks[0].model_cfg
    stats = stats if stats is not None else StreamStats()
    table = mappings(cfg)
    tp_group, tp, tp_rank, pp_group, pp, pp_rank = _groups()
    mine = local_tensors(chunks)
    owners = _owners(table, mine, pp_group, pp)
    device = next(iter(mine.values())).device if mine else torch.device("cpu")
    scratch = max(1, bucket_bytes)
    with torch.no_grad():
        for m in table:
            owner, own_dtype = owners[m.mcore]
            nbytes = torch.Size(m.shape).numel() * own_dtype.itemsize
            stats.largest_tensor_bytes = max(stats.largest_tensor_bytes, nbytes)
            held = 0
            if pp_rank == owner and (tp == 1 or m.tp_axis is None):
                full = mine[m.mcore].detach()  # replicated: the parameter itself, no copy
                if tuple(full.shape) != m.shape:
                    raise ValueError(f"{m.mcore}: parameter has shape {tuple(full.shape)}, the table {m.shape}")
            else:
                full = torch.empty(m.shape, dtype=own_dtype, device=device)
                held = nbytes
                stats.hold(held)
                if pp_rank == owner:
                    _gather_tp(m, mine[m.mcore].detach(), full, tp_group, tp, tp_rank,
                               scratch // own_dtype.itemsize, stats)
            if pp > 1:
                dist.broadcast(full, src=dist.get_global_rank(pp_group, owner), group=pp_group)
            parts = m.split(full)
            copies = sum(p.numel() * p.element_size() for p in parts
                         if p.untyped_storage().data_ptr() != full.untyped_storage().data_ptr())
            stats.hold(copies)
            for name, part in zip(m.hf, parts):
                out = part if dtype is None or part.dtype == dtype else part.to(dtype)
                cast = out.numel() * out.element_size() if out is not part else 0
                stats.hold(cast)
                stats.tensors += 1
                stats.bytes_yielded += out.numel() * out.element_size()
                yield name, out
                stats.drop(cast)
                del out
            stats.drop(copies + held)
            del parts, full
