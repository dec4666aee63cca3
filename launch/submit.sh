#!/bin/bash
# Submit launch/slurm.sbatch and say where its logs go.
#
#   launch/submit.sh [SBATCH OPTIONS ...] [-- KEY=VALUE ...]
#   e.g. CONFIG=configs/tiny.yaml launch/submit.sh -N 2 --ntasks-per-node=1 -- train.train_iters=50
#
# Arguments before `--` go to sbatch, after it to pretrain_splitllama.py (section.key=value).
# Without `--`, arguments that look like section.key=value are overrides, the rest sbatch options.
# Environment: everything slurm.sbatch reads (CONFIG, RUN_ROOT, CKPT_DIR, INIT_CKPT, PYTHON, ...);
# SPLITLLAMA_HOME defaults to this checkout, RUN_ROOT to $SPLITLLAMA_HOME/runs.
# Prints "job <id> run_dir <dir>" on the last line (the per-job directory slurm.sbatch writes).
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
export SPLITLLAMA_HOME=${SPLITLLAMA_HOME:-$(dirname "$HERE")}
# shellcheck source=launch/common.sh
. "$HERE/common.sh"
sl_abs_paths CONFIG RUN_ROOT RUN_DIR CKPT_DIR INIT_CKPT   # the job runs in the checkout
export RUN_ROOT=${RUN_ROOT:-$SPLITLLAMA_HOME/runs}
export CONFIG=${CONFIG:-configs/tiny.yaml}
SCRIPT=${SBATCH_SCRIPT:-$HERE/slurm.sbatch}

if ! sl_split_dashdash "$@"; then
  for a in "$@"; do
    if [[ $a =~ ^[A-Za-z_][A-Za-z0-9_]*\.[A-Za-z0-9_.]+= ]]; then OV+=("$a"); else SB+=("$a"); fi
  done
fi

mkdir -p "$RUN_ROOT"
JOB=$(sbatch --parsable --chdir="$SPLITLLAMA_HOME" --output="$RUN_ROOT/%x-%j.out" "${SB[@]}" "$SCRIPT" "${OV[@]}")
JOB=${JOB%%;*}
NAME=$(scontrol show job "$JOB" 2>/dev/null | sed -n 's/.*JobName=\([^ ]*\).*/\1/p' | head -1)
echo "submitted job $JOB; sbatch output $RUN_ROOT/${NAME:-splitllama}-$JOB.out"
echo "job $JOB run_dir ${RUN_DIR:-$RUN_ROOT/${NAME:-splitllama}-$JOB}"
