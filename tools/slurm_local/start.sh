#!/usr/bin/env bash
# Start a real two-node Slurm cluster (n1, n2) on this one host, for ldmscale's tests.
#
#   sudo tools/slurm_local/start.sh        # idempotent; prints the SLURM_CONF to export
#   export SLURM_CONF=/tmp/ldmscale-slurm/slurm.conf
#   tools/slurm_local/stop.sh              # kills the daemons, removes every trace
#
# Env: LDMSCALE_SLURM_DIR (state dir, default /tmp/ldmscale-slurm), LDMSCALE_SLURM_CPUS (CPUs each
# node advertises, default 4), LDMSCALE_SLURM_PORT (slurmctld port, default 6817; slurmds use +1, +2).
# Needs root and Debian/Ubuntu apt (installs slurmctld slurmd slurm-client munge when missing).
set -euo pipefail
# The daemons started here outlive this script: they must not inherit the caller's descriptors beyond
# stdio (a `flock LOCK cmd` caller's lock would otherwise stay held by munged/radosgw until they stop).
for fd in /proc/$$/fd/*; do n=${fd##*/}; { [ "$n" -gt 2 ] && eval "exec $n>&-"; } 2>/dev/null || true; done

DIR="${LDMSCALE_SLURM_DIR:-/tmp/ldmscale-slurm}"
CPUS="${LDMSCALE_SLURM_CPUS:-4}"
CTLD_PORT="${LDMSCALE_SLURM_PORT:-6817}"
MEM_PER_NODE=8000
HOSTS_TAG="# ldmscale-slurm"
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
export SLURM_CONF="$DIR/slurm.conf"

log() { echo "[slurm_local] $*" >&2; }

[ "$(id -u)" = 0 ] || { log "must run as root (slurmd runs jobs as their owner)"; exit 2; }

alive() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

install_packages() {
  local missing=()
  for p in slurmctld slurmd slurm-client munge; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
  done
  [ ${#missing[@]} -eq 0 ] && return 0
  log "installing ${missing[*]}"
  # postinst scripts would start system daemons with the packaged config; 101 = "action forbidden".
  local had_policy=0
  [ -e /usr/sbin/policy-rc.d ] && had_policy=1
  if [ $had_policy = 0 ]; then
    printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d
    chmod +x /usr/sbin/policy-rc.d
  fi
  # Other jobs on the machine may hold the dpkg lock: wait for it instead of failing.
  local rc=0
  if ! apt-cache policy slurmctld 2>/dev/null | grep -q 'Candidate: [0-9]'; then
    apt-get -o DPkg::Lock::Timeout=600 update -qq || rc=$?
  fi
  DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 install -y -qq --no-install-recommends \
    "${missing[@]}" >/dev/null || rc=$?
  [ $had_policy = 0 ] && rm -f /usr/sbin/policy-rc.d
  return $rc
}

start_munge() {
  if alive "$DIR/munge/munged.pid"; then return 0; fi
  # munged wants the socket dir owned by munge, writable only by it, searchable by all (0711).
  install -d -m 0711 -o munge -g munge "$DIR/munge"
  if [ ! -s "$DIR/munge/munge.key" ]; then
    runuser -u munge -- mungekey --create --keyfile="$DIR/munge/munge.key"
  fi
  runuser -u munge -- /usr/sbin/munged \
    --key-file="$DIR/munge/munge.key" --socket="$DIR/munge/munge.socket" \
    --pid-file="$DIR/munge/munged.pid" --seed-file="$DIR/munge/munged.seed" \
    --log-file="$DIR/munge/munged.log"
  for _ in $(seq 50); do [ -S "$DIR/munge/munge.socket" ] && return 0; sleep 0.1; done
  log "munged did not come up; see $DIR/munge/munged.log"; return 1
}

write_conf() {
  mkdir -p "$DIR/state" "$DIR/spool/n1" "$DIR/spool/n2" "$DIR/run" "$DIR/log"
  chmod 0755 "$DIR"  # job steps read SLURM_CONF as the job's user
  # slurmctld only runs where SlurmctldHost names this host's short hostname.
  sed -e "s|@DIR@|$DIR|g" -e "s|@CTLD_HOST@|$(hostname -s)|g" -e "s|@CTLD_PORT@|$CTLD_PORT|g" \
      -e "s|@N1_PORT@|$((CTLD_PORT + 1))|g" -e "s|@N2_PORT@|$((CTLD_PORT + 2))|g" \
      -e "s|@CPUS@|$CPUS|g" -e "s|@MEM@|$MEM_PER_NODE|g" \
      "$HERE/slurm.conf.in" > "$SLURM_CONF.tmp"
  if cmp -s "$SLURM_CONF.tmp" "$SLURM_CONF"; then rm -f "$SLURM_CONF.tmp"; return 0; fi
  mv "$SLURM_CONF.tmp" "$SLURM_CONF"
  # The template changed under a running cluster: make the daemons re-read it.
  if alive "$DIR/run/slurmctld.pid"; then scontrol reconfigure || true; fi
}

add_hosts() {
  grep -q "$HOSTS_TAG" /etc/hosts && return 0
  # Append in place: /etc/hosts is often a bind mount in containers, so it cannot be replaced by rename.
  echo "127.0.0.1 n1 n2 $HOSTS_TAG" >> /etc/hosts
}

start_daemons() {
  alive "$DIR/run/slurmctld.pid" || slurmctld -f "$SLURM_CONF"
  for n in n1 n2; do
    alive "$DIR/run/slurmd-$n.pid" || slurmd -f "$SLURM_CONF" -N "$n"
  done
}

wait_idle() {
  local out=""
  for _ in $(seq 120); do
    out="$(sinfo -h -N -o '%N %t' 2>/dev/null || true)"
    if [ "$(echo "$out" | grep -cE '^n[12] idle$')" = 2 ]; then return 0; fi
    # A node left down/drained by an earlier run comes back once its slurmd is up again.
    if echo "$out" | grep -qE 'down|drain'; then
      scontrol update nodename=n1,n2 state=resume >/dev/null 2>&1 || true
    fi
    sleep 0.5
  done
  log "nodes not idle after 60 s: $out (logs in $DIR/log)"; return 1
}

t0=$(date +%s)
install_packages
mkdir -p "$DIR"
start_munge
write_conf
add_hosts
start_daemons
wait_idle
log "cluster up in $(( $(date +%s) - t0 )) s"
sinfo -N >&2
echo "export SLURM_CONF=$SLURM_CONF"
