#!/usr/bin/env bash
# The whole CPU demo on real data: digit shards -> autoencoder -> latent diffusion (with a validation loss on the
# held-out digits) -> sample grid -> accuracy -> an MLPerf-style eval (FID per guidance scale) on the held-out digits.
# Usage: tools/run_demo.sh [OUT=demo_out]. Every step is skipped when its output already exists, so a rerun
# after an interruption continues (training itself resumes from its latest checkpoint).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-demo_out}
. tools/demo_env.sh demo

[ -f "$OUT/shards/train/00000.tar" ] || python tools/make_digit_shards.py --out "$OUT/shards"
[ -d "$OUT/models/tokenizer" ] || python tools/make_offline_models.py --shards "$OUT/shards/train/*.tar" --out "$OUT/models"
stamp "shards and offline text encoder/tokenizer ready"

[ -f "$OUT/autoencoder/vae/config.json" ] || ldmscale-train --config configs/demo-autoencoder.yaml \
  "train.out_dir=$OUT/autoencoder" "data.shards=[$OUT/shards/train]"
stamp "autoencoder trained: $OUT/autoencoder/vae"

ldmscale-train --config configs/demo.yaml "train.out_dir=$OUT/ldm" "data.shards=[$OUT/shards/train]" \
  "model.vae=$OUT/autoencoder/vae" "model.text_encoder=$OUT/models/text_encoder" "model.tokenizer=$OUT/models/tokenizer" \
  "data.val_shards=[$OUT/shards/heldout]" train.eval_every=100 train.eval_samples=270
python -m ldmscale.eval.curves "$OUT/ldm"
stamp "latent diffusion model trained: $OUT/ldm; validation loss curve: $OUT/ldm/loss_curve.png"

for d in 0 1 2 3 4 5 6 7 8 9; do echo "a handwritten digit $d"; done > "$OUT/prompts.txt"
ldmscale-sample "$OUT/ldm" --prompts-file "$OUT/prompts.txt" --num-images 10 --steps 30 --sampler dpmsolver++ \
  --guidance-scale 4 --out "$OUT/samples"
stamp "samples: $OUT/samples/grid.png"

python tools/bench/digit_accuracy.py "$OUT/samples" --heldout "$OUT/shards/heldout" --json "$OUT/digit_accuracy.json"
stamp "digit accuracy: $OUT/digit_accuracy.json"

# MLPerf-style evaluation on the held-out digits: one image per held-out caption (270), a guidance sweep, FID in a
# feature space available offline (pixels:8: no Inception weights here) and digit accuracy standing in for CLIP score
ldmscale-eval "$OUT/ldm" --prompts "$OUT/shards/heldout" --reference "$OUT/shards/heldout" --features pixels:8 \
  --guidance 1,2,4,8 --steps 30 --sampler dpmsolver++ --out "$OUT/eval"
python tools/bench/digit_accuracy.py --eval-dir "$OUT/eval" --heldout "$OUT/shards/heldout" --train "$OUT/shards/train" \
  --json "$OUT/eval/digit_sweep.json"
stamp "done: $OUT/eval/eval.json, $OUT/eval/fid_vs_digit_accuracy.png"
