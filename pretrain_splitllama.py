#!/usr/bin/env python
"""Train SplitLlama (also adapter-only warmup: model.freeze=all_but_adapter).

    python pretrain_splitllama.py --config configs/tiny.yaml [section.key=value ...]
    torchrun --nproc-per-node 4 pretrain_splitllama.py --config configs/tiny.yaml \\
        parallel.pipeline_model_parallel_size=2 parallel.tensor_model_parallel_size=2

`--help` lists every config key with its type, default and meaning; `-v` prints more.
"""
import sys

from splitllama.entry import main  # --help answers before Megatron is imported

if __name__ == "__main__":
    sys.exit(main())
