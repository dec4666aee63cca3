"""Checkpoint converter: HF LLaMA 8B + 70B -> reshardable Megatron torch_dist checkpoint, and back.

    python tools/convert_checkpoint.py import-hf --lower DIR --upper DIR \\
        --num-layers-lower N --num-layers-upper M [--mlp] [--adapter-init random|identity] \\
        [--dtype bf16|fp32] [--head lm|value] [--value-head-init zeros|normal] --out CKPT
    python tools/convert_checkpoint.py lm-to-critic --ckpt LM_CKPT --out CRITIC_CKPT
    python tools/convert_checkpoint.py import-hf-split DIR --out CKPT
    python tools/convert_checkpoint.py export-hf --ckpt CKPT --out DIR [--dtype bf16|fp32]
    python tools/convert_checkpoint.py inspect CKPT|DIR

The logic lives in ``splitllama.convert`` (console entry point: ``splitllama.convert.cli:main``);
this file only makes the repository importable and calls it.
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from splitllama.convert.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
