#!/usr/bin/env bash
# A single-node Slurm on this machine, for the test suite and for trying the launch scripts:
#
#   sudo tools/local_slurm.sh up      # install (Debian packages) + configure + start; idempotent
#   tools/local_slurm.sh status       # sinfo of the node
#   sudo tools/local_slurm.sh down    # stop the daemons (the packages stay)
#
# Installs slurmctld, slurmd, munge and slurm-client from Debian (Slurm 22.05 on bookworm),
# writes /etc/slurm/slurm.conf for one node named after this host with SLURM_CPUS CPUs
# (default 8: more than the cores here, so that a 4-task job and a second job fit at once;
# `SlurmdParameters=config_overrides` lets the node claim them) and one partition `debug`,
# starts munged, slurmctld and slurmd, and waits until the node is idle. Process tracking
# is proctrack/linuxproc (no cgroups needed, so it works inside containers). Requeue is on
# (JobRequeue=1) and KillWait is 30 s, as on most clusters. Needs root; about 15-25 s.
set -euo pipefail

CPUS="${SLURM_CPUS:-8}"
CONF=/etc/slurm/slurm.conf
HOST="$(hostname -s)"
CHANGED=""

log() { echo "local_slurm: $*"; }

need_root() {
  if [[ "$(id -u)" != 0 ]]; then
    echo "local_slurm: must run as root (it installs packages and starts daemons)" >&2
    exit 1
  fi
}

install() {
  if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v sbatch >/dev/null \
      && command -v munged >/dev/null; then
    return
  fi
  log "installing slurmctld slurmd munge slurm-client (Debian packages)"
  export DEBIAN_FRONTEND=noninteractive
  if ! apt-get install -y -q slurmctld slurmd munge slurm-client >/tmp/local_slurm_apt.log 2>&1; then
    apt-get update -q >>/tmp/local_slurm_apt.log 2>&1 || true
    apt-get install -y -q slurmctld slurmd munge slurm-client >>/tmp/local_slurm_apt.log 2>&1 || {
      echo "local_slurm: apt-get install failed; see /tmp/local_slurm_apt.log" >&2
      tail -5 /tmp/local_slurm_apt.log >&2
      exit 1
    }
  fi
}

configure() {
  local mem_mb
  mem_mb=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 - 1024 ))
  mkdir -p /etc/slurm /var/spool/slurmctld /var/spool/slurmd /var/log/slurm
  cat >"$CONF.tmp" <<EOF
# Written by megads tools/local_slurm.sh: one node, one partition, for tests.
ClusterName=megads-local
SlurmctldHost=$HOST
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
# a requeued job may start again after cred_expire seconds (default 120: two idle minutes per requeue)
AuthInfo=cred_expire=10
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SlurmdParameters=config_overrides
ReturnToService=2
JobRequeue=1
KillWait=30
MinJobAge=600
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2
NodeName=$HOST CPUs=$CPUS RealMemory=$mem_mb State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
  if cmp -s "$CONF.tmp" "$CONF"; then
    rm -f "$CONF.tmp"
  else
    mv "$CONF.tmp" "$CONF"
    CHANGED=1
  fi
}

running() { pgrep -x "$1" >/dev/null; }

start() {
  if ! running munged; then
    mkdir -p /run/munge && chown munge:munge /run/munge 2>/dev/null || true
    [[ -s /etc/munge/munge.key ]] || { /usr/sbin/mungekey --create >/dev/null 2>&1 || true; }
    chown munge:munge /etc/munge/munge.key 2>/dev/null || true
    chmod 0400 /etc/munge/munge.key
    if id munge >/dev/null 2>&1; then
      runuser -u munge -- /usr/sbin/munged
    else
      /usr/sbin/munged --force
    fi
  fi
  if [[ -n "$CHANGED" ]] && { running slurmctld || running slurmd; }; then
    log "the config changed: restarting the Slurm daemons"  # `scontrol reconfigure` misses some settings
    pkill -x slurmd || true
    pkill -x slurmctld || true
    sleep 1
  fi
  running slurmctld || /usr/sbin/slurmctld
  running slurmd || /usr/sbin/slurmd
  local i
  for i in $(seq 1 60); do
    state=$(sinfo -h -N -o '%t' 2>/dev/null | head -1 || true)
    case "$state" in
      idle|mix|alloc) log "node $HOST up ($state, $CPUS CPUs, partition debug)"; return ;;
      down*|drain*) scontrol update nodename="$HOST" state=resume >/dev/null 2>&1 || true ;;
    esac
    sleep 0.5
  done
  echo "local_slurm: the node did not come up; see /var/log/slurm/slurmctld.log and slurmd.log" >&2
  tail -5 /var/log/slurm/slurmctld.log /var/log/slurm/slurmd.log >&2 || true
  exit 1
}

stop() {
  pkill -x slurmd || true
  pkill -x slurmctld || true
  pkill -x munged || true
}

case "${1:-up}" in
  up) need_root; install; configure; start ;;
  down) need_root; stop ;;
  status) sinfo -N ;;
  *) echo "usage: $0 up|down|status" >&2; exit 2 ;;
esac
