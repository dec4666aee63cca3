#!/bin/bash
# SplitLlama on one node under torchrun.
#
#   NPROC=2 CONFIG=configs/tiny.yaml launch/torchrun.sh [KEY=VALUE ...]
#   e.g. NPROC=2 launch/torchrun.sh parallel.pipeline_model_parallel_size=2 train.train_iters=50
#
# Environment (all optional):
#   NPROC           processes on this node (default: the number of visible GPUs, 1 without GPUs)
#   CONFIG          YAML config (default configs/tiny.yaml), relative to the repository or absolute
#   PYTHON          interpreter (default: the repository's .venv, else python3)
#   RUN_ROOT        where run dirs go (default <repo>/runs)
#   RUN_NAME        run dir name (default splitllama-<date>-<time>-<pid>)
#   RUN_DIR         the run dir (default $RUN_ROOT/$RUN_NAME): train.log, metrics.jsonl, checkpoints/
#   CKPT_DIR        checkpoint root, saved to AND resumed from (default $RUN_DIR/checkpoints; a
#                   checkpoint.save=DIR override sets it too);
#                   rerun with the same RUN_DIR (or CKPT_DIR) to resume
#   INIT_CKPT       weights to start from while CKPT_DIR holds no checkpoint (checkpoint.finetune=true)
#   MASTER_PORT     rendezvous port (default: a free one, torchrun --standalone)
#   DEVICE          cpu | gpu (default: gpu when GPUs are visible); gpu sets
#                   CUDA_DEVICE_MAX_CONNECTIONS=1 and NCCL defaults, cpu uses gloo
# KEY=VALUE arguments go to pretrain_splitllama.py after the ones this script adds, so they win.
# SIGUSR1 / SIGTERM / SIGINT to this script: each training process gets SIGUSR1 (once it has installed
# its handler, first thing in splitllama/entry.py; a signal caught during start-up is
# honoured at the first iteration), saves a checkpoint and exits 0; so does torchrun.
# (Not sent to torchrun's agent: it would die of SIGUSR1, and its workers with it, unsaved, as they
# die with their launcher: splitllama/platform/lifecycle.py.)
set -uo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
SPLITLLAMA_HOME=${SPLITLLAMA_HOME:-$(dirname "$HERE")}
# shellcheck source=launch/common.sh
. "$HERE/common.sh"
sl_abs_paths CONFIG RUN_ROOT RUN_DIR CKPT_DIR INIT_CKPT   # relative to where you are
cd "$SPLITLLAMA_HOME" || die "cannot cd to $SPLITLLAMA_HOME"
sl_python
CONFIG=${CONFIG:-configs/tiny.yaml}
[ -f "$CONFIG" ] || die "CONFIG=$CONFIG not found (relative paths are taken from $SPLITLLAMA_HOME)"

GPUS=$(sl_gpu_count)
if [ -z "${NPROC:-}" ]; then
  if [ "${DEVICE:-}" != cpu ] && [ "$GPUS" -gt 0 ]; then NPROC=$GPUS; else NPROC=1; fi
fi
CORES=$(nproc 2>/dev/null || echo 1)
sl_device_env "$(( CORES / NPROC > 0 ? CORES / NPROC : 1 ))"

RUN_ROOT=${RUN_ROOT:-$SPLITLLAMA_HOME/runs}
RUN_NAME=${RUN_NAME:-splitllama-$(date +%Y%m%d-%H%M%S)-$$}
RUN_DIR=${RUN_DIR:-$RUN_ROOT/$RUN_NAME}
CKPT_DIR=${CKPT_DIR:-$RUN_DIR/checkpoints}
sl_ckpt_from_overrides "$@"   # a user's checkpoint.save=DIR is also where the job resumes from
mkdir -p "$RUN_DIR" || die "cannot create RUN_DIR=$RUN_DIR"
LOG=$RUN_DIR/train.log
sl_tee_to "$LOG"
export PYTHONUNBUFFERED=1
sl_train_args
ARGS+=("$@")

if [ -n "${MASTER_PORT:-}" ]; then
  RDZV=(--rdzv-backend=c10d "--rdzv-endpoint=127.0.0.1:$MASTER_PORT" --nnodes=1)
else
  RDZV=(--standalone)
fi

say "=== torchrun: $NPROC process(es) on $(hostname) | device: $DEVICE | OMP_NUM_THREADS=$OMP_NUM_THREADS ==="
say "run dir: $RUN_DIR"
say "log: $LOG | metrics: $RUN_DIR/metrics.jsonl | checkpoints: $CKPT_DIR | start: $START"
say "command: $PYTHON -m torch.distributed.run ${RDZV[*]} --nproc-per-node=$NPROC pretrain_splitllama.py ${ARGS[*]}"

AGENT=""
SIGNALLED=""
forward() {
  SIGNALLED=${SIGNALLED:-$1}
  say "got SIG$1: asking the training processes to save a checkpoint and exit"
}
trap 'forward USR1' USR1
trap 'forward TERM' TERM
trap 'forward INT' INT   # Ctrl-C: background jobs ignore SIGINT, so ask for a checkpoint instead

"$PYTHON" -m torch.distributed.run "${RDZV[@]}" --nproc-per-node="$NPROC" \
  pretrain_splitllama.py "${ARGS[@]}" &
AGENT=$!
declare -A SENT=()
while kill -0 "$AGENT" 2>/dev/null; do
  if [ -n "$SIGNALLED" ]; then
    # SIGUSR1 to each worker (child of torchrun's agent) once it handles it: it saves and exits 0.
    # Not to the agent (it would die of it) nor to the workers' own helper processes.
    for p in $(pgrep -P "$AGENT"); do
      if [ -z "${SENT[$p]:-}" ] && sl_handles_usr1 "$p"; then
        kill -USR1 "$p" 2>/dev/null && SENT[$p]=1
      fi
    done
  fi
  sleep 0.5 & wait $!   # a trapped signal cuts this short
done
wait "$AGENT"; RC=$?
say "torchrun exited with status $RC${SIGNALLED:+ (SIG$SIGNALLED received)} | run dir: $RUN_DIR"
exit "$RC"
