#!/bin/bash
# Adapter warmup pipeline: two SLURM jobs of launch/slurm.sbatch, the second `--dependency=afterok`
# on the first.
#   phase 1 (warmup): model.freeze=all_but_adapter, train.train_iters=$WARMUP_ITERS, starting from
#                     BASE_CKPT (e.g. the import-hf checkpoint; random init when unset);
#                     checkpoints in $PIPELINE_DIR/warmup
#   phase 2 (train):  every parameter trains, starting from the warmup's final weights
#                     (checkpoint.finetune=true: fresh optimizer, iteration 0);
#                     checkpoints in $PIPELINE_DIR/train
# Both phases are preemptible and resume from their own checkpoint dir when requeued.
#
#   BASE_CKPT=/ckpt/splitllama-base WARMUP_ITERS=200 CONFIG=configs/my.yaml \
#     launch/adapter_warmup.sh -N 2 --ntasks-per-node=8 --gpus-per-node=8 -- [KEY=VALUE ...]
#
# Arguments before `--` go to sbatch (both jobs), after it to both phases' pretrain_splitllama.py.
# Environment:
#   WARMUP_ITERS      phase-1 iterations (default 100)
#   BASE_CKPT         phase-1 starting weights (optional)
#   WARMUP_OVERRIDES  extra KEY=VALUE for phase 1 only, space-separated (e.g. "optimizer.lr=1e-3")
#   TRAIN_OVERRIDES   extra KEY=VALUE for phase 2 only, space-separated
#   PIPELINE_DIR      holds warmup/ and train/ (default $RUN_ROOT/<name>-<date>-<time>)
#   PIPELINE_NAME     job-name prefix (default splitllama): jobs <name>-warmup and <name>-train
#   and everything launch/submit.sh and slurm.sbatch read (CONFIG, RUN_ROOT, PYTHON, ...).
# Prints "warmup job <id> run_dir <dir>" and "train job <id> run_dir <dir>".
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
export SPLITLLAMA_HOME=${SPLITLLAMA_HOME:-$(dirname "$HERE")}
# shellcheck source=launch/common.sh
. "$HERE/common.sh"
sl_abs_paths CONFIG RUN_ROOT BASE_CKPT PIPELINE_DIR
export RUN_ROOT=${RUN_ROOT:-$SPLITLLAMA_HOME/runs}
unset RUN_DIR CKPT_DIR INIT_CKPT   # set per phase below
PIPELINE_NAME=${PIPELINE_NAME:-splitllama}
WARMUP_ITERS=${WARMUP_ITERS:-100}
PIPELINE_DIR=${PIPELINE_DIR:-$RUN_ROOT/$PIPELINE_NAME-$(date +%Y%m%d-%H%M%S)}
mkdir -p "$PIPELINE_DIR"
PIPELINE_DIR=$(cd "$PIPELINE_DIR" && pwd)

sl_split_dashdash "$@" || SB=("$@")
read -r -a WARM_EXTRA <<<"${WARMUP_OVERRIDES:-}"
read -r -a TRAIN_EXTRA <<<"${TRAIN_OVERRIDES:-}"

job_of() { awk '/^job [0-9]+ run_dir /{print $2}' <<<"$1"; }
dir_of() { awk '/^job [0-9]+ run_dir /{print $4}' <<<"$1"; }

# Phase 1: adapter only. Its common overrides come first so that the phase's own settings win.
OUT1=$(CKPT_DIR=$PIPELINE_DIR/warmup INIT_CKPT=${BASE_CKPT:-} \
       "$HERE/submit.sh" --job-name="$PIPELINE_NAME-warmup" "${SB[@]}" -- \
       "${OV[@]}" model.freeze=all_but_adapter "train.train_iters=$WARMUP_ITERS" "${WARM_EXTRA[@]}")
J1=$(job_of "$OUT1")
[ -n "$J1" ] || { echo "adapter_warmup: phase-1 submission failed: $OUT1" >&2; exit 1; }
echo "warmup job $J1 run_dir $(dir_of "$OUT1")"

# Phase 2: full training from the warmup's latest checkpoint, once phase 1 has succeeded.
OUT2=$(CKPT_DIR=$PIPELINE_DIR/train INIT_CKPT=$PIPELINE_DIR/warmup \
       "$HERE/submit.sh" --job-name="$PIPELINE_NAME-train" --dependency="afterok:$J1" --kill-on-invalid-dep=yes \
       "${SB[@]}" -- "${OV[@]}" "${TRAIN_EXTRA[@]}")
J2=$(job_of "$OUT2")
[ -n "$J2" ] || { echo "adapter_warmup: phase-2 submission failed: $OUT2" >&2; scancel "$J1"; exit 1; }
echo "train job $J2 run_dir $(dir_of "$OUT2")"
echo "checkpoints: $PIPELINE_DIR/warmup (phase 1) -> $PIPELINE_DIR/train (phase 2)"
