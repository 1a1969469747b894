#!/usr/bin/env bash
# Single-node SLURM on localhost for qlab's SLURM tests (Debian 12, as root, no systemd needed).
# Tested with slurm-wlm 22.05.8-4+deb12u3 and munge 0.5.15-2+deb12u1.
#
#   ./slurm_up.sh up      # install (if needed), start munged + slurmctld + slurmd, wait until node is idle, smoke test
#   ./slurm_up.sh down    # cancel jobs, stop slurmd, slurmctld, munged (only the ones this script started, by PID)
#   ./slurm_up.sh status
#
# After "up", put $SLURM_BASE/bin first on PATH: it holds a tiny `sacct` stand-in (answers from squeue), because
# without slurmdbd the real sacct fails, and then submitit never notices a job that died without a result file
# (SIGKILL, OOM, node failure) and waits forever.
set -euo pipefail

SLURM_BASE=${SLURM_BASE:-/tmp/qlab-slurm}
ST=$SLURM_BASE/state
CONF=/etc/slurm/slurm.conf
# Minimal package set (8 debs). `apt-get install -y slurm-wlm munge` also works (43 debs, ~15 s).
APT_PKGS=${SLURM_APT_PKGS:-"slurmctld slurmd slurm-client munge"}

log() { echo "[slurm_up] $*" >&2; }

install_pkgs() {
  if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v sbatch >/dev/null \
     && command -v munged >/dev/null; then
    log "slurm + munge already installed"; return 0
  fi
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  # shellcheck disable=SC2086
  apt-get install -y -qq --no-install-recommends $APT_PKGS
}

start_munge() {
  if [ ! -s /etc/munge/munge.key ]; then   # the Debian package normally creates one already
    mungekey --create --keyfile=/etc/munge/munge.key \
      || dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
  fi
  chown munge:munge /etc/munge/munge.key && chmod 0400 /etc/munge/munge.key
  mkdir -p /run/munge && chown munge:munge /run/munge && chmod 0755 /run/munge
  if munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
    log "a working munged is already running; reusing it (will not stop it on down)"
    return 0
  fi
  runuser -u munge -- /usr/sbin/munged          # daemonizes, writes /run/munge/munged.pid
  for _ in $(seq 50); do munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && break; sleep 0.1; done
  cp /run/munge/munged.pid "$ST/munged.pid"     # remember that *we* started it
  log "munged pid $(cat "$ST/munged.pid")"
}

write_conf() {
  local cpus mem
  cpus=$(nproc)
  mem=$(free -m | awk '/^Mem:/{print $2}')
  mkdir -p /etc/slurm
  cat > "$CONF" <<EOF
ClusterName=ci
SlurmctldHost=localhost
SlurmUser=root
AuthType=auth/munge
StateSaveLocation=$ST/ctld
SlurmdSpoolDir=$ST/d
SlurmctldPidFile=$ST/slurmctld.pid
SlurmdPidFile=$ST/slurmd.pid
SlurmctldLogFile=$ST/log/slurmctld.log
SlurmdLogFile=$ST/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
MpiDefault=none
ReturnToService=2
MailProg=/bin/true
MinJobAge=3600
NodeName=localhost CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
  log "wrote $CONF (CPUs=$cpus RealMemory=$mem)"
}

write_sacct_shim() {
  mkdir -p "$SLURM_BASE/bin"
  cat > "$SLURM_BASE/bin/sacct" <<'EOF'
#!/bin/bash
# sacct stand-in (no slurmdbd). Handles what submitit runs:
#   sacct -o JobID,State,NodeList --parsable2 -j ID [-j ID ...]
ids=()
while [ $# -gt 0 ]; do
  case "$1" in
    -j|--jobs) ids+=("$2"); shift 2 ;;
    --jobs=*)  ids+=("${1#--jobs=}"); shift ;;
    -j*)       ids+=("${1#-j}"); shift ;;
    *) shift ;;
  esac
done
echo "JobID|State|NodeList"
[ ${#ids[@]} -eq 0 ] && exit 0
(IFS=,; exec squeue -h -t all -r -j "${ids[*]}" -o '%i|%T|%N')
EOF
  chmod +x "$SLURM_BASE/bin/sacct"
}

wait_ready() {
  local state=""
  for _ in $(seq 120); do
    state=$(sinfo -h -N -n localhost -o %T 2>/dev/null || true)
    [ "$state" = idle ] && { log "node localhost is idle"; return 0; }
    sleep 0.5
  done
  log "node never became idle (last state: '$state')"; tail -20 "$ST"/log/*.log >&2; return 1
}

up() {
  [ "$(id -u)" = 0 ] || { log "must run as root"; exit 1; }
  install_pkgs
  if [ -s "$ST/slurmctld.pid" ] && kill -0 "$(cat "$ST/slurmctld.pid")" 2>/dev/null; then
    log "already up"; wait_ready; return 0
  fi
  rm -rf "$ST"; mkdir -p "$ST"/{ctld,d,log}
  start_munge
  write_conf
  write_sacct_shim
  slurmctld    # daemonizes; pid -> $ST/slurmctld.pid
  slurmd       # daemonizes; pid -> $ST/slurmd.pid  (NodeName=localhost is matched even if hostname differs)
  wait_ready
  srun -N1 -n1 -t 1 true
  local jid st=""
  jid=$(sbatch --parsable -t 1 -o /dev/null --wrap true)   # (sbatch --wait works too, but polls slowly: ~10 s)
  for _ in $(seq 100); do
    st=$(scontrol show job "$jid" 2>/dev/null | grep -o 'JobState=[A-Z_]*' | cut -d= -f2)
    case "$st" in COMPLETED) break ;; FAILED|CANCELLED|TIMEOUT|NODE_FAIL|OUT_OF_MEMORY) break ;; esac
    sleep 0.2
  done
  [ "$st" = COMPLETED ] || { log "sbatch smoke test job $jid ended as '$st'"; return 1; }
  log "smoke test ok (srun, sbatch)"
  log "put $SLURM_BASE/bin first on PATH (sacct stand-in for submitit)"
}

alive() {   # running and not a zombie (an exited daemon stays a zombie until PID 1 reaps it)
  [ -e "/proc/$1" ] && [ "$(awk '{print $3}' "/proc/$1/stat" 2>/dev/null)" != Z ]
}

stop_pid() {   # stop_pid <pidfile> <expected comm>
  local f=$1 name=$2 pid
  [ -s "$f" ] || return 0
  pid=$(cat "$f")
  if kill -0 "$pid" 2>/dev/null && [ "$(cat /proc/"$pid"/comm 2>/dev/null)" = "$name" ]; then
    kill "$pid"
    for _ in $(seq 100); do alive "$pid" || break; sleep 0.1; done
    alive "$pid" && { log "$name ($pid) ignored SIGTERM, sending SIGKILL"; kill -9 "$pid"; }
    log "stopped $name ($pid)"
  fi
  rm -f "$f"
}

down() {
  scancel --partition=debug 2>/dev/null || true
  for _ in $(seq 50); do [ -z "$(squeue -h 2>/dev/null)" ] && break; sleep 0.2; done
  stop_pid "$ST/slurmd.pid" slurmd
  stop_pid "$ST/slurmctld.pid" slurmctld
  stop_pid "$ST/munged.pid" munged
}

status() {
  for p in slurmctld slurmd munged; do
    if [ -s "$ST/$p.pid" ] && kill -0 "$(cat "$ST/$p.pid")" 2>/dev/null; then echo "$p: running ($(cat "$ST/$p.pid"))"
    else echo "$p: not running (or not started by this script)"; fi
  done
  sinfo 2>/dev/null || true
}

case "${1:-up}" in
  up) up ;;
  down) down ;;
  status) status ;;
  *) echo "usage: $0 up|down|status" >&2; exit 2 ;;
esac
