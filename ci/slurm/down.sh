#!/usr/bin/env bash
# Stops the cluster ci/slurm/up.sh started (its daemons, by the pid files in its state folder) and removes the
# folder. Jobs still running are killed with slurmd.
set -uo pipefail
STATE=${BENCH_SLURM_STATE:-/tmp/bench-slurm-cluster}
[ -d "$STATE" ] || exit 0
export SLURM_CONF=$STATE/slurm.conf PATH=$PATH:/usr/sbin:/sbin
scancel --full --quiet --user="$(id -un)" 2>/dev/null
for name in slurmd slurmctld slurmdbd mariadb munged; do
  pidfile=$STATE/run/$name.pid
  [ -f "$pidfile" ] || continue
  pid=$(cat "$pidfile")
  kill "$pid" 2>/dev/null || continue
  for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
  kill -9 "$pid" 2>/dev/null
done
# the cgroups slurmd made (task/cgroup: slurm_NODE under each controller) hold nothing now; remove the empty trees
for tree in /sys/fs/cgroup/*/slurm_*; do
  [ -d "$tree" ] && find "$tree" -depth -type d -exec rmdir {} + 2>/dev/null
done
rm -rf "$STATE"
echo "slurm-down: stopped"
