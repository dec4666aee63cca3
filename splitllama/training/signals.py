"""SIGTERM / SIGUSR1 (SLURM preemption): remember the signal; the loop saves and exits 0.
SIGINT (Ctrl-C): the same save (when checkpoint.save is set; else the loop says that nothing
was saved), exit 130, no traceback; a second Ctrl-C interrupts at once.

The entry point calls `install()` before anything else and hands the returned flag to the
training loop, which checks it (all ranks agreeing) before every iteration."""
from __future__ import annotations

import signal
from typing import Optional

SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)


class PreemptionFlag:
    """Set by the signal handler; read by the loop. One per process, made by `install()`."""

    def __init__(self) -> None:
        self._received: Optional[int] = None

    def _handler(self, signum, frame) -> None:
        if signum == signal.SIGINT and self._received == signal.SIGINT:
            signal.signal(signal.SIGINT, signal.default_int_handler)
            raise KeyboardInterrupt  # the second Ctrl-C: stop now
        self._received = signum

    def received(self) -> Optional[int]:
        """The signal number that arrived, or None."""
        return self._received


def install() -> PreemptionFlag:
    """Handle SIGTERM and SIGUSR1 from now on by setting the returned flag."""
    flag = PreemptionFlag()
    for sig in SIGNALS:
        signal.signal(sig, flag._handler)
    return flag
