"""One writer per checkpoint directory: an exclusive lock on ``ROOT/.lock``, held for the run.

The lock is an ``fcntl.flock`` on the lock file (the kernel drops it when the holder dies, so a
dead run never blocks the next one; on NFS v4 / Lustre with ``-o flock`` it works across nodes).
The holder writes ``host pid start-time`` into the file so that a refused run can name it.
Where the filesystem has no flock (ENOLCK / EOPNOTSUPP), the file's holder line is the lock:
a holder on this host whose pid is gone is stale and taken over; one on another host is
refused (remove the file if that run is dead).
"""
from __future__ import annotations

import errno
import fcntl
import os
import socket
import time
from typing import Optional

from splitllama.errors import UsageError
from splitllama.platform.lifecycle import pid_alive

LOCK_FILE = ".lock"


class CheckpointDirLocked(UsageError):
    """Another run holds the checkpoint directory."""


def _holder_line() -> str:
    return f"{socket.gethostname()} {os.getpid()} {time.strftime('%Y-%m-%dT%H:%M:%S')}\n"


def _parse(text: str) -> Optional[tuple[str, int, str]]:
    parts = text.split()
    if len(parts) >= 2 and parts[1].isdigit():
        return parts[0], int(parts[1]), parts[2] if len(parts) > 2 else "?"
    return None


def _describe(holder: Optional[tuple[str, int, str]]) -> str:
    if holder is None:
        return "an unknown process"
    host, pid, since = holder
    return f"host {host}, pid {pid}, since {since}"


class DirLock:
    """`acquire()` or raise `CheckpointDirLocked` naming the holder; `release()` (or exit)."""

    def __init__(self, root: str) -> None:
        self.root = root
        self.path = os.path.join(root, LOCK_FILE)
        self.fd: Optional[int] = None
        self.note: Optional[str] = None  # set when a stale lock was taken over
        self.created: list[str] = []  # what acquire() made: the lock file, the directory


    def acquire(self) -> "DirLock":
        made_root = not os.path.isdir(self.root)
        os.makedirs(self.root, exist_ok=True)
        made_file = not os.path.exists(self.path)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        self.created = [p for p, made in ((self.path, made_file), (self.root, made_root)) if made]
        previous = _parse(os.pread(fd, 256, 0).decode(errors="replace"))
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise CheckpointDirLocked(
                f"checkpoint directory {self.root} is in use by another run ({_describe(previous)}); "
                f"two runs must not write the same checkpoint.save (wait for it, stop it, or "
                f"choose another directory)") from None
        except OSError as e:
            if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.EINVAL):
                os.close(fd)
                raise
            self._without_flock(previous)
        if previous is not None and previous[1] != os.getpid():
            self.note = f"took over the stale lock of a run that is gone ({_describe(previous)})"
        os.ftruncate(fd, 0)
        os.pwrite(fd, _holder_line().encode(), 0)
        os.fsync(fd)
        self.fd = fd
        return self

    def _without_flock(self, previous: Optional[tuple[str, int, str]]) -> None:
        if previous is None:
            return
        host, pid, _ = previous
        if host == socket.gethostname() and (pid == os.getpid() or not pid_alive(pid)):
            return  # stale: its holder is gone
        raise CheckpointDirLocked(
            f"checkpoint directory {self.root} is in use by another run ({_describe(previous)}; this "
            f"filesystem has no flock, so if that run is dead remove {self.path})")

    def held(self) -> bool:
        """Whether the lock file this lock holds is still the one at its path (a deleted or
        replaced directory loses the lock: a second writer would not be stopped)."""
        if self.fd is None:
            return False
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return False
        mine = os.fstat(self.fd)
        return (st.st_dev, st.st_ino) == (mine.st_dev, mine.st_ino)

    def release(self, undo_create: bool = False) -> None:
        """Drop the lock; `undo_create`: also remove the lock file and directory acquire()
        created (a run refused before it wrote anything leaves nothing behind)."""
        if undo_create and self.fd is not None:
            for path in self.created:
                try:
                    os.unlink(path) if path == self.path else os.rmdir(path)
                except OSError:
                    break  # not empty (someone else's files): keep it
        if self.fd is not None:
            try:
                os.ftruncate(self.fd, 0)
            finally:
                os.close(self.fd)  # drops the flock
                self.fd = None
