#!/usr/bin/env bash
# Prepared GPU check for the attention backends (run through the device tool, ~8 min on an H200):
#  1. one real LLaMA-3-8B and one LLaMA-3-70B decoder layer, bf16, fwd+bwd at seq 4096 and 8192,
#     local (Megatron DotProductAttention) vs sdpa: time, peak memory, TFLOP/s, MFU (cost-model
#     FLOPs, 989 TFLOP/s peak as benchmarks/GPU.md), plus the packed-vs-padded length mix;
#  2. the benchmarks/GPU.md training configuration (configs/gpu_bench.yaml) with
#     model.attention_backend=local and =sdpa: median MFU over iterations 3..N of each.
# Writes attention_cuda.json, metrics_{local,sdpa}.jsonl, train_{local,sdpa}.log, summary.json under $OUT.
# Needs megatron-core for the device's Python: installed there, or a wheel in .gpu_wheels/ (carried;
# `pip download megatron-core==0.16.1 --no-deps -d .gpu_wheels`).
# CPU smoke check at toy sizes (what CI-less sessions can run): SMOKE=1 bash benchmarks/attention_gpu.sh
set -uo pipefail
OUT=${OUT:-runs/attention_gpu}
mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 CUDA_DEVICE_MAX_CONNECTIONS=1
if [ "${SMOKE:-0}" = 1 ]; then
  DEV=(--device cpu --shapes scaled --seqs 128 --reps 1 --warmup 0 --mix-docs 6 --pack-length 128)
  TRAIN=(--config configs/tiny.yaml train.train_iters=4 train.eval_interval=0 logging.log_interval=1)
else
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
  python3 -c "import megatron.core" 2>/dev/null || python3 -m pip install -q --no-deps --no-index .gpu_wheels/*.whl 2>&1 | tail -2
  DEV=(--device cuda --shapes real --seqs 4096,8192 --reps 5 --warmup 2)
  TRAIN=(--config configs/gpu_bench.yaml)
fi
python3 benchmarks/attention.py "${DEV[@]}" --out "$OUT/attention_cuda.json" 2>&1 | grep -vE "Warning|warn\(" | tail -30
for b in local sdpa; do
  rm -f "$OUT/metrics_$b.jsonl"
  python3 pretrain_splitllama.py "${TRAIN[@]}" model.attention_backend=$b logging.metrics_file="$OUT/metrics_$b.jsonl" \
    > "$OUT/train_$b.log" 2>&1
  grep -E "^attention:|^iter|^done|Error" "$OUT/train_$b.log" | tail -6
done
python3 - "$OUT" <<'PY'
import json, statistics, sys
out = sys.argv[1]
summary = {}
for b in ("local", "sdpa"):
    try:
        recs = [json.loads(l) for l in open(f"{out}/metrics_{b}.jsonl")]
    except OSError:
        summary[b] = None
        continue
    recs = [r for r in recs if r.get("iteration", 0) >= 3] or recs
    summary[b] = {k: statistics.median(r[k] for r in recs if r.get(k) is not None) if any(r.get(k) is not None for r in recs) else None
                  for k in ("step_time_s", "tokens_per_s", "tflops_per_gpu", "mfu")}
print(json.dumps(summary, indent=1))
json.dump(summary, open(f"{out}/summary.json", "w"), indent=1)
PY
