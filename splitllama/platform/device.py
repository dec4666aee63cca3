"""The device this process's tensors live on: the current CUDA device, or the CPU when there
is no GPU or the CPU harness (`platform.cpu`) is enabled. Runtime, model and training code ask
here, never the harness."""
from __future__ import annotations

import torch

from splitllama.platform import cpu


def device() -> torch.device:
    if cpu.active() or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", torch.cuda.current_device())
