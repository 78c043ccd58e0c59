#!/usr/bin/env bash
# README's test command: install what the tests need, check the code (ruff, mypy, the generated config reference), then
# run the test tiers in order, fastest first (a failing tier stops the run):
#   tests/unit         in-process, seconds each
#   tests/integration  several DeepSpeed processes, CLIs in child processes, the strict docs build
#   tests/system       the real S3 (Ceph RGW) and Slurm servers, started here through tools/s3_local and
#                      tools/slurm_local (Debian packages, as root)
# `tools/run_tests.sh unit` runs one tier; further arguments go to pytest, e.g. `tools/run_tests.sh system -x`.
#
# The unit tier runs on LDMSCALE_UNIT_WORKERS (default 2) pytest-xdist workers, a test file each at a time, one
# thread each: no test file shares state with another, so two cores halve its wall time (0: one process). The
# integration tier runs on LDMSCALE_INTEGRATION_WORKERS (default 2) workers the same way, for machines with cores
# to spare (on two cores, beside the system tier, it gained no more than two runs differ by: docs/testing.md). The
# system tier runs one test at a time, beside the integration tier (below).
#
# When the system tier is to run, its two servers are installed and started in the background while the other
# tiers run (the unit tier leaves a core idle; a clean machine spends ~30 s in apt-get), and stopped at the end.
# The system tests' fixtures find them running and use them; a server that already ran before is left alone.
set -euo pipefail
cd "$(dirname "$0")/.."
tiers=(unit integration system)
if [[ ${1:-} =~ ^(unit|integration|system)$ ]]; then tiers=("$1"); shift; fi
bash tools/setup_env.sh
. .venv/bin/activate
export HF_HUB_OFFLINE=1 WANDB_MODE=disabled TOKENIZERS_PARALLELISM=false
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$PWD/.cache/torch_extensions}
ruff check ldmscale tools tests
mypy  # ldmscale/ ([tool.mypy] in pyproject.toml)
python tools/gen_config_reference.py --check   # docs/reference/config.md matches ldmscale/config/schema.py

servers_pid=""
if [[ " ${tiers[*]} " == *" system "* && $(id -u) == 0 ]]; then
  mkdir -p .cache
  stop_s3=0 stop_slurm=0  # stop at the end what was not running before
  if [[ -z ${LDMSCALE_S3_ENDPOINT:-} ]] && ! (exec 3<>"/dev/tcp/127.0.0.1/${LDMSCALE_S3_PORT:-7480}") 2>/dev/null
  then stop_s3=1; fi
  ctld_pid=$(cat "${LDMSCALE_SLURM_DIR:-/tmp/ldmscale-slurm}/run/slurmctld.pid" 2>/dev/null || true)
  if [[ -z $ctld_pid ]] || ! kill -0 "$ctld_pid" 2>/dev/null; then stop_slurm=1; fi
  stop_servers() {
    wait "$servers_pid" 2>/dev/null || true  # a start still under way finishes first
    if ((stop_s3)); then bash tools/s3_local/stop.sh >/dev/null 2>&1 || true; fi
    if ((stop_slurm)); then bash tools/slurm_local/stop.sh >/dev/null 2>&1 || true; fi
  }
  trap stop_servers EXIT
  # One after the other: both may apt-get install, and only one dpkg runs at a time.
  (
    if [[ -z ${LDMSCALE_S3_ENDPOINT:-} ]]; then bash tools/s3_local/start.sh >/dev/null; fi
    bash tools/slurm_local/start.sh >/dev/null
  ) >.cache/servers.log 2>&1 &
  servers_pid=$!
fi

run_tier() {  # run_tier TIER [pytest args]
  local tier=$1; shift
  local workers=0 threads=()
  case $tier in
    unit) workers=${LDMSCALE_UNIT_WORKERS:-2} threads=("OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}") ;;
    integration) workers=${LDMSCALE_INTEGRATION_WORKERS:-2} ;;  # each rank sets its own threads
  esac
  if ((workers)); then
    env "${threads[@]}" python -m pytest -ra -n "$workers" --dist loadfile "tests/$tier" "$@"
  else
    python -m pytest -ra "tests/$tier" "$@"
  fi
}

wait_for_servers() {
  if [[ -n $servers_pid ]]; then
    # a failed start is reported by the fixtures, which try again and show the script's own error
    wait "$servers_pid" || echo "starting the servers in the background failed (.cache/servers.log)"
    servers_pid=""
  fi
}

# The system tier mostly waits (Slurm scheduling, job start-up, S3 round trips) while the integration tier leaves
# part of the second core idle (its launches start, import and synchronise one after the other): when both are to
# run they run side by side, the system tier's output kept in .cache/system-tier.log and printed after the
# integration tier's. LDMSCALE_SERIAL_TIERS=1 runs them one after the other.
overlap=0
if [[ " ${tiers[*]} " == *" integration "* && " ${tiers[*]} " == *" system "* && ${LDMSCALE_SERIAL_TIERS:-0} != 1 ]]
then overlap=1; fi

system_pid="" system_log=.cache/system-tier.log
finish_system() {  # wait for the system tier started beside the integration tier, print its output; its exit code
  local rc=0
  wait "$system_pid" || rc=$?
  echo "== tests/system (ran beside tests/integration)"
  cat "$system_log"
  return "$rc"
}

for tier in "${tiers[@]}"; do
  if [[ $tier == system ]]; then
    if [[ -n $system_pid ]]; then
      rc=0
      finish_system || rc=$?
      exit "$rc"
    fi
    wait_for_servers
  fi
  if [[ $tier == integration && $overlap == 1 ]]; then
    wait_for_servers
    mkdir -p .cache
    run_tier system "$@" >"$system_log" 2>&1 &
    system_pid=$!
    echo "== tests/system started beside tests/integration (output: $system_log)"
  fi
  echo "== tests/$tier"
  rc=0
  run_tier "$tier" "$@" || rc=$?
  if ((rc)); then
    if [[ -n $system_pid ]]; then finish_system || true; fi
    exit "$rc"
  fi
done
