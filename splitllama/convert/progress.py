"""Progress bar (bytes and tensors) and byte formatting for the conversion tools."""
from __future__ import annotations

import sys
from typing import Optional, TextIO

from tqdm import tqdm


def fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} TiB"


class Progress:
    """A tqdm bar over bytes whose postfix counts tensors (disabled: no output at all)."""

    def __init__(self, total_bytes: int, total_tensors: int, desc: str, enabled: bool = True,
                 stream: Optional[TextIO] = None) -> None:
        self.total_tensors, self.done_tensors = total_tensors, 0
        self.bar = tqdm(total=total_bytes, unit="B", unit_scale=True, unit_divisor=1024, desc=desc,
                        file=stream or sys.stderr, disable=not enabled, dynamic_ncols=True,
                        mininterval=0.5)

    def update(self, nbytes: int, tensors: int = 1) -> None:
        self.done_tensors += tensors
        self.bar.set_postfix_str(f"{self.done_tensors}/{self.total_tensors} tensors", refresh=False)
        self.bar.update(nbytes)

    def close(self) -> None:
        self.bar.close()
