"""This stage's compute time per micro-batch, measured inside Megatron-Core's pipeline schedules.

megatron-core 0.16.1 (`pipeline_parallel/schedules.py`) calls, when `config.timers` is set,
``config.timers('forward-compute', log_level=2).start()`` at the top of `forward_step` and
``.stop()`` at the end of `forward_step_calc_loss` (the loss included), and
``config.timers('backward-compute', log_level=2).start()/.stop()`` around `backward_step`.
The p2p exchanges ('forward-recv', 'backward-send', ...) and 'forward-backward' /
'all-grads-sync' are timed outside those, so forward + backward compute is the stage's busy time,
without the time it waits on its neighbours. `StageTimers` is a callable with that interface
(the names Megatron-LM's `--timing-log-level 2` reports); every other name gets a no-op timer
(its ``barrier=`` request is not honoured: this timer never synchronises).

CPU: `time.perf_counter` (gloo compute is synchronous). GPU: a pair of CUDA events per
micro-batch, recorded on the current stream; `read()` waits for the last one and sums the
elapsed times once per log interval — no synchronisation per micro-batch. Forward passes run
under ``torch.no_grad()`` (evaluation) are not counted.
"""
from __future__ import annotations

import time

import torch

COMPUTE = ("forward-compute", "backward-compute")


class _NoTimer:
    def start(self, barrier: bool = False) -> None:
        pass

    def stop(self, barrier: bool = False) -> None:
        pass


_NO_TIMER = _NoTimer()


class _CpuTimer:
    def __init__(self) -> None:
        self.seconds, self.count, self._t0 = 0.0, 0, None

    def start(self, barrier: bool = False) -> None:
        self._t0 = time.perf_counter()

    def stop(self, barrier: bool = False) -> None:
        if self._t0 is not None:
            self.seconds += time.perf_counter() - self._t0
            self.count += 1
            self._t0 = None

    def read(self) -> tuple[float, int]:
        out = (self.seconds, self.count)
        self.seconds, self.count = 0.0, 0
        return out


class _CudaTimer:
    def __init__(self) -> None:
        self._pairs: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []
        self._free: list[torch.cuda.Event] = []
        self._open = None

    def _event(self) -> "torch.cuda.Event":
        return self._free.pop() if self._free else torch.cuda.Event(enable_timing=True)

    def start(self, barrier: bool = False) -> None:
        self._open = self._event()
        self._open.record()

    def stop(self, barrier: bool = False) -> None:
        if self._open is not None:
            end = self._event()
            end.record()
            self._pairs.append((self._open, end))
            self._open = None

    def read(self) -> tuple[float, int]:
        if not self._pairs:
            return 0.0, 0
        self._pairs[-1][1].synchronize()
        seconds = sum(a.elapsed_time(b) for a, b in self._pairs) / 1e3
        count = len(self._pairs)
        for a, b in self._pairs:
            self._free += [a, b]
        self._pairs = []
        return seconds, count


class StageTimers:
    """``timers(name, log_level=None)`` -> a timer with ``start()`` / ``stop()``, like
    `megatron.core.timers.Timers`; only the two compute timers measure."""

    def __init__(self, cuda: bool) -> None:
        make = _CudaTimer if cuda else _CpuTimer
        self._timers = {name: make() for name in COMPUTE}

    def __call__(self, name: str, log_level=None):
        timer = self._timers.get(name)
        if timer is None or (name == "forward-compute" and not torch.is_grad_enabled()):
            return _NO_TIMER
        return timer

    def read(self) -> dict[str, tuple[float, int]]:
        """{name: (seconds, micro-batches)} since the last read (then reset)."""
        return {name: t.read() for name, t in self._timers.items()}
