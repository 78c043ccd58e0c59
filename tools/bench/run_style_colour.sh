#!/usr/bin/env bash
# Continuous-style benchmark end to end: colour-pair digit shards (one ink-hue band held out) -> autoencoder ->
# step 1 (configs/style-colour-step1.yaml) -> step 2 (configs/style-colour-step2.yaml, augmented-view
# references) -> tools/bench/style_colour.py on every kept step-2 checkpoint (the error-vs-steps curve).
# Usage: tools/bench/run_style_colour.sh [OUT=demo_colour] [extra step-2 overrides...]. Finished steps are skipped.
# QUICK=1: the settings of the ablation table in docs/results/style.md (tiny U-Net, batch 32, steps 400 / 250).
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=${1:-demo_colour}
shift || true
. tools/demo_env.sh "style colour"
AE=() S1=() S2=()
if [ "${QUICK:-0}" = 1 ]; then
  AE=(train.max_steps=400)
  SMALL=(model.unet=tiny train.global_batch_size=32 train.micro_batch_size=32 train.log_every=25)
  S1=("${SMALL[@]}" train.max_steps=400 train.ckpt_every=200 optim.warmup_steps=40)
  S2=("${SMALL[@]}" train.max_steps=250 train.ckpt_every=50 style.beta_warmup_steps=100 optim.warmup_steps=25)
fi
MODELS=("model.vae=$OUT/autoencoder/vae" "model.text_encoder=$OUT/models/text_encoder"
        "model.tokenizer=$OUT/models/tokenizer" "data.shards=[$OUT/shards/train]")

[ -f "$OUT/shards/train/00000.tar" ] || python tools/make_style_colour_shards.py --out "$OUT/shards"
[ -d "$OUT/models/tokenizer" ] || python tools/make_offline_models.py --shards "$OUT/shards/train/*.tar" --out "$OUT/models"
# the autoencoder at the steps its config sets (500; the goal's row in docs/results/style.md), QUICK at 400
[ -f "$OUT/autoencoder/vae/config.json" ] || ldmscale-train --config configs/demo-autoencoder.yaml \
  "train.out_dir=$OUT/autoencoder" "data.shards=[$OUT/shards/train]" "${AE[@]}"
stamp "shards, text encoder and autoencoder ready"
ldmscale-train --config configs/style-colour-step1.yaml "train.out_dir=$OUT/step1" "${MODELS[@]}" "${S1[@]}"
stamp "step 1 trained: $OUT/step1"
ldmscale-train --config configs/style-colour-step2.yaml "train.out_dir=$OUT/step2" "style.init_from=$OUT/step1" \
  "${MODELS[@]}" "${S2[@]}" "$@"
stamp "step 2 trained: $OUT/step2"
python tools/bench/style_colour.py --data "$OUT/shards" --text-run "$OUT/step1" \
  --style-run "$OUT"/step2/checkpoints/step_* --refs 50 --json "$OUT/style_colour.json" --grid "$OUT/style_colour.png"
stamp "done"
