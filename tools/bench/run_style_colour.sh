#!/usr/bin/env bash
# Continuous-style benchmark end to end: colour-pair digit shards (one ink-hue band held out) -> autoencoder ->
# step 1 (configs/style-colour-step1.yaml) -> step 2 (configs/style-colour-step2.yaml, augmented-view
# references) -> tools/bench/style_colour.py on every kept step-2 checkpoint (the error-vs-steps curve).
# Usage: tools/bench/run_style_colour.sh [OUT=demo_colour] [extra step-2 overrides...]. Finished steps are skipped.
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=${1:-demo_colour}
shift || true
. tools/demo_env.sh "style colour"
MODELS=("model.vae=$OUT/autoencoder/vae" "model.text_encoder=$OUT/models/text_encoder"
        "model.tokenizer=$OUT/models/tokenizer" "data.shards=[$OUT/shards/train]")

[ -f "$OUT/shards/train/00000.tar" ] || python tools/make_style_colour_shards.py --out "$OUT/shards"
[ -d "$OUT/models/tokenizer" ] || python tools/make_offline_models.py --shards "$OUT/shards/train/*.tar" --out "$OUT/models"
[ -f "$OUT/autoencoder/vae/config.json" ] || ldmscale-train --config configs/demo-autoencoder.yaml \
  "train.out_dir=$OUT/autoencoder" "data.shards=[$OUT/shards/train]" train.max_steps=400
stamp "shards, text encoder and autoencoder ready"
ldmscale-train --config configs/style-colour-step1.yaml "train.out_dir=$OUT/step1" "${MODELS[@]}"
stamp "step 1 trained: $OUT/step1"
ldmscale-train --config configs/style-colour-step2.yaml "train.out_dir=$OUT/step2" "style.init_from=$OUT/step1" \
  "${MODELS[@]}" "$@"
stamp "step 2 trained: $OUT/step2"
python tools/bench/style_colour.py --data "$OUT/shards" --text-run "$OUT/step1" \
  --style-run "$OUT"/step2/checkpoints/step_* --json "$OUT/style_colour.json" --grid "$OUT/style_colour.png"
stamp "done"
