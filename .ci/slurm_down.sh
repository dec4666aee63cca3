#!/usr/bin/env bash
# Stop the CI SLURM cluster started by slurm_up.sh, by pid file; missing or
# stale pid files are fine. SLURM_DOWN_KEEP_MUNGE=1 leaves munged running.
set -u
stop() {  # SIGTERM every live pid in the given pid files at once, wait <=10 s, then SIGKILL
  local f p pids=()
  for f in "$@"; do
    p=$(cat "$f" 2>/dev/null) && [ -n "$p" ] && kill -TERM "$p" 2>/dev/null && pids+=("$p")
    rm -f "$f"
  done
  for _ in $(seq 100); do
    alive=0; for p in "${pids[@]}"; do kill -0 "$p" 2>/dev/null && alive=1; done
    [ $alive = 0 ] && return 0
    sleep 0.1
  done
  for p in "${pids[@]}"; do kill -KILL "$p" 2>/dev/null && echo "slurm_down: SIGKILL $p"; done
  return 0
}
stop /run/slurmd-n1.pid /run/slurmd-n2.pid /run/slurmctld.pid   # slurm first: it needs munge
[ "${SLURM_DOWN_KEEP_MUNGE:-0}" = 1 ] || stop /run/munge/munged.pid
exit 0
