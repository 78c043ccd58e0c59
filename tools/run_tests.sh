#!/usr/bin/env bash
# README's test command: install what the tests need, check the code (ruff, the generated config reference), then
# run the test tiers in order, fastest first (a failing tier stops the run):
#   tests/unit         in-process, seconds each
#   tests/integration  several DeepSpeed processes, CLIs in child processes, the strict docs build
#   tests/system       the real S3 (Ceph RGW) and Slurm servers, started here through tools/s3_local and
#                      tools/slurm_local (Debian packages, as root)
# `tools/run_tests.sh unit` runs one tier; further arguments go to pytest, e.g. `tools/run_tests.sh system -x`.
set -euo pipefail
cd "$(dirname "$0")/.."
tiers=(unit integration system)
if [[ ${1:-} =~ ^(unit|integration|system)$ ]]; then tiers=("$1"); shift; fi
bash tools/setup_env.sh
. .venv/bin/activate
export HF_HUB_OFFLINE=1 WANDB_MODE=disabled TOKENIZERS_PARALLELISM=false
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$PWD/.cache/torch_extensions}
ruff check ldmscale tools tests
python tools/gen_config_reference.py --check   # docs/reference/config.md matches ldmscale/config/schema.py
for tier in "${tiers[@]}"; do
  echo "== tests/$tier"
  python -m pytest -ra "tests/$tier" "$@"
done
