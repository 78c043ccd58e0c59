#!/usr/bin/env bash
# Style-conditioning demo on real digits in six colour palettes: shards -> autoencoder -> step 1 (text) ->
# step 2 (style, from step 1) -> benchmark of both models side by side. ~30 min on 2 idle CPU cores.
# Usage: tools/run_style_demo.sh [OUT=demo_style]. Finished steps are skipped; training resumes.
# QUICK=1 cuts every stage short (tiny U-Net, batch 32, fewer steps) for a loaded or slow machine.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-demo_style}
. tools/demo_env.sh "style demo"
AE=(train.max_steps=400) S1=() S2=() BENCH=(--per-cell 2 --steps 20)
if [ "${QUICK:-0}" = 1 ]; then
  SMALL=(model.unet=tiny train.global_batch_size=32 train.micro_batch_size=32 train.log_every=25)
  AE=(train.max_steps=150 train.ckpt_every=150 train.log_every=25)
  S1=("${SMALL[@]}" train.max_steps=400 train.ckpt_every=200 optim.warmup_steps=40)
  S2=("${SMALL[@]}" train.max_steps=250 train.ckpt_every=125 style.beta_warmup_steps=100 optim.warmup_steps=25)
  BENCH=(--per-cell 1 --steps 15)
fi
MODELS=("model.vae=$OUT/autoencoder/vae" "model.text_encoder=$OUT/models/text_encoder"
        "model.tokenizer=$OUT/models/tokenizer" "data.shards=[$OUT/shards/train]")

[ -f "$OUT/shards/train/00000.tar" ] || python tools/make_style_digit_shards.py --out "$OUT/shards"
[ -d "$OUT/models/tokenizer" ] || python tools/make_offline_models.py --shards "$OUT/shards/train/*.tar" --out "$OUT/models"
[ -f "$OUT/autoencoder/vae/config.json" ] || ldmscale-train --config configs/demo-autoencoder.yaml \
  "train.out_dir=$OUT/autoencoder" "data.shards=[$OUT/shards/train]" "${AE[@]}"
stamp "shards, text encoder and autoencoder ready"

ldmscale-train --config configs/style-step1.yaml "train.out_dir=$OUT/step1" "${MODELS[@]}" "${S1[@]}"
stamp "step 1 (text-conditioned) trained: $OUT/step1"
ldmscale-train --config configs/style-step2.yaml "train.out_dir=$OUT/step2" "style.init_from=$OUT/step1" "${MODELS[@]}" "${S2[@]}"
stamp "step 2 (style) trained: $OUT/step2"

python tools/bench/style_follow.py --style-run "$OUT/step2" --text-run "$OUT/step1" --heldout "$OUT/shards/heldout" \
  "${BENCH[@]}" --json "$OUT/style_follow.json" --grid "$OUT/style_follow.png"
stamp "done"
