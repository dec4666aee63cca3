"""SIGTERM / SIGUSR1 (SLURM preemption): remember the signal; the loop saves and exits 0."""
from __future__ import annotations

import signal
from typing import Optional

_RECEIVED: Optional[int] = None


def _handler(signum, frame) -> None:
    global _RECEIVED
    _RECEIVED = signum


def install() -> None:
    for sig in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, _handler)


def received() -> Optional[int]:
    return _RECEIVED
