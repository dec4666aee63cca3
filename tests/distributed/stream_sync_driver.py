"""What an RL framework does with SplitLlama's loop: `run_job(job, weight_consumer=...)` with
rl.sync_interval set. The consumer (called on every rank) reads the first half of the stream
only — the loop drains the rest — and writes, per rank and sync, the names it read and their
sha256 (`export_digest`) to OUT_DIR/rank{r}_iter{i}.json.

Usage: torchrun ... stream_sync_driver.py OUT_DIR key=value ...  (overrides of configs/tiny.yaml)
"""
from __future__ import annotations

import json
import sys


def main() -> int:
    import torch.distributed as dist

    from splitllama.config.job import load_job_config
    from splitllama.rl.sync import export_digest
    from splitllama.training.app import run_job

    out_dir, overrides = sys.argv[1], sys.argv[2:]

    def consumer(iteration, weights):
        got = []
        for name, t in weights:
            got.append((name, t.clone()))
            if len(got) == 25:
                break
        with open(f"{out_dir}/rank{dist.get_rank()}_iter{iteration}.json", "w") as f:
            json.dump({"names": [n for n, _ in got], "sha256": export_digest(got)}, f)

    return run_job(load_job_config("configs/tiny.yaml", overrides), weight_consumer=consumer)


if __name__ == "__main__":
    sys.exit(main())
