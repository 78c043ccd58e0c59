#!/usr/bin/env bash
# Stop the local S3 server started by start.sh and remove its state dir. Safe to run when nothing runs.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=lib.sh
source "$HERE/lib.sh"
lock_tools

if [[ -d $PIDS ]]; then
    # Clients first, then storage, then the monitor they all talk to. The data is thrown away, so the
    # OSD and mon are killed: on SIGTERM memstore would first spend seconds saving itself to disk.
    stop_daemon rgw TERM
    stop_daemon osd KILL
    stop_daemon mon KILL
fi
# Guard against a typo'd LDMSCALE_S3_DIR wiping something that is not ours.
if [[ -e $STATE ]]; then
    if [[ -f $CONF || -d $PIDS || -z $(ls -A "$STATE") ]]; then
        rm -rf "$STATE"
    else
        log "$STATE does not look like an s3_local state dir; not removing it"
        exit 1
    fi
fi
