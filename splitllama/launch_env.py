"""What the launcher (torchrun, a SLURM task) tells this process through its environment, read
before torch.distributed starts: the ONE answer to "which rank am I" at that time (error lines,
logging, checkpoint-directory and profile decisions made by rank 0 only). Stdlib only."""
from __future__ import annotations

import os


def rank() -> int:
    """This process's global rank from ``RANK`` (torchrun) or ``SLURM_PROCID`` (srun); 0 alone."""
    for var in ("RANK", "SLURM_PROCID"):
        if os.environ.get(var, "").isdigit():
            return int(os.environ[var])
    return 0
