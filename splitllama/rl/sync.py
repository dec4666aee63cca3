"""Weight syncs of a live (TP x PP x DP sharded) SplitLlama for an RL rollout engine.

An RL framework that trains with SplitLlama's loop passes a *weight consumer*::

    def consumer(iteration: int, weights: Iterator[tuple[str, torch.Tensor]]) -> None:
        # called on EVERY rank with the same stream (HF export names, full tensors); e.g. rank 0
        # hands them to its rollout engine: llm.collective_rpc("reload_weights",
        #     kwargs={"weights_iterator": ((n, t.clone()) for n, t in weights)})
        ...

    splitllama.training.app.run_job(job, weight_consumer=consumer)   # job.rl.sync_interval = K

Every K iterations (after the optimizer step) the loop calls `sync_weights`, which runs
`stream_hf_weights` on every rank, gives the consumer the stream and drains what it left (the
stream is collective: every rank must reach its end). Without a consumer the stream is still
run and `SyncResult` (tensors, bytes, sha256 over names and tensor bytes in export order,
seconds) is logged: the digest equals `export_digest` of `export-hf` of a checkpoint saved at the
same iteration, so a rollout side can check what it received.
"""
from __future__ import annotations

import hashlib
import time
from dataclasses import asdict, dataclass
from typing import Callable, Iterable, Iterator, Optional, Sequence

import torch

from splitllama.convert.stream import StreamStats, stream_hf_weights

WeightConsumer = Callable[[int, Iterator[tuple[str, torch.Tensor]]], None]


@dataclass
class SyncResult:
    iteration: int
    tensors: int
    bytes: int
    sha256: Optional[str]  # computed where `digest` was asked for (rank 0 in the loop)
    peak_stream_bytes: int
    seconds: float

    def to_dict(self) -> dict:
        return asdict(self)

    def line(self) -> str:
        digest = f" | sha256 {self.sha256}" if self.sha256 else ""
        return (f"[rl-sync] iteration {self.iteration} | {self.tensors} tensors | {self.bytes / 2 ** 20:.2f} MiB"
                f"{digest} | stream peak {self.peak_stream_bytes / 2 ** 20:.2f} MiB | {self.seconds:.2f} s")


def _update(h, name: str, t: torch.Tensor) -> None:
    h.update(name.encode())
    h.update(str(t.dtype).encode() + str(tuple(t.shape)).encode())
    h.update(memoryview(t.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy()))


def export_digest(tensors: Iterable[tuple[str, torch.Tensor]]) -> str:
    """sha256 over (name, dtype, shape, bytes) in the given order (e.g. an export's safetensors
    in file order): the digest a sync logs for the same weights."""
    h = hashlib.sha256()
    for name, t in tensors:
        _update(h, name, t)
    return h.hexdigest()


def sync_weights(model_chunks: Sequence[torch.nn.Module], iteration: int,
                 consumer: Optional[WeightConsumer] = None, *, digest: bool = True,
                 bucket_bytes: int = 64 << 20) -> SyncResult:
    """Collective: stream this rank's model chunks to `consumer` (every rank) and account for it."""
    t0 = time.perf_counter()
    stats = StreamStats()
    h = hashlib.sha256() if digest else None
    stream = stream_hf_weights(model_chunks, bucket_bytes=bucket_bytes, stats=stats)

    def tapped() -> Iterator[tuple[str, torch.Tensor]]:
        for name, t in stream:
            if h is not None:
                _update(h, name, t)
            yield name, t

    weights = tapped()
    if consumer is not None:
        consumer(iteration, weights)
    for _ in weights:  # what the consumer did not read: the other ranks still take part
        pass
    return SyncResult(iteration, stats.tensors, stats.bytes_yielded, h.hexdigest() if h is not None else None,
                      stats.peak_bytes, time.perf_counter() - t0)
