#!/usr/bin/env bash
# Create .venv with ldmscale and its dependencies; idempotent, fast when already installed.
# torch is pinned first: an unpinned torch would pull a multi-GB CUDA build onto CPU-only machines.
# deepspeed builds from source and imports torch while building, so it needs --no-build-isolation.
# --no-compile: pip would byte-compile every module of every package (a third of the install's time, mostly
# transformers' and diffusers' thousands of model files); instead one import of what the trainer and the console
# scripts use compiles those modules once, into this writable .venv, before any test worker or rank needs them.
# (Install read-only environments, e.g. a cluster's shared one, with byte-compiling on.)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
TORCH_SPEC=${LDMSCALE_TORCH:-torch==2.13.0}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
if ! python -c "import torch, deepspeed, diffusers, transformers, webdataset, s3fs, submitit, sklearn, torchmetrics, matplotlib, mkdocs, material, xdist, mypy" 2>/dev/null \
   || ! pip show ldmscale >/dev/null 2>&1 || ! command -v ldmscale-ema >/dev/null; then
  pip install -q --upgrade pip
  pip install -q --no-compile "$TORCH_SPEC"
  pip install -q --no-compile "diffusers==0.42.1" "transformers==5.24.0" "webdataset==1.0.2" tokenizers safetensors \
    braceexpand fsspec s3fs wandb submitit pyyaml pillow numpy pyarrow tqdm pytest pytest-xdist ruff scikit-learn boto3 ninja \
    "torchmetrics==1.9.0" matplotlib "mkdocs==1.6.1" "mkdocs-material==9.8.2" \
    "mypy==2.4.1"  # pinned: another mypy version may report other errors
  pip install -q --no-compile --no-build-isolation "deepspeed==0.19.8"
  pip install -q --no-deps --no-build-isolation -e .
  python -c "import ldmscale.trainer.loop, ldmscale.eval.cli, ldmscale.inference.sample, ldmscale.latents.encode"
fi
echo "environment ready: $(python -c 'import torch, deepspeed; print("torch", torch.__version__, "deepspeed", deepspeed.__version__)' 2>/dev/null | tail -1)"
