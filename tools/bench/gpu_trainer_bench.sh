#!/usr/bin/env bash
# tools/bench/trainer_bench.py on one GPU, in one command of <= 8 minutes including the install: the SD 1.5 U-Net,
# bf16, latents encoded on the fly, 256 and 512 px, with and without torch.compile; img/s per GPU, MFU, and the
# ratio against the bare PyTorch loop; then tools/bench/noise_bench.py on the GPU. Prepare the wheels on the CPU
# machine first (bash ../shared/device/prepare_wheels.sh, from the project root: they land in .whl/), then on the
# GPU host, from the project root:
#   bash tools/bench/gpu_trainer_bench.sh 2>&1 | tee "$OUT/trainer_bench.txt"
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  || exit 1
export PYTHONPATH="/tmp/site:$PWD" HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export TORCH_EXTENSIONS_DIR=/tmp/torch_extensions  # DeepSpeed's FusedAdam JIT-builds once (~1-2 min), then cached
for run in "256 32" "512 16"; do
  read -r res batch <<<"$run"
  for compile in "" "--compile"; do
    echo "=== sd15 ${res}px batch ${batch} ${compile:-eager}"
    timeout 150 python3 tools/bench/trainer_bench.py --preset sd15 --resolution "$res" --batch "$batch" \
      --precision bf16 --rounds 3 --steps 5 --warmup 3 $compile 2>&1 | grep -v '^\[' | tail -6
  done
done
echo "=== per-sample draws: counter-based on the GPU vs per-sample CPU generators + copy"
timeout 60 python3 tools/bench/noise_bench.py --device cuda 2>&1 | tail -4
