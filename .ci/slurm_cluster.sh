#!/usr/bin/env bash
# A single-node SLURM cluster for the `slurm` tests (tests/test_slurm.py): `.ci/slurm_cluster.sh up|down|status`.
#
# Debian 12 (slurm-wlm 22.05, munge 0.5), run as root on a machine without systemd. `up` installs the packages
# when they are missing (slurmctld slurmd slurm-client munge, no recommends), writes /etc/slurm/slurm.conf (one
# partition `debug` holding this node), starts munged, slurmctld and slurmd as plain processes and records their
# PIDs, and waits until a job runs. `down` cancels what is still queued and stops exactly the PIDs `up` recorded.
# State, logs and PIDs live in $EVOEXP_SLURM_DIR (default /tmp/evoexp-slurm); so does `bin/sacct`, a stand-in
# that answers submitit's `sacct -j IDS` from `squeue` (without an accounting daemon there is no sacct, and a
# job killed before writing its result would leave a multirun waiting forever): put its `bin/` first on PATH.
set -euo pipefail
D=${EVOEXP_SLURM_DIR:-/tmp/evoexp-slurm}
CONF=/etc/slurm/slurm.conf
MARK="# written by evoexp .ci/slurm_cluster.sh"
H=$(hostname -s)

say() { echo "slurm_cluster: $*" >&2; }
alive() { [ -s "$D/pids/$1" ] && kill -0 "$(cat "$D/pids/$1")" 2>/dev/null; }

install_packages() {
  command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v sbatch >/dev/null \
    && command -v munged >/dev/null && return 0
  [ "$(id -u)" = 0 ] || { say "the SLURM packages are missing and installing them needs root"; return 1; }
  export DEBIAN_FRONTEND=noninteractive
  local pkgs="slurmctld slurmd slurm-client munge"
  apt-get install -y -q --no-install-recommends $pkgs >/dev/null 2>&1 \
    || { apt-get update -q >/dev/null && apt-get install -y -q --no-install-recommends $pkgs >/dev/null; }
}

write_conf() {
  # slurm.conf takes one Key=Value per line (several on one line are a parse error), except on the NodeName and
  # PartitionName lines. A requeued job waits KillWait, then cred_expire + 1 s, then for the next scheduling pass:
  # KillWait=5, cred_expire=10 and passes every 2 s make that ~15 s instead of ~3 min. MinJobAge keeps finished
  # jobs in squeue (what the sacct stand-in reads). Addresses are given, so the hostname need not resolve.
  local mem=$(( $(free -m | awk '/^Mem:/{print $2}') - 1024 ))
  mkdir -p "$(dirname "$CONF")"
  { echo "$MARK"
    printf '%s\n' ClusterName=evoexp-ci "SlurmctldHost=$H(127.0.0.1)" SlurmUser=root AuthType=auth/munge \
      AuthInfo=cred_expire=10 ProctrackType=proctrack/linuxproc TaskPlugin=task/none \
      JobAcctGatherType=jobacct_gather/none AccountingStorageType=accounting_storage/none MpiDefault=none \
      SelectType=select/cons_tres SelectTypeParameters=CR_Core ReturnToService=2 KillWait=5 MinJobAge=3600 \
      SchedulerParameters=sched_interval=2,bf_interval=2 \
      "SlurmdSpoolDir=$D/spool" "StateSaveLocation=$D/state" "SlurmctldPidFile=$D/slurmctld.pid" \
      "SlurmdPidFile=$D/slurmd.pid" "SlurmctldLogFile=$D/log/slurmctld.log" "SlurmdLogFile=$D/log/slurmd.log"
    echo "NodeName=$H NodeAddr=127.0.0.1 CPUs=$(nproc) RealMemory=$mem State=UNKNOWN"
    echo "PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP"; } > "$CONF"
}

write_sacct() {
  cat > "$D/bin/sacct" <<'EOF'
#!/bin/sh
# sacct stand-in for submitit (no accounting daemon): `sacct ... -j ID[,ID...]` answered from squeue, which keeps
# finished jobs for MinJobAge seconds. Same `JobID|State|NodeList` lines as `sacct -o JobID,State,NodeList -P`.
ids=""
while [ $# -gt 0 ]; do case "$1" in -j) ids="$ids,$2"; shift;; esac; shift; done
echo "JobID|State|NodeList"
exec squeue -h -r -t all -j "${ids#,}" -o '%i|%T|%N'
EOF
  chmod +x "$D/bin/sacct"
}

up() {
  if alive slurmctld && alive slurmd && alive munged; then say "already up ($D)"; return 0; fi
  [ "$(id -u)" = 0 ] || { say "needs root (it writes $CONF and runs the daemons)"; return 1; }
  if [ -e "$CONF" ] && ! grep -qF "$MARK" "$CONF"; then
    say "$CONF exists and was not written by this script: not touching a real SLURM configuration"; return 1
  fi
  if pgrep -x slurmctld >/dev/null || pgrep -x slurmd >/dev/null; then
    say "slurmctld or slurmd is already running and was not started by this script"; return 1
  fi
  install_packages
  rm -rf "$D"
  mkdir -p "$D"/{spool,state,log,bin,pids} /run/munge
  chown munge:munge /run/munge  # systemd's RuntimeDirectory would create it; without systemd nothing does
  if [ ! -s /etc/munge/munge.key ]; then
    mungekey -c -f && chown munge:munge /etc/munge/munge.key && chmod 600 /etc/munge/munge.key
  fi
  write_conf
  write_sacct
  # setsid + setpriv exec the daemons themselves (no wrapper process), so $! is each daemon's own PID
  setsid setpriv --reuid=munge --regid=munge --init-groups /usr/sbin/munged -F </dev/null \
    >"$D/log/munged.out" 2>&1 & echo $! > "$D/pids/munged"
  for _ in $(seq 50); do [ -S /run/munge/munge.socket.2 ] && break; sleep 0.1; done
  setsid /usr/sbin/slurmctld -D -i </dev/null >"$D/log/slurmctld.out" 2>&1 & echo $! > "$D/pids/slurmctld"
  setsid /usr/sbin/slurmd -D </dev/null >"$D/log/slurmd.out" 2>&1 & echo $! > "$D/pids/slurmd"
  for _ in $(seq 60); do [ "$(sinfo -h -o %T 2>/dev/null)" = idle ] && break; sleep 0.5; done
  if ! timeout 30 srun hostname >/dev/null; then
    say "the cluster did not run a job; logs in $D/log"; tail -n 5 "$D"/log/*.log >&2 || true; down; return 1
  fi
  say "up: $(sinfo -h -o '%P %T %N %c CPUs %m MB') (state in $D; PATH=$D/bin:\$PATH for sacct)"
}

down() {
  [ -d "$D/pids" ] || { say "not up ($D/pids missing)"; return 0; }
  # cancel what is left and give slurmd a moment to reap the job steps, then stop exactly the recorded PIDs
  squeue -h -o %A 2>/dev/null | sort -u | xargs -r scancel 2>/dev/null || true
  for _ in $(seq 30); do [ -z "$(squeue -h -t running,completing 2>/dev/null)" ] && break; sleep 0.5; done
  local pids=""
  for name in slurmd slurmctld munged; do alive "$name" && pids="$pids $(cat "$D/pids/$name")"; done
  [ -n "$pids" ] && kill $pids 2>/dev/null || true
  for p in $pids; do
    for _ in $(seq 50); do kill -0 "$p" 2>/dev/null || break; sleep 0.2; done
    kill -0 "$p" 2>/dev/null && { say "pid $p ignored SIGTERM, sending SIGKILL"; kill -9 "$p" 2>/dev/null || true; }
  done
  if [ -e "$CONF" ] && grep -qF "$MARK" "$CONF"; then rm -f "$CONF"; fi
  rm -rf "$D"
  say "down (stopped:${pids:- nothing})"
}

status() {
  local ok=0
  for name in munged slurmctld slurmd; do
    if alive "$name"; then echo "$name: pid $(cat "$D/pids/$name")"; else echo "$name: not running"; ok=1; fi
  done
  [ $ok = 0 ] && sinfo -h -o '%P %T %N' || true
  return $ok
}

case "${1:-}" in
  up|down|status) "$1" ;;
  *) echo "usage: $0 up|down|status   (state in \$EVOEXP_SLURM_DIR, default /tmp/evoexp-slurm)" >&2; exit 2 ;;
esac
