#!/usr/bin/env bash
# Bring up a 2-node SLURM cluster (n1, n2) on this one machine for CI.
# Debian 12, root, no systemd: daemons are started by hand (docs/design.md §7).
# Idempotent: reuses running daemons when the config is unchanged and both
# nodes respond, otherwise restarts slurm cleanly. Leaves the cluster up.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
CONF=/etc/slurm/slurm.conf
WAIT_S=${SLURM_UP_WAIT_S:-60}
t0=$SECONDS

# 1. Packages (apt only if something is missing).
if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null \
   || ! command -v sbatch >/dev/null || ! command -v munged >/dev/null; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q
  apt-get install -y -q --no-install-recommends slurm-wlm munge
fi

# 2. Config. CPUs must equal nproc or slurmd drains/refuses the node.
mkdir -p /etc/slurm /var/spool/slurmctld /var/spool/slurmd/n1 /var/spool/slurmd/n2 /var/log/slurm
NEW=$(mktemp)
cat >"$NEW" <<CONF_EOF
ClusterName=ci
SlurmctldHost=localhost
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
MpiDefault=none
MailProg=/bin/true
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SlurmdParameters=config_overrides
ReturnToService=2
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd-%n.pid
SlurmctldPort=6817
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd/%n
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd-%n.log
NodeName=n1 NodeHostname=localhost NodeAddr=127.0.0.2 Port=6821 CPUs=$(nproc) RealMemory=1000
NodeName=n2 NodeHostname=localhost NodeAddr=127.0.0.3 Port=6822 CPUs=$(nproc) RealMemory=1000
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
CONF_EOF
CONF_CHANGED=0
cmp -s "$NEW" "$CONF" || { install -m 0644 "$NEW" "$CONF"; CONF_CHANGED=1; }
rm -f "$NEW"

# 3. Node names must resolve (job scripts use them as MASTER_ADDR).
grep -qE '^127\.0\.0\.2[[:space:]]+n1([[:space:]]|$)' /etc/hosts || echo '127.0.0.2 n1' >>/etc/hosts
grep -qE '^127\.0\.0\.3[[:space:]]+n2([[:space:]]|$)' /etc/hosts || echo '127.0.0.3 n2' >>/etc/hosts

# 4. Munge: key, runtime dir (no systemd creates /run/munge), daemon.
if [ ! -s /etc/munge/munge.key ]; then
  if command -v mungekey >/dev/null; then mungekey -c -f -k /etc/munge/munge.key
  elif command -v create-munge-key >/dev/null; then create-munge-key -f
  else dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 status=none; fi
  chown munge:munge /etc/munge/munge.key; chmod 0400 /etc/munge/munge.key
fi
install -d -o munge -g munge -m 0755 /run/munge
if ! munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
  rm -f /run/munge/munged.pid /run/munge/munge.socket.2*
  runuser -u munge -- /usr/sbin/munged
  for _ in $(seq 50); do munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && break; sleep 0.1; done
  munge -n | unmunge >/dev/null || { echo "slurm_up: munged failed to start" >&2; exit 1; }
fi

# 5. Slurm daemons: reuse when all alive with the same config, else restart.
alive() { [ -s "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }
nodes_up() {  # both nodes registered and usable (idle, or busy with others' jobs)
  [ "$(sinfo -h -N -t idle,mix,alloc,comp -o %N 2>/dev/null | sort -u | tr '\n' ' ')" = "n1 n2 " ]
}
if [ $CONF_CHANGED = 0 ] && alive /run/slurmctld.pid && alive /run/slurmd-n1.pid \
   && alive /run/slurmd-n2.pid && nodes_up; then
  echo "slurm_up: reusing running cluster"; sinfo -N; exit 0
fi
SLURM_DOWN_KEEP_MUNGE=1 "$HERE/slurm_down.sh"
slurmctld -i          # -i: tolerate bad/stale state files left by earlier runs
slurmd -N n1
slurmd -N n2

# 6. Wait (bounded) until both nodes are usable.
for _ in $(seq $((WAIT_S * 2))); do
  if [ "$(sinfo -h -N -t idle -o %N 2>/dev/null | sort -u | tr '\n' ' ')" = "n1 n2 " ]; then
    echo "slurm_up: cluster up in $((SECONDS - t0)) s"; sinfo -N; exit 0
  fi
  sleep 0.5
done
echo "slurm_up: ERROR: n1/n2 not idle after ${WAIT_S} s" >&2
sinfo -N -l >&2 || true
for f in /var/log/slurm/slurmctld.log /var/log/slurm/slurmd-n1.log /var/log/slurm/slurmd-n2.log; do
  echo "---- tail $f" >&2; tail -n 20 "$f" >&2 2>/dev/null || true
done
exit 1
