#!/usr/bin/env bash
# Style-conditioning demo on real digits in six colour palettes: shards -> autoencoder -> step 1 (text) ->
# step 2 (style, from step 1) -> benchmark of both models side by side. ~15 min on 2 idle CPU cores.
# Usage: tools/run_style_demo.sh [OUT=demo_style]. Finished steps are skipped; training resumes.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-demo_style}
bash tools/setup_env.sh
. .venv/bin/activate
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(nproc)}
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$PWD/.cache/torch_extensions}
start=$(date +%s)
stamp() { echo "[style demo $(( $(date +%s) - start ))s] $*"; }
MODELS=("model.vae=$OUT/autoencoder/vae" "model.text_encoder=$OUT/models/text_encoder"
        "model.tokenizer=$OUT/models/tokenizer" "data.shards=[$OUT/shards/train]")

[ -f "$OUT/shards/train/00000.tar" ] || python tools/make_style_digit_shards.py --out "$OUT/shards"
[ -d "$OUT/models/tokenizer" ] || python tools/make_offline_models.py --shards "$OUT/shards/train/*.tar" --out "$OUT/models"
[ -f "$OUT/autoencoder/vae/config.json" ] || ldmscale-train --config configs/demo-autoencoder.yaml \
  "train.out_dir=$OUT/autoencoder" "data.shards=[$OUT/shards/train]" train.max_steps=400
stamp "shards, text encoder and autoencoder ready"

ldmscale-train --config configs/style-step1.yaml "train.out_dir=$OUT/step1" "${MODELS[@]}"
stamp "step 1 (text-conditioned) trained: $OUT/step1"
ldmscale-train --config configs/style-step2.yaml "train.out_dir=$OUT/step2" "style.init_from=$OUT/step1" "${MODELS[@]}"
stamp "step 2 (style) trained: $OUT/step2"

python tools/bench/style_follow.py --style-run "$OUT/step2" --text-run "$OUT/step1" --heldout "$OUT/shards/heldout" \
  --per-cell 2 --steps 20 --json "$OUT/style_follow.json" --grid "$OUT/style_follow.png"
stamp "done"
