# Shared settings and helpers for start.sh, stop.sh and restart-rgw.sh (sourced, not run).
# Every path the cluster uses lies under $STATE so that stop.sh can remove all of it.
S3_PORT=${LDMSCALE_S3_PORT:-7480}
STATE=${LDMSCALE_S3_DIR:-/tmp/ldmscale-s3}
MON_PORT=${LDMSCALE_S3_MON_PORT:-3300}
# Known test-only keys: the server lives on loopback and dies with the test session.
S3_ACCESS=${LDMSCALE_S3_ACCESS_KEY:-ldmscale-test-access}
S3_SECRET=${LDMSCALE_S3_SECRET_KEY:-ldmscale-test-secret-0123456789}
S3_ENDPOINT=http://127.0.0.1:$S3_PORT
CONF=$STATE/ceph.conf
PIDS=$STATE/pids
RGW_NAME=client.rgw.ldmscale

log() { echo "[s3_local] $*" >&2; }

# lock_tools: serialize start/stop/restart between concurrent test sessions. The lock is held on this
# directory's fd (released when the script exits), so no lock file is left behind.
lock_tools() {
    [[ -n ${LDMSCALE_S3_LOCKED:-} ]] && return 0  # called from a script that holds it (start -> stop)
    exec 9<"$HERE"
    flock -w 600 9 || { log "timed out waiting for another s3_local script"; exit 1; }
    export LDMSCALE_S3_LOCKED=1
}

# port_in_use PORT: something already accepts connections on 127.0.0.1:PORT.
port_in_use() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# running PID: the process exists, is not a zombie (PID 1 here may reap slowly) and is one of ours,
# i.e. was started with this state dir's ceph.conf (guards against a recycled pid).
running() {
    local pid=$1
    [[ -r /proc/$pid/stat && -r /proc/$pid/cmdline ]] || return 1
    [[ $(awk '{print $3}' "/proc/$pid/stat" 2>/dev/null) != Z ]] || return 1
    tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -qF -- "$CONF"
}

# pid_alive NAME: true if the daemon we started under NAME still runs.
pid_alive() {
    local f=$PIDS/$1
    [[ -f $f ]] && running "$(cat "$f")"
}

# launch NAME CMD...: run a daemon in the foreground of its own session (so a Ctrl-C aimed at
# pytest does not hit it), with no inherited stdout (so a caller capturing our output returns).
launch() {
    local name=$1
    shift
    # 9<&-: the daemon must not inherit the lock_tools fd, or the lock would live as long as the daemon.
    setsid "$@" -f </dev/null >>"$STATE/log/$name.out" 2>&1 9<&- &
    echo $! >"$PIDS/$name"
}

# stop_daemon NAME SIGNAL: signal it and wait until it is gone (SIGKILL after 10 s).
stop_daemon() {
    local name=$1 sig=${2:-TERM} pid i
    [[ -f $PIDS/$name ]] || return 0
    pid=$(cat "$PIDS/$name")
    if running "$pid"; then
        kill -s "$sig" "$pid" 2>/dev/null || true
        for i in $(seq 100); do
            running "$pid" || break
            sleep 0.1
        done
        running "$pid" && kill -KILL "$pid" 2>/dev/null
    fi
    rm -f "$PIDS/$name"
}

# s3_bucket_op_works: a real signed S3 round trip (create + delete a bucket), not just a TCP accept.
s3_bucket_op_works() {
    local b=$S3_ENDPOINT/ldmscale-healthcheck
    local args=(-s -o /dev/null -w '%{http_code}' --max-time 5 --aws-sigv4 "aws:amz:us-east-1:s3"
        --user "$S3_ACCESS:$S3_SECRET"
        # curl 7.88 does not send the payload hash header that radosgw requires for SigV4.
        -H "x-amz-content-sha256: e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855")
    local code
    code=$(curl "${args[@]}" -X PUT "$b" 2>/dev/null) || return 1
    [[ $code == 200 || $code == 409 ]] || return 1
    curl "${args[@]}" -X DELETE "$b" >/dev/null 2>&1 || true
}

# wait_for SECONDS CMD...: poll CMD every 0.5 s.
wait_for() {
    local limit=$1 i
    shift
    for i in $(seq $((limit * 2))); do
        "$@" && return 0
        sleep 0.5
    done
    return 1
}

start_rgw() {
    launch rgw radosgw -c "$CONF" -n "$RGW_NAME"
}
