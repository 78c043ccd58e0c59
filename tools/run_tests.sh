#!/usr/bin/env bash
# README's test command: install what the tests need, then run them all. The S3 (Ceph RGW) and Slurm tests
# start their servers themselves through tools/s3_local and tools/slurm_local (Debian packages, as root).
# Extra arguments go to pytest, e.g. `tools/run_tests.sh -m "not slurm" -x`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup_env.sh
. .venv/bin/activate
export HF_HUB_OFFLINE=1 WANDB_MODE=disabled TOKENIZERS_PARALLELISM=false
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$PWD/.cache/torch_extensions}
ruff check ldmscale tools tests
exec python -m pytest -ra "$@"
