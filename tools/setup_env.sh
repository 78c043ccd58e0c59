#!/usr/bin/env bash
# Create .venv with ldmscale and its dependencies; idempotent, fast when already installed.
# torch is pinned first: an unpinned torch would pull a multi-GB CUDA build onto CPU-only machines.
# deepspeed builds from source and imports torch while building, so it needs --no-build-isolation.
# pip byte-compiles what it installs, and must: where PYTHONDONTWRITEBYTECODE=1 is set (as on the test machines),
# Python never writes .pyc files itself, and without pip's every process would compile torch, diffusers and
# transformers from source at each import (docs/testing.md, Duration).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
TORCH_SPEC=${LDMSCALE_TORCH:-torch==2.13.0}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
if ! python -c "import torch, deepspeed, diffusers, transformers, webdataset, s3fs, submitit, sklearn, torchmetrics, matplotlib, mkdocs, material, xdist, mypy" 2>/dev/null \
   || ! pip show ldmscale >/dev/null 2>&1 || ! command -v ldmscale-ema >/dev/null; then
  pip install -q --upgrade pip
  pip install -q "$TORCH_SPEC"
  pip install -q "diffusers==0.42.1" "transformers==5.24.0" "webdataset==1.0.2" tokenizers safetensors braceexpand \
    fsspec s3fs wandb submitit pyyaml pillow numpy pyarrow tqdm pytest pytest-xdist ruff scikit-learn boto3 ninja \
    "torchmetrics==1.9.0" matplotlib "mkdocs==1.6.1" "mkdocs-material==9.8.2" \
    "mypy==2.4.1"  # pinned: another mypy version may report other errors
  pip install -q --no-build-isolation "deepspeed==0.19.8"
  pip install -q --no-deps --no-build-isolation -e .
fi
echo "environment ready: $(python -c 'import torch, deepspeed; print("torch", torch.__version__, "deepspeed", deepspeed.__version__)' 2>/dev/null | tail -1)"
