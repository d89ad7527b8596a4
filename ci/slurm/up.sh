#!/usr/bin/env bash
# A single-node SLURM cluster on this machine, for bench's tests and as a worked example of bringing one up:
# munge, MariaDB + slurmdbd (job accounting: submitit asks `sacct` how a job ended), slurmctld and slurmd, all
# on loopback, all state in one folder. Debian's packages (slurm-wlm, slurmdbd, munge, mariadb-server), installed
# here when missing. Run as root (slurmd must be root to start jobs as their user). Stop it with down.sh.
#
#   bash ci/slurm/up.sh && source "${BENCH_SLURM_STATE:-/tmp/bench-slurm-cluster}/env"
#   sinfo; srun hostname; bench run suites/smoke.yaml --slurm debug
#
# The partition `debug` is this machine's CPUs and memory, without GPUs. Memory limits are enforced through
# cgroups (task/cgroup, ConstrainRAMSpace) where this machine lets slurmd use them; elsewhere the cluster runs
# with proctrack/linuxproc and task/none and says so in STATE/memory_enforced.
set -euo pipefail

STATE=${BENCH_SLURM_STATE:-/tmp/bench-slurm-cluster}
PORT=${BENCH_SLURM_PORT:-16817}  # slurmctld; slurmd PORT+1, slurmdbd PORT+2, MariaDB PORT+3
NODE=$(hostname -s)
HERE=$(cd "$(dirname "$0")" && pwd)

say() { echo "slurm-up: $*"; }
die() { say "$*"; exit 1; }

[ "$(id -u)" = 0 ] || die "needs root (slurmd starts jobs as their users); run it with sudo"
if [ -f "$STATE/env" ]; then
  die "a cluster's state is in $STATE already; run ci/slurm/down.sh first"
fi

install_packages() {
  local missing=()
  for pair in sbatch:slurm-client slurmctld:slurmctld slurmd:slurmd slurmdbd:slurmdbd munged:munge \
              mariadbd:mariadb-server; do
    command -v "${pair%%:*}" >/dev/null 2>&1 || PATH=$PATH:/usr/sbin command -v "${pair%%:*}" >/dev/null 2>&1 \
      || missing+=("${pair#*:}")
  done
  [ ${#missing[@]} -eq 0 ] && return 0
  say "installing ${missing[*]}"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
    "${missing[@]}" >/dev/null
}
export PATH=$PATH:/usr/sbin:/sbin
install_packages || die "could not install SLURM's Debian packages"

mkdir -p "$STATE"/{munge,db,ctld,spool,log,run}
chmod 700 "$STATE/munge"
export SLURM_CONF=$STATE/slurm.conf

wait_for() {  # wait_for SECONDS WHAT COMMAND...: until COMMAND succeeds
  local what=$2 until=$((SECONDS + $1)); shift 2
  while [ $SECONDS -lt $until ]; do
    timeout 10 "$@" >/dev/null 2>&1 && return 0
    sleep 0.2
  done
  die "$what did not come up in time; see $STATE/log/"
}

start_munge() {
  mungekey --create --keyfile="$STATE/munge/munge.key" --force
  chmod 400 "$STATE/munge/munge.key"
  munged --force --key-file="$STATE/munge/munge.key" --socket="$STATE/munge/munge.socket" \
    --pid-file="$STATE/run/munged.pid" --log-file="$STATE/log/munged.log" --seed-file="$STATE/munge/seed"
  wait_for 10 munged munge --socket="$STATE/munge/munge.socket" -n
}

start_mariadb() {  # the accounting database, on loopback only
  mariadb-install-db --no-defaults --datadir="$STATE/db" --user=root --skip-test-db \
    --auth-root-authentication-method=socket >"$STATE/log/mariadb-install.log" 2>&1
  mariadbd --no-defaults --datadir="$STATE/db" --socket="$STATE/run/mysql.sock" --bind-address=127.0.0.1 \
    --port=$((PORT + 3)) --user=root --pid-file="$STATE/run/mariadb.pid" --log-error="$STATE/log/mariadb.log" \
    --innodb-buffer-pool-size=32M --skip-name-resolve >/dev/null 2>&1 &
  wait_for 60 MariaDB mariadb --no-defaults --socket="$STATE/run/mysql.sock" -e 'select 1'
  DB_PASSWORD=$(head -c 18 /dev/urandom | base64 | tr -dc 'A-Za-z0-9')
  mariadb --no-defaults --socket="$STATE/run/mysql.sock" -e "
    CREATE USER 'slurm'@'127.0.0.1' IDENTIFIED BY '$DB_PASSWORD';
    GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';"
}

cgroups_usable() {  # whether slurmd can make cgroup v1 memory groups here
  [ -d /sys/fs/cgroup/memory ] && [ -w /sys/fs/cgroup/memory ] || return 1
  mkdir -p /sys/fs/cgroup/memory/bench-slurm-probe 2>/dev/null || return 1
  rmdir /sys/fs/cgroup/memory/bench-slurm-probe
}

write_config() {  # $1: cgroup or plain
  local cpus mem_mb
  cpus=$(nproc)
  mem_mb=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) * 9 / 10240 ))
  sed -e "s|@MEM_PER_CPU@|$((mem_mb / cpus))|g" -e "s|@STATE@|$STATE|g" -e "s|@NODE@|$NODE|g" \
      -e "s|@CPUS@|$cpus|g" -e "s|@MEM_MB@|$mem_mb|g" \
      -e "s|@PORT@|$PORT|g" -e "s|@PORT1@|$((PORT + 1))|g" -e "s|@PORT2@|$((PORT + 2))|g" \
      "$HERE/slurm.conf.in" >"$STATE/slurm.conf"
  if [ "$1" = cgroup ]; then
    printf '%s\n' "ProctrackType=proctrack/cgroup" "TaskPlugin=task/cgroup" >>"$STATE/slurm.conf"
    printf '%s\n' "CgroupPlugin=cgroup/v1" "CgroupMountpoint=/sys/fs/cgroup" "ConstrainRAMSpace=yes" \
      "ConstrainSwapSpace=yes" "AllowedSwapSpace=0" >"$STATE/cgroup.conf"
  else
    printf '%s\n' "ProctrackType=proctrack/linuxproc" "TaskPlugin=task/none" >>"$STATE/slurm.conf"
    printf '%s\n' "CgroupPlugin=autodetect" >"$STATE/cgroup.conf"
  fi
  cat >"$STATE/slurmdbd.conf" <<EOF
AuthType=auth/munge
AuthInfo=socket=$STATE/munge/munge.socket
DbdHost=localhost
DbdAddr=127.0.0.1
DbdPort=$((PORT + 2))
SlurmUser=root
LogFile=$STATE/log/slurmdbd.log
PidFile=$STATE/run/slurmdbd.pid
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$((PORT + 3))
StorageUser=slurm
StoragePass=$DB_PASSWORD
StorageLoc=slurm_acct_db
EOF
  chmod 600 "$STATE/slurmdbd.conf"
}

node_idle() { sinfo -h -n "$NODE" -o %T | grep -qx 'idle'; }

start_slurm() {  # $1: cgroup or plain; fails (without dying) where slurmd cannot start so
  write_config "$1"
  slurmctld -i >>"$STATE/log/slurmctld.out" 2>&1 || return 1
  wait_for 30 slurmctld scontrol ping
  slurmd -N "$NODE" >>"$STATE/log/slurmd.out" 2>&1 || return 1
  for _ in $(seq 100); do
    node_idle && return 0
    sleep 0.2
  done
  return 1
}

stop_slurm_daemons() {
  for name in slurmd slurmctld; do
    [ -f "$STATE/run/$name.pid" ] && kill "$(cat "$STATE/run/$name.pid")" 2>/dev/null || true
  done
  sleep 1
  rm -rf "${STATE:?}"/ctld/* "${STATE:?}"/spool/*
}

start_munge
start_mariadb
write_config plain  # slurmdbd reads its file beside slurm.conf
slurmdbd >>"$STATE/log/slurmdbd.out" 2>&1
wait_for 30 slurmdbd sacctmgr -n list cluster
sacctmgr -i add cluster bench >/dev/null

enforced=no
if cgroups_usable && start_slurm cgroup; then
  enforced=yes
else
  say "slurmd cannot use cgroups here: memory limits are not enforced (proctrack/linuxproc, task/none)"
  stop_slurm_daemons
  start_slurm plain || die "slurmd did not register its node; see $STATE/log/"
fi
echo "$enforced" >"$STATE/memory_enforced"
echo "export SLURM_CONF=$STATE/slurm.conf" >"$STATE/env"
say "up in $SECONDS s: partition debug on $NODE ($(nproc) CPUs, no GPUs), memory enforced: $enforced"
say "use it with: source $STATE/env"
