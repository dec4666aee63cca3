"""A well-behaved results queue for Megatron-Core's torch_dist checkpoint writer.

megatron.core.dist_checkpointing's FileSystemWriterAsync collects write results through a
`multiprocessing` Manager it spawns lazily on the first save. That Manager process inherits
the trainer's stdout/stderr and outlives a trainer that is killed (SIGKILL, OOM, preemption):
it then holds the parent's pipes open (a supervisor waiting for EOF hangs) and lingers.
`install()` starts the Manager itself, once, with an initializer that detaches it from the
parent's stdio, ignores the preemption signals meant for the trainer (SIGTERM/SIGUSR1/SIGINT
sent to a whole job step would otherwise kill it and break the very save they ask for), and
asks the kernel to kill it when the parent dies (Linux PR_SET_PDEATHSIG), and hands its
queue to Megatron's writer (by setting the private module global below, which Megatron's
`_get_write_results_queue` fills lazily otherwise).
"""
from __future__ import annotations

import multiprocessing as mp
import os
import signal
from multiprocessing.managers import SyncManager

from splitllama.platform import patching
from splitllama.platform.lifecycle import set_parent_death_signal
from splitllama.platform.patching import Requirement

REQUIRES = (
    Requirement("megatron.core.dist_checkpointing.strategies.filesystem_async._results_queue",
                "megatron-core 0.16.1",
                "install() sets it to a queue of a Manager started here (detached, dies with "
                "the trainer) before Megatron's lazy _get_write_results_queue() makes its own"),
)

_MANAGER: SyncManager | None = None


def _detach_and_die_with_parent() -> None:
    # Preemption signals are for the trainer (which saves, then exits); the writer's helper
    # must survive them to serve that save. It still dies with its parent (below).
    for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
        signal.signal(sig, signal.SIG_IGN)
    set_parent_death_signal(signal.SIGKILL)  # best effort off Linux
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(devnull, fd)


def install() -> None:
    global _MANAGER
    patching.check(REQUIRES)
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    if _MANAGER is not None or filesystem_async._results_queue is not None:
        return
    _MANAGER = SyncManager(ctx=mp.get_context("spawn"))
    _MANAGER.start(initializer=_detach_and_die_with_parent)
    filesystem_async._results_queue = _MANAGER.Queue()
