#!/bin/bash
# Checkpoint conversion (tools/convert_checkpoint.py) as a CPU batch job: no GPU needed.
#
#   sbatch -c 16 --mem=64G -t 4:00:00 launch/convert.sh import-hf \
#       --lower /models/Llama-3-8B --upper /models/Llama-3-70B \
#       --num-layers-lower 16 --num-layers-upper 40 [--mlp] --out /ckpt/splitllama-base
#   sbatch launch/convert.sh export-hf --ckpt /ckpt/run/checkpoints --out /models/splitllama-hf
#   sbatch launch/convert.sh inspect /ckpt/splitllama-base
#
# Every argument goes to tools/convert_checkpoint.py unchanged. Without SLURM (no SLURM_JOB_ID)
# it runs in the foreground. Submit from the repository root or set SPLITLLAMA_HOME.
# Log: $RUN_ROOT/<job name>-<job id>/job.log (RUN_ROOT default <repo>/runs); the converter streams
# one tensor at a time, so memory is about the largest tensor plus one shard buffer.
#
#SBATCH --job-name=splitllama-convert
#SBATCH --nodes=1
#SBATCH --ntasks=1
#SBATCH --open-mode=append
set -uo pipefail
if [ -n "${SLURM_JOB_ID:-}" ]; then
  SPLITLLAMA_HOME=${SPLITLLAMA_HOME:-${SLURM_SUBMIT_DIR:-$PWD}}
else
  SPLITLLAMA_HOME=${SPLITLLAMA_HOME:-$(dirname "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)")}
fi
if [ ! -f "$SPLITLLAMA_HOME/launch/common.sh" ]; then
  echo "convert.sh: no launch/common.sh in SPLITLLAMA_HOME=$SPLITLLAMA_HOME (submit from the repository root or set SPLITLLAMA_HOME)" >&2
  exit 2
fi
# shellcheck source=launch/common.sh
. "$SPLITLLAMA_HOME/launch/common.sh"
sl_abs_paths RUN_ROOT RUN_DIR
cd "$SPLITLLAMA_HOME" || die "cannot cd to $SPLITLLAMA_HOME"
[ $# -gt 0 ] || die "usage: [sbatch] launch/convert.sh import-hf|import-hf-split|export-hf|inspect ARGS..."
sl_python

if [ -n "${SLURM_JOB_ID:-}" ]; then
  RUN_ROOT=${RUN_ROOT:-$SPLITLLAMA_HOME/runs}
  RUN_DIR=${RUN_DIR:-$RUN_ROOT/${SLURM_JOB_NAME:-splitllama-convert}-$SLURM_JOB_ID}
  mkdir -p "$RUN_DIR" || die "cannot create RUN_DIR=$RUN_DIR"
  sl_tee_to "$RUN_DIR/job.log"
  say "=== conversion job $SLURM_JOB_ID on ${SLURMD_NODENAME:-$(hostname)} (${SLURM_CPUS_ON_NODE:-?} CPUs) ==="
  say "run dir: $RUN_DIR"
fi
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-$(nproc 2>/dev/null || echo 1)}}
export CUDA_VISIBLE_DEVICES=""   # CPU work: keep any GPU out of it
export PYTHONUNBUFFERED=1
say "command: $PYTHON tools/convert_checkpoint.py $*"
t0=$SECONDS
"$PYTHON" tools/convert_checkpoint.py "$@"
RC=$?
say "convert_checkpoint.py exited with status $RC after $((SECONDS - t0)) s"
exit "$RC"
