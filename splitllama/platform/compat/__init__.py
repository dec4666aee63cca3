"""Version-specific workarounds of torch / megatron-core private APIs, each module declaring
what it relies on as `REQUIRES` (checked by `platform.patching.check` before use):

- `optim`: DistributedOptimizer checkpointing with the torch Adam fallback (megatron-core 0.16.1)
- `writer_queue`: the results queue of Megatron's async torch_dist writer (megatron-core 0.16.1)
- `dcp`: torch DCP internals used by the converter's streaming writer (torch 2.13.0)
- `model`: rope's llama3 scaling (megatron-core 0.16.1) and SDPA's kernel choice (torch 2.13.0)
- `datasets`: ``torch.distributed.get_rank`` answered while Megatron's dataset builder runs
  without a process group (a reversible patch)

The CPU harness (`platform.cpu.PATCHES`) is the other, reversible, set.
"""
from __future__ import annotations


def requirements() -> tuple:
    """Every declared private target: the CPU harness's patches and the workarounds above."""
    from splitllama.platform import cpu
    from splitllama.platform.compat import datasets, dcp, model, optim, writer_queue

    return (cpu.REQUIRES + cpu.PATCHES + optim.REQUIRES + writer_queue.REQUIRES + dcp.REQUIRES
            + model.REQUIRES + datasets.REQUIRES)
