# Shared helpers of the launch scripts (sourced, not run). Needs SPLITLLAMA_HOME set.
# shellcheck shell=bash

sl_ts() { date '+%Y-%m-%d %H:%M:%S'; }
say() { echo "[launch $(sl_ts)] $*"; }
die() { echo "[launch $(sl_ts)] ERROR: $*" >&2; exit 2; }

# PYTHON: the interpreter (default: the checkout's .venv, else python3).
sl_python() {
  if [ -z "${PYTHON:-}" ]; then
    if [ -x "$SPLITLLAMA_HOME/.venv/bin/python" ]; then PYTHON=$SPLITLLAMA_HOME/.venv/bin/python; else PYTHON=python3; fi
  fi
  export PYTHON
}

# Count visible GPUs (0 without nvidia-smi).
sl_gpu_count() {
  if [ -n "${SLURM_GPUS_ON_NODE:-}" ] && [ "${SLURM_GPUS_ON_NODE}" != 0 ]; then echo "$SLURM_GPUS_ON_NODE"; return; fi
  if command -v nvidia-smi >/dev/null 2>&1; then
    nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true
  else
    echo 0
  fi
}

# DEVICE (cpu|gpu, default from the GPUs visible here) and the matching environment.
# $1: default OMP_NUM_THREADS on CPU.
sl_device_env() {
  local cpu_threads=${1:-1}
  if [ -z "${DEVICE:-}" ]; then
    if [ "$(sl_gpu_count)" -gt 0 ]; then DEVICE=gpu; else DEVICE=cpu; fi
  fi
  case "$DEVICE" in
    gpu)
      # Megatron's TP/SP comm-compute overlap relies on a single hardware queue per device.
      export CUDA_DEVICE_MAX_CONNECTIONS=${CUDA_DEVICE_MAX_CONNECTIONS:-1}
      export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}
      export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
      export NCCL_IB_TIMEOUT=${NCCL_IB_TIMEOUT:-22}
      export OMP_NUM_THREADS=${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-4}}
      # Site knobs are passed through when set: NCCL_SOCKET_IFNAME, NCCL_IB_HCA, NCCL_NET_GDR_LEVEL...
      ;;
    cpu)
      export SPLITLLAMA_DEVICE=cpu   # gloo + the CPU harness
      export OMP_NUM_THREADS=${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-$cpu_threads}}
      ;;
    *) die "DEVICE=$DEVICE: expected cpu or gpu" ;;
  esac
  export DEVICE
}

# A checkpoint.save=DIR among the user's overrides ("$@") becomes CKPT_DIR: the run saves there
# AND resumes from there (checkpoint.load is set to the same directory).
sl_ckpt_from_overrides() {
  local prev=""
  for a in "$@"; do
    case "$a" in
      checkpoint.save=*|--checkpoint.save=*) CKPT_DIR=${a#*=} ;;
    esac
    if [ "$prev" = --checkpoint.save ]; then CKPT_DIR=$a; fi
    prev=$a
  done
  export CKPT_DIR
}

# ARGS: --config and the checkpoint / metrics arguments of a resumable run; START: what it starts from.
#   CKPT_DIR  saved to and resumed from (checkpoint.load == checkpoint.save: resume-or-start)
#   INIT_CKPT weights to start from while CKPT_DIR holds no checkpoint (checkpoint.finetune=true)
sl_train_args() {
  ARGS=(--config "$CONFIG" "checkpoint.save=$CKPT_DIR" "checkpoint.load=$CKPT_DIR"
        "logging.metrics_file=$RUN_DIR/metrics.jsonl")
  if [ -f "$CKPT_DIR/latest" ]; then
    START="resume from $CKPT_DIR/$(cat "$CKPT_DIR/latest")"
  elif [ -n "${INIT_CKPT:-}" ]; then
    ARGS+=("checkpoint.load=$INIT_CKPT" "checkpoint.finetune=true")
    START="weights of $INIT_CKPT (checkpoint.finetune=true)"
  else
    START="scratch"
  fi
}

# Send this shell's output also to $1 (appending), with tee immune to the preemption signals
# (scancel --full / a process-group signal would otherwise kill it and break our stdout).
# On exit the pipe is closed and tee allowed to write out the last lines.
sl_tee_to() {
  exec > >(trap '' USR1 USR2 TERM INT HUP; exec tee -a "$1") 2>&1
  SL_TEE_PID=$!
  trap 'exec >&- 2>&-; wait "$SL_TEE_PID" 2>/dev/null' EXIT
}

# Has process $1 installed a handler for SIGUSR1 (bit 9 of SigCgt in /proc/<pid>/status)?
# The app does so first thing in splitllama/training/entry.py; before that a SIGUSR1 would kill it.
sl_handles_usr1() {
  local caught
  caught=$(awk '/^SigCgt:/{print $2}' "/proc/$1/status" 2>/dev/null)
  [ -n "$caught" ] && (( (16#$caught >> 9) & 1 ))
}

# Make the path variables named in "$@" absolute against the current directory (call it before
# cd-ing into the checkout); CONFIG only when it exists here (else it is taken from the checkout).
sl_abs_paths() {
  local v val
  for v in "$@"; do
    val=${!v:-}
    [ -n "$val" ] || continue
    case "$val" in /*) continue ;; esac
    if [ "$v" = CONFIG ] && [ ! -e "$val" ]; then continue; fi
    printf -v "$v" '%s' "$PWD/$val"
    export "${v?}"
  done
}

# Split "$@" at a lone "--": sbatch options before it into the array SB, training overrides
# after it into OV. Without a "--" both stay empty and the status is 1 (the caller decides).
sl_split_dashdash() {
  SB=() OV=()
  printf '%s\n' "$@" | grep -qx -- '--' || return 1
  while [ $# -gt 0 ] && [ "$1" != "--" ]; do SB+=("$1"); shift; done
  shift
  OV=("$@")
}
