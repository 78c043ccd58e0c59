#!/usr/bin/env bash
# Start a real, single-host S3 server (Ceph radosgw on one mon + one memstore OSD) for ldmscale's tests.
# Idempotent: a healthy running server is reused. Prints (and writes to $STATE/env) the lines
# AWS_ACCESS_KEY_ID=..., AWS_SECRET_ACCESS_KEY=..., AWS_ENDPOINT_URL=...
# Env: LDMSCALE_S3_PORT (7480), LDMSCALE_S3_DIR (/tmp/ldmscale-s3), LDMSCALE_S3_MON_PORT (3300).
set -euo pipefail
# The daemons started here outlive this script: they must not inherit the caller's descriptors beyond
# stdio (a `flock LOCK cmd` caller's lock would otherwise stay held by munged/radosgw until they stop).
for fd in /proc/$$/fd/*; do n=${fd##*/}; { [ "$n" -gt 2 ] && eval "exec $n>&-"; } 2>/dev/null || true; done
HERE=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=lib.sh
source "$HERE/lib.sh"
lock_tools

install_packages() {
    local need=()
    command -v radosgw >/dev/null || need+=(radosgw)
    command -v ceph-mon >/dev/null || need+=(ceph-mon)
    command -v ceph-osd >/dev/null || need+=(ceph-osd)
    command -v ceph >/dev/null || need+=(ceph-common)
    command -v curl >/dev/null || need+=(curl)
    command -v uuidgen >/dev/null || need+=(uuid-runtime)
    ((${#need[@]})) || return 0
    [[ $(id -u) == 0 ]] || { log "need root to install: ${need[*]}"; exit 1; }
    log "installing ${need[*]}"
    # Package postinsts try to start daemons; policy-rc.d exiting 101 forbids that.
    local prc=/usr/sbin/policy-rc.d had_prc=0
    [[ -e $prc ]] && { had_prc=1; cp -a "$prc" "$prc.ldmscale-bak"; }
    printf '#!/bin/sh\nexit 101\n' >"$prc"
    chmod +x "$prc"
    local rc=0 aptlog
    aptlog=$(mktemp)
    if ! ls /var/lib/apt/lists/*_Packages >/dev/null 2>&1; then apt-get update -q >"$aptlog" 2>&1 || rc=$?; fi
    ((rc)) || DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${need[@]}" \
        >>"$aptlog" 2>&1 || rc=$?
    if ((had_prc)); then mv -f "$prc.ldmscale-bak" "$prc"; else rm -f "$prc"; fi
    if ((rc)); then
        tail -n 30 "$aptlog" >&2
        rm -f "$aptlog"
        log "apt-get failed ($rc)"
        exit "$rc"
    fi
    log "installed $(grep -c '^Setting up' "$aptlog") packages in $((SECONDS - t0)) s"
    rm -f "$aptlog"
}

print_env() {
    {
        echo "AWS_ACCESS_KEY_ID=$S3_ACCESS"
        echo "AWS_SECRET_ACCESS_KEY=$S3_SECRET"
        echo "AWS_ENDPOINT_URL=$S3_ENDPOINT"
    } >"$STATE/env"
    cat "$STATE/env"
}

osd_up() { ceph -c "$CONF" --connect-timeout 5 osd stat 2>/dev/null | grep -q '1 up'; }
rgw_answers() { curl -s -o /dev/null --max-time 2 "$S3_ENDPOINT/"; }

t0=$SECONDS
if pid_alive mon && pid_alive osd && pid_alive rgw && s3_bucket_op_works; then
    log "already running at $S3_ENDPOINT (state $STATE)"
    print_env
    exit 0
fi
# Only radosgw gone (e.g. a fault test died mid-restart): the objects are still in the OSD, keep them.
if pid_alive mon && pid_alive osd && ! pid_alive rgw; then
    log "restarting radosgw only"
    start_rgw
    if wait_for 60 s3_bucket_op_works; then
        print_env
        exit 0
    fi
fi
# Otherwise a half-dead or stale cluster is not worth repairing: memstore data is gone with the OSD.
[[ -e $STATE ]] && "$HERE/stop.sh"
install_packages
for port in "$S3_PORT" "$MON_PORT"; do
    if port_in_use "$port"; then
        log "127.0.0.1:$port is taken by another program; set LDMSCALE_S3_PORT / LDMSCALE_S3_MON_PORT"
        exit 1
    fi
done

mkdir -p "$STATE"/{run,log,mon,osd,rgw,crash} "$PIDS"
FSID=$(uuidgen)
sed -e "s|@STATE@|$STATE|g" -e "s|@FSID@|$FSID|g" -e "s|@PORT@|$S3_PORT|g" -e "s|@MON_PORT@|$MON_PORT|g" \
    "$HERE/ceph.conf.in" >"$CONF"

log "mon ($((SECONDS - t0)) s)"
monmaptool --create --fsid "$FSID" --addv a "[v2:127.0.0.1:$MON_PORT]" "$STATE/monmap" >/dev/null
ceph-authtool --create-keyring "$STATE/keyring" --gen-key -n mon. --cap mon 'allow *' >/dev/null
ceph-mon -c "$CONF" --mkfs -i a --monmap "$STATE/monmap" --keyring "$STATE/keyring" 2>>"$STATE/log/mkfs.out"
launch mon ceph-mon -c "$CONF" -i a

log "osd ($((SECONDS - t0)) s)"
OSD_UUID=$(uuidgen)
OSD_ID=$(ceph -c "$CONF" --connect-timeout 30 osd new "$OSD_UUID")
mkdir -p "$STATE/osd/ceph-$OSD_ID"
ceph-osd -c "$CONF" -i "$OSD_ID" --mkfs --osd-uuid "$OSD_UUID" >>"$STATE/log/mkfs.out" 2>&1
launch osd ceph-osd -c "$CONF" -i "$OSD_ID"
wait_for 60 osd_up || { log "osd did not come up; see $STATE/log"; exit 1; }

log "radosgw on $S3_ENDPOINT ($((SECONDS - t0)) s)"
start_rgw
wait_for 120 rgw_answers || { log "radosgw did not answer; see $STATE/log"; exit 1; }
log "S3 user ($((SECONDS - t0)) s)"
radosgw-admin -c "$CONF" user create --uid ldmscale --display-name ldmscale \
    --access-key "$S3_ACCESS" --secret-key "$S3_SECRET" >/dev/null 2>>"$STATE/log/admin.out"
wait_for 60 s3_bucket_op_works || { log "S3 bucket op failed; see $STATE/log"; exit 1; }
log "ready in $((SECONDS - t0)) s"
print_env
