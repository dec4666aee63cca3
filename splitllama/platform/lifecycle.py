"""Processes that must not outlive their parent (Linux PR_SET_PDEATHSIG).

torchrun starts its workers in their own sessions, so `kill -9 -PGID` (what schedulers and
users do to a launcher) kills only the agent: the workers would go on training and writing
checkpoints, and a restart would become a second concurrent writer. `die_with_launcher()`
asks the kernel to SIGKILL this process when its parent dies; it is on under torchrun
(TORCHELASTIC_RUN_ID set) and when SPLITLLAMA_DIE_WITH_PARENT=1 (the SLURM task wrapper sets
it); a plain `python pretrain_splitllama.py` keeps running when its shell goes away (nohup).
"""
from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from collections.abc import Iterator

DIE_WITH_PARENT_ENV = "SPLITLLAMA_DIE_WITH_PARENT"
_PR_SET_PDEATHSIG = 1


def pid_alive(pid: int) -> bool:
    """Is process `pid` running on this host?"""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    return True


def set_parent_death_signal(sig: int = signal.SIGKILL) -> bool:
    """Ask the kernel to send `sig` to this process when its parent dies. False if not Linux."""
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        return libc.prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def die_with_launcher() -> None:
    if not (os.environ.get("TORCHELASTIC_RUN_ID") or os.environ.get(DIE_WITH_PARENT_ENV) == "1"):
        return
    parent = os.getppid()
    if set_parent_death_signal() and (parent == 1 or os.getppid() != parent):
        os._exit(1)  # the launcher died before we could ask: we are already orphaned


def _raise_on_terminate(signum, frame) -> None:
    print(f"error: terminated by signal {signum}; removing the partial output", file=sys.stderr, flush=True)
    raise SystemExit(128 + signum)  # unwinds through the writers' cleanup (finally blocks)


@contextlib.contextmanager
def terminate_unwinds() -> Iterator[None]:
    """While the block runs, SIGTERM raises SystemExit(143) in the main thread, so `finally`
    blocks remove partial outputs; the previous handler is back when the block ends (no handler
    outlives its command: a leaked raising handler is inherited by forked pool workers, and one
    of them dying inside the pool's queue lock hangs `Pool.terminate`). No-op off the main thread."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise_on_terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def sigterm_blocked() -> Iterator[None]:
    """Block SIGTERM in this thread while the block runs (around forking pool workers: a child
    inherits the mask, so the parent's Python handler cannot run in it before its initializer
    calls `default_signals_in_child`); a SIGTERM that arrived meanwhile is delivered after."""
    old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def default_signals_in_child() -> None:
    """For forked workers (a Pool initializer, forked under `sigterm_blocked`): SIGTERM kills
    (the parent's Python handler is not theirs: `Pool.terminate` must end them at once) and
    Ctrl-C is left to the parent."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})
