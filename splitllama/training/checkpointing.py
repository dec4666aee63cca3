"""Save / resume a training run: model + optimizer (fully reshardable torch_dist), LR
scheduler, per-rank RNG states, data position, iteration and the resolved config."""
from __future__ import annotations

import errno
import logging
import os
import shutil
import signal

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing
from megatron.core import parallel_state as ps
from megatron.core.dist_checkpointing.validation import StrictHandling
from megatron.core.tensor_parallel.random import get_cuda_rng_tracker
from torch.distributed.checkpoint.api import CheckpointException
from safetensors.torch import load_file, save_file

from splitllama.checkpoint import dirs
from splitllama.platform.compat import writer_queue
from splitllama.checkpoint.model_io import SHARDED_METADATA, load_model_weights, model_sharded_state_dict
from splitllama.errors import UsageError, is_disk_full
from splitllama.platform.compat import optim as optim_compat
from splitllama.training import optim_state
from splitllama.training.runtime import Runtime
from splitllama.training.state import TrainState

log = logging.getLogger("splitllama")
# Fault injection (docs/reliability.md): SIGKILL this process after writing the shards of the
# save at this iteration, before the checkpoint is marked complete (crash-during-save path).
FAULT_KILL_IN_SAVE = "SPLITLLAMA_FAULT_KILL_IN_SAVE"
# Fault injection: the save at this iteration fails with ENOSPC once its shards are written
# (a full disk, where no small filesystem can be mounted for the test).
FAULT_ENOSPC_IN_SAVE = "SPLITLLAMA_FAULT_ENOSPC_IN_SAVE"
_NEARLY_FULL_BYTES = 16 * 1024 * 1024


class SaveFailed(UsageError):
    """A save that could not be written (a full disk); the partial directory is removed."""


def _nearly_full(path: str) -> bool:
    try:
        st = os.statvfs(path)
    except OSError:
        return False
    return st.f_bavail * st.f_frsize < _NEARLY_FULL_BYTES


def _save_failed(root: str, tmp: str, it: int, exc: BaseException) -> BaseException:
    """Remove the partial `tmp` (it would keep the disk full) and say why the save failed."""
    full = is_disk_full(exc) or _nearly_full(root)
    shutil.rmtree(tmp, ignore_errors=True)
    if not full:
        return exc
    latest = dirs.latest_name(root)
    last = [ln.strip() for ln in str(exc).splitlines() if ln.strip()] or [type(exc).__name__]
    return SaveFailed(f"no space left on device saving the checkpoint of iteration {it} to {root} "
                      f"({last[-1][:200]}); removed the partial "
                      f"{os.path.basename(tmp)}; "
                      + (f"latest still names {latest}" if latest else "no earlier checkpoint"))


def _coords() -> dict:
    return {"pp": ps.get_pipeline_model_parallel_rank(), "tp": ps.get_tensor_model_parallel_rank(),
            "dp": ps.get_data_parallel_rank()}


def _sizes() -> dict:
    return {"pp": ps.get_pipeline_model_parallel_world_size(), "tp": ps.get_tensor_model_parallel_world_size(),
            "dp": ps.get_data_parallel_world_size()}


def _rng_file(path: str) -> str:
    c = _coords()
    return os.path.join(path, "rng", f"pp{c['pp']}_tp{c['tp']}_dp{c['dp']}.safetensors")


def _rng_tensors() -> dict[str, torch.Tensor]:
    out = {"cpu": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state()}
    for name, state in get_cuda_rng_tracker().get_states().items():
        out[f"tracker.{name}"] = state
    return {k: v.clone().contiguous() for k, v in out.items()}


def _restore_rng(tensors: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(tensors["cpu"])
    torch.cuda.set_rng_state(tensors["cuda"])
    get_cuda_rng_tracker().set_states({k[len("tracker."):]: v for k, v in tensors.items()
                                       if k.startswith("tracker.")})


def _optimizer_sd(rt: Runtime, model_sd: dict, is_loading: bool) -> dict:
    optim_compat.ensure_state(rt.optimizer)
    return rt.optimizer.sharded_state_dict(model_sd, is_loading=is_loading,
                                           metadata=dict(SHARDED_METADATA))


class AsyncSaves:
    """The asynchronous saves of one training run (the loop owns one): Megatron's
    AsyncCallsQueue, created on the first `checkpoint.async_save` save."""

    def __init__(self) -> None:
        self._queue = None

    def schedule(self, request) -> None:
        if self._queue is None:
            from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue

            self._queue = AsyncCallsQueue()
        self._queue.schedule_async_request(request)

    def finalize(self, blocking: bool = False) -> None:
        """Complete asynchronous saves whose shards are written (collective)."""
        if self._queue is not None:
            self._queue.maybe_finalize_async_calls(blocking=blocking)


def save(rt: Runtime, root: str, saves: AsyncSaves) -> str:
    """Collective: every rank calls it. Returns the final checkpoint directory.

    With `checkpoint.async_save` the shards are written by a background process and the
    checkpoint becomes `latest` only when `saves.finalize()` sees every rank finished
    (the loop polls it each iteration, and blocks on it before the next save and at exit)."""
    saves.finalize(blocking=True)  # at most one save in flight
    it = rt.state.iteration
    writer_queue.install()
    tmp = os.path.join(root, dirs.tmp_dirname(it))
    if dist.get_rank() == 0:
        os.makedirs(root, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)  # debris of an earlier crashed save
        os.makedirs(tmp)  # empty: Megatron warns about (and clears) a non-empty one
    dist.barrier()
    model_sd = model_sharded_state_dict(rt.inner)
    sd = {"model": model_sd}
    common = None
    if optim_state.has_params(rt.optimizer):
        sd["optimizer"], common = optim_state.split(_optimizer_sd(rt, model_sd, is_loading=False))
    common = optim_state.gather_common(common)  # collective
    rng = _rng_tensors()
    # everything describing this moment is captured now, written when the shards are done
    meta = {**rt.state.to_dict(), "scheduler": rt.scheduler.state_dict(), "parallel_sizes": _sizes(),
            "optimizer_common": common}
    model_dict, job_yaml, keep = rt.job.model.to_dict(), rt.job.to_yaml(), rt.job.checkpoint.keep_last

    def complete() -> None:
        if os.environ.get(FAULT_KILL_IN_SAVE) == str(it):  # fault injection: crash-in-save test
            os.kill(os.getpid(), signal.SIGKILL)
        if dist.get_rank() == 0:
            dirs.write_json(tmp, dirs.MODEL_CONFIG, model_dict)
            with open(os.path.join(tmp, dirs.JOB_CONFIG), "w") as f:
                f.write(job_yaml)
            dirs.write_json(tmp, dirs.TRAIN_STATE, meta)
            dirs.finalize(root, tmp, it)
            dirs.prune(root, keep)

    final = os.path.join(root, dirs.iter_dirname(it))
    try:
        if rt.job.checkpoint.async_save:
            request = dist_checkpointing.save(sd, tmp, async_sharded_save=True)
            _write_rng(tmp, rng)
            request.add_finalize_fn(complete)
            saves.schedule(request)
            return final
        dist_checkpointing.save(sd, tmp)
        _write_rng(tmp, rng)
        if os.environ.get(FAULT_ENOSPC_IN_SAVE) == str(it):  # fault injection: full disk
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), os.path.join(tmp, "__0_0.distcp"))
    except (Exception, CheckpointException) as e:  # torch's CheckpointException is a BaseException
        raise _save_failed(root, tmp, it, e) from e
    dist.barrier()
    complete()
    dist.barrier()
    return final


def _write_rng(tmp: str, rng: dict) -> None:
    os.makedirs(os.path.join(tmp, "rng"), exist_ok=True)
    save_file(rng, _rng_file(tmp))


def load(rt: Runtime, path: str, finetune: bool) -> None:
    """Resume (weights, optimizer, scheduler, RNG, data position, iteration) or, with
    `finetune`, take the weights only and start at iteration 0."""
    ckpt = dirs.resolve(path)
    if finetune:
        load_model_weights(rt.inner, ckpt)
        log.info("loaded weights from %s (finetune: fresh optimizer, iteration 0)", ckpt)
        return
    meta = dirs.read_json(ckpt, dirs.TRAIN_STATE)
    if meta is None:
        raise ValueError(f"{ckpt} holds no {dirs.TRAIN_STATE}: it is a weights-only checkpoint "
                         f"(e.g. converted from HF); load it with checkpoint.finetune=true")
    model_sd = model_sharded_state_dict(rt.inner)
    sd = {"model": model_sd}
    resume_optimizer = meta.get("optimizer_common") is not None and optim_state.has_params(rt.optimizer)
    if resume_optimizer:
        sd["optimizer"], _ = optim_state.split(_optimizer_sd(rt, model_sd, is_loading=True))
    loaded = dist_checkpointing.load(sd, ckpt, strict=StrictHandling.ASSUME_OK_UNEXPECTED)
    missing, unexpected = rt.inner.load_state_dict(loaded["model"], strict=False)
    missing = [k for k in missing if not k.endswith("_extra_state")]
    if missing or unexpected:
        raise KeyError(f"{ckpt}: model mismatch: missing {missing[:5]}, unexpected {unexpected[:5]}")
    if resume_optimizer:
        rt.optimizer.load_state_dict(optim_state.restore(loaded["optimizer"], meta["optimizer_common"]))
        optim_compat.unshare_steps(rt.optimizer)
    rt.scheduler.load_state_dict(meta["scheduler"])
    rt.state = TrainState.from_dict(meta)
    rng = _rng_file(ckpt)
    if meta.get("parallel_sizes") == _sizes() and os.path.isfile(rng):
        _restore_rng(load_file(rng))
    else:
        log.info("parallel layout changed since the save: RNG states not restored")
    log.info("resumed from %s at iteration %d", ckpt, rt.state.iteration)
