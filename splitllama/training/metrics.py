"""Where logged numbers go: stdout, a JSONL metrics file, TensorBoard, wandb (when enabled
and installed). Only global rank 0 writes."""
from __future__ import annotations

import json
import logging
import os
from typing import Optional

import torch.distributed as dist

from splitllama.config.train import LoggingConfig

log = logging.getLogger("splitllama")

# Dense bf16 peak TFLOP/s by GPU name fragment (for MFU). Unknown devices report no MFU.
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0}


def peak_tflops(on_cpu: bool) -> Optional[float]:
    if on_cpu:
        return None
    import torch

    name = torch.cuda.get_device_name()
    return next((v for k, v in PEAK_TFLOPS.items() if k in name), None)


class MetricsSink:
    def __init__(self, cfg: LoggingConfig, run_config: dict) -> None:
        self.rank0 = dist.get_rank() == 0
        self.file = None
        self.tb = None
        self.wandb = None
        if not self.rank0:
            return
        if cfg.metrics_file:
            os.makedirs(os.path.dirname(os.path.abspath(cfg.metrics_file)), exist_ok=True)
            self.file = open(cfg.metrics_file, "a")
        if cfg.tensorboard_dir:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(cfg.tensorboard_dir)
            except ImportError:
                log.warning("logging.tensorboard_dir set but tensorboard is not installed")
        if cfg.wandb_project:
            try:
                import wandb

                os.environ.setdefault("WANDB_MODE", cfg.wandb_mode)
                self.wandb = wandb.init(project=cfg.wandb_project, config=run_config)
            except ImportError:
                log.warning("logging.wandb_project set but wandb is not installed")

    def write(self, record: dict) -> None:
        if not self.rank0:
            return
        if self.file:
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()
        step = record.get("iteration", 0)
        scalars = {k: v for k, v in record.items() if isinstance(v, (int, float)) and k != "iteration"}
        if self.tb:
            for k, v in scalars.items():
                self.tb.add_scalar(k, v, step)
        if self.wandb:
            self.wandb.log(scalars, step=step)

    def close(self) -> None:
        if self.file:
            self.file.close()
        if self.tb:
            self.tb.close()
        if self.wandb:
            self.wandb.finish()
