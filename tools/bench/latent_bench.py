"""Training-step throughput from latent shards vs on the fly (JPEG decode + VAE encoder every step): the same
model, batch and data, both measured side by side in one invocation, runs alternating (A B A B ...).

    python tools/bench/latent_bench.py                    # CPU: the demo's models (U-Net small, tiny VAE, 32 px)
    python tools/bench/latent_bench.py --preset sd15 --resolution 256 --batch 32   # GPU: SD 1.5 architectures
    python tools/bench/latent_bench.py --preset sd15 --resolution 512 --batch 16

Each run is the real trainer (`python -m ldmscale.train`, one rank, DeepSpeed ZeRO-2): its own images/s from
log.jsonl, with the first logged window dropped as warm-up. ldmscale-encode's time is reported too, as the cost of
encoding once and the number of steps after which it pays for itself. The sd15 preset builds the SD 1.5 VAE and
U-Net architectures and a CLIP-L-sized text encoder with random weights (nothing can be downloaded), on photo-like
shards from tools/bench/loader_bench.py: throughput does not depend on the weights' values.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def env() -> dict[str, str]:
    threads = os.environ.get("OMP_NUM_THREADS") or str(os.cpu_count() or 1)
    return {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled",
            "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": threads}


def run(cmd: list[str], log: Path) -> float:
    t0 = time.perf_counter()
    with open(log, "w") as f:
        rc = subprocess.run(cmd, env=env(), stdout=f, stderr=subprocess.STDOUT, cwd=REPO).returncode
    if rc != 0:
        raise SystemExit(f"failed ({rc}): {' '.join(cmd)}\n{log.read_text()[-3000:]}")
    return time.perf_counter() - t0


def prepare(a: argparse.Namespace) -> tuple[Path, Path]:
    """(image shard folder, model folder), written once into --work."""
    py = sys.executable
    models = a.work / f"models-{a.preset}"
    if a.preset == "demo":
        shards = a.work / "digits/train"
        if not shards.exists():
            run([py, "tools/make_digit_shards.py", "--out", str(a.work / "digits")], a.work / "make_shards.log")
        if not (models / "vae").exists():
            run([py, "tools/make_offline_models.py", "--shards", str(shards / "*.tar"), "--out", str(models)],
                a.work / "make_models.log")
        return shards, models
    from loader_bench import build_shards  # photo-like JPEG shards, 512-1024 px short side

    from ldmscale.models.offline import train_tokenizer, write_text_encoder, write_vae

    tars = build_shards(a.work, images=a.images, per_shard=max(a.batch * 2, 64), seed=0)
    if not (models / "vae").exists():
        tok = train_tokenizer([f"a photo of a scene, variant {i}" for i in range(500)], models / "tokenizer",
                              max_length=77)
        write_text_encoder(models / "text_encoder", tok, hidden_size=768, layers=12)  # CLIP-L's width and depth
        write_vae(models / "vae", preset="sd15")
    return tars[0].parent, models


def overrides(a: argparse.Namespace, shards: Path, models: Path, out: Path) -> list[str]:
    items = [
        f"train.out_dir={out}", f"data.shards=[{shards}]", f"model.vae={models / 'vae'}",
        f"model.text_encoder={models / 'text_encoder'}", f"model.tokenizer={models / 'tokenizer'}",
        f"train.max_steps={a.steps}", f"train.log_every={a.log_every}", "train.ckpt_every=100000",
        "train.sample_every=0", f"train.global_batch_size={a.batch}", f"train.micro_batch_size={a.batch}",
        f"data.num_workers={a.workers}", "data.samples_per_epoch=0",
    ]
    if a.preset == "sd15":
        items += ["model.unet=sd15", f"data.resolution={a.resolution}", "deepspeed.precision=bf16",
                  "data.shuffle_buffer=256"]
    return items


def images_per_s(out: Path) -> float:
    """The trainer's throughput over the logged windows after the first (start-up and warm-up excluded)."""
    rows = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    windows = [r["images_per_s"] for r in rows if "images_per_s" in r][1:]
    if not windows:
        raise SystemExit(f"{out}: fewer than two logged windows; raise --steps or lower --log-every")
    return statistics.mean(windows)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=["demo", "sd15"], default="demo")
    p.add_argument("--resolution", type=int, default=256, help="sd15 only (the demo trains at 32 px)")
    p.add_argument("--batch", type=int, default=64, help="images per step (one rank, no accumulation)")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--log-every", type=int, default=20)
    p.add_argument("--repeats", type=int, default=2, help="runs per mode, alternating")
    p.add_argument("--workers", type=int, default=1, help="loader workers, both modes")
    p.add_argument("--images", type=int, default=512, help="sd15: photos in the source shards")
    p.add_argument("--work", type=Path, default=Path("/tmp/ldmscale-latent-bench"))
    p.add_argument("--json", type=Path, help="also write the results here")
    a = p.parse_args()
    a.work.mkdir(parents=True, exist_ok=True)
    shards, models = prepare(a)
    config = str(REPO / ("configs/demo.yaml" if a.preset == "demo" else "configs/laion-256.yaml"))
    latents = a.work / f"latents-{a.preset}-{32 if a.preset == 'demo' else a.resolution}"
    base = overrides(a, shards, models, a.work / "unused")
    encode_s = None
    if not (latents / "manifest.json").exists():
        encode_s = run([sys.executable, "-m", "ldmscale.latents.encode", "--config", config, "--out", str(latents),
                        "--no-progress", "--batch-size", str(a.batch), *base], a.work / "encode.log")
    samples = json.loads((latents / "manifest.json").read_text())["counts"]["samples"]
    results: dict[str, list[float]] = {"images": [], "latents": []}
    for r in range(a.repeats):
        for mode in ("images", "latents"):
            out = a.work / f"run-{mode}-{r}"
            data = [f"data.shards=[{latents}]", "data.format=latents"] if mode == "latents" else []
            cmd = [sys.executable, "-m", "ldmscale.train", "--config", config, "--resume", "never",
                   *overrides(a, shards, models, out), *data]
            run(cmd, a.work / f"run-{mode}-{r}.log")
            results[mode].append(images_per_s(out))
            print(f"{mode:8s} run {r}: {results[mode][-1]:.1f} images/s", flush=True)
    img, lat = statistics.median(results["images"]), statistics.median(results["latents"])
    print(f"\npreset={a.preset} resolution={32 if a.preset == 'demo' else a.resolution} batch={a.batch} "
          f"threads={env()['OMP_NUM_THREADS']} workers={a.workers} steps={a.steps} repeats={a.repeats}")
    print(f"on the fly (JPEG + VAE encoder): {img:8.1f} images/s")
    print(f"from latent shards:              {lat:8.1f} images/s")
    print(f"ratio latents / on the fly:      {lat / img:8.2f}x")
    summary = {"preset": a.preset, "batch": a.batch, "images_per_s": results, "median_images": img,
               "median_latents": lat, "ratio": lat / img, "encode_s": encode_s, "encoded_samples": samples}
    if encode_s is not None:
        saved_per_image = 1 / img - 1 / lat
        print(f"ldmscale-encode: {samples} samples in {encode_s:.1f}s (process start included); pays for itself "
              f"after {encode_s / saved_per_image / samples:.2f} epochs" if saved_per_image > 0 else "")
    if a.json:
        a.json.write_text(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
