#!/usr/bin/env bash
# Stop the local Slurm cluster started by start.sh and leave nothing behind: daemons, jobs'
# processes, the /etc/hosts line and the state dir. Safe to run when nothing is running.
set -uo pipefail

DIR="${LDMSCALE_SLURM_DIR:-/tmp/ldmscale-slurm}"
HOSTS_TAG="# ldmscale-slurm"

stop_pidfile() {  # stop_pidfile FILE: TERM, then KILL after 10 s, the one process the file names
  local f="$1" pid
  [ -f "$f" ] || return 0
  pid="$(cat "$f")"
  kill -0 "$pid" 2>/dev/null || return 0
  kill -TERM "$pid" 2>/dev/null
  for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || return 0; sleep 0.1; done
  kill -KILL "$pid" 2>/dev/null || true
}

if [ -f "$DIR/slurm.conf" ]; then
  # Cancel jobs first so slurmd reaps their steps rather than orphaning them.
  SLURM_CONF="$DIR/slurm.conf" timeout 10 scancel --full --user=root >/dev/null 2>&1 || true
  SLURM_CONF="$DIR/slurm.conf" timeout 10 scancel --full --state=PENDING >/dev/null 2>&1 || true
  sleep 1
fi
for f in "$DIR"/run/slurmd-*.pid "$DIR/run/slurmctld.pid"; do stop_pidfile "$f"; done
# A slurmstepd that outlived scancel and slurmd (it runs in this cluster's log dir), with its job's processes.
children() { for s in /proc/[0-9]*/stat; do read -r -a f 2>/dev/null < "$s" && [ "${f[3]:-}" = "$1" ] && echo "${f[0]}"; done; }
kill_tree() { local c; for c in $(children "$1"); do kill_tree "$c"; done; kill -KILL "$1" 2>/dev/null || true; }
for p in /proc/[0-9]*; do
  case "$(tr '\0' ' ' 2>/dev/null < "$p/cmdline")" in
    slurmstepd*) [[ "$(readlink "$p/cwd" 2>/dev/null)" == "$DIR"* ]] && kill_tree "${p#/proc/}" ;;
  esac
done
stop_pidfile "$DIR/munge/munged.pid"

if grep -q "$HOSTS_TAG" /etc/hosts 2>/dev/null; then
  # Rewrite in place (no rename): /etc/hosts may be a bind mount.
  grep -v "$HOSTS_TAG" /etc/hosts > /tmp/.ldmscale-hosts.$$
  cat /tmp/.ldmscale-hosts.$$ > /etc/hosts
  rm -f /tmp/.ldmscale-hosts.$$
fi
rm -rf "$DIR"
echo "[slurm_local] stopped; removed $DIR" >&2
