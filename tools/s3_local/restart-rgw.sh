#!/usr/bin/env bash
# Restart only radosgw (for fault tests): the objects live in the OSD and survive.
# Usage: restart-rgw.sh [--signal KILL|TERM] [--down SECONDS]
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=lib.sh
source "$HERE/lib.sh"
lock_tools

sig=KILL down=0
while (($#)); do
    case $1 in
    --signal) sig=$2; shift 2 ;;
    --down) down=$2; shift 2 ;;
    *) log "unknown argument $1"; exit 2 ;;
    esac
done
[[ -f $CONF ]] || { log "no server in $STATE; run start.sh"; exit 1; }
t0=$SECONDS
stop_daemon rgw "$sig"
sleep "$down"
start_rgw
wait_for 120 s3_bucket_op_works || { log "radosgw did not come back; see $STATE/log"; exit 1; }
log "radosgw restarted in $((SECONDS - t0)) s"
