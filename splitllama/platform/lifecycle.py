"""Processes that must not outlive their parent (Linux PR_SET_PDEATHSIG).

torchrun starts its workers in their own sessions, so `kill -9 -PGID` (what schedulers and
users do to a launcher) kills only the agent: the workers would go on training and writing
checkpoints, and a restart would become a second concurrent writer. `die_with_launcher()`
asks the kernel to SIGKILL this process when its parent dies; it is on under torchrun
(TORCHELASTIC_RUN_ID set) and when SPLITLLAMA_DIE_WITH_PARENT=1 (the SLURM task wrapper sets
it); a plain `python pretrain_splitllama.py` keeps running when its shell goes away (nohup).
"""
from __future__ import annotations

import os
import signal

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
