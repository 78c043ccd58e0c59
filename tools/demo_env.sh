# Sourced by the demo scripts: the environment (installed on first use), offline mode, threads, a timer.
# Usage: . tools/demo_env.sh NAME   (from the repository root)
bash tools/setup_env.sh
. .venv/bin/activate
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(nproc)}
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$PWD/.cache/torch_extensions}
DEMO_NAME=$1
start=$(date +%s)
stamp() { echo "[$DEMO_NAME $(( $(date +%s) - start ))s] $*"; }
