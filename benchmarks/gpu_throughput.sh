#!/usr/bin/env bash
# One prepared GPU check (run through the device tool): real LLaMA-3 layer shapes, bf16,
# the training app end to end; writes the log and per-iteration metrics under $OUT.
# Needs megatron-core's wheel for the device's Python in .gpu_wheels/ (carried).
set -uo pipefail
OUT=${OUT:-runs/gpu}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -m pip install -q --no-deps --no-index .gpu_wheels/*.whl 2>&1 | tail -2
python3 - <<'PY' | tee -a "$OUT/gpu.txt"
import importlib.util, torch, megatron.core, transformers
print("torch", torch.__version__, "| megatron-core", megatron.core.__version__, "| transformers", transformers.__version__,
      "| transformer_engine", importlib.util.find_spec("transformer_engine") is not None,
      "| apex", importlib.util.find_spec("apex") is not None)
PY
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 CUDA_DEVICE_MAX_CONNECTIONS=1
python3 pretrain_splitllama.py --config configs/gpu_bench.yaml logging.metrics_file="$OUT/metrics.jsonl" "$@" \
  2>&1 | tee "$OUT/train.log" | grep -vE "Warning|warn\(" | tail -40
nvidia-smi --query-gpu=memory.used --format=csv | tee -a "$OUT/gpu.txt"
