"""ldmscale's shard loader against a plain open_clip-style WebDataset pipeline, on the same S3 shards.

    python tools/bench/loader_bench.py [--images 300] [--resolution 256] [--workers 2] [--batch 32] \
        [--batches 8] [--repeats 5] [--json out.json]

Data: a few hundred distinct, real-sized photos made from scikit-learn's two offline sample photos
(load_sample_images, 427x640) by seeded random crops, upscaling (short side 512-1024 px), flips, rotations,
colour jitter and a little sensor-like grain (an upscaled photo alone lacks the fine detail, and hence the
JPEG size and decode cost, of a real one), written as LAION-layout shards (ldmscale.data.shard_writer, JPEG quality 95)
and uploaded to an S3 server: LDMSCALE_S3_ENDPOINT (+ AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY) if set,
else the local Ceph radosgw of tools/s3_local/start.sh (started if needed, left running).

Loaders, same shards, batch size, worker count, prefetch depth and shuffle buffer, both reading through
ldmscale's S3 opener (so only what happens after the bytes arrive differs):
- ldmscale: ldmscale.data.ResumableLoader, the trainer's loader (metadata filters, resumable position,
  JPEG decode at reduced size, resize + center crop, float [-1, 1] tensors).
- reference: what open_clip does, wds.WebDataset(urls).shuffle(...).decode("pil").to_tuple("jpg", "txt"),
  then a PIL resize of the short side to the resolution (bicubic) and a center crop, to the same tensors.

--buckets instead compares two decodes of the same local photo shards, side by side in this process: today's square
crop (ldmscale.data.decode_image) against the cover-crop into aspect buckets (decode_sample_to_bucket, data.buckets:
nearest bucket from the json's original size, resize to cover, centre or random crop) at the same resolution; then
the whole loader (ResumableLoader, no workers) over one epoch with square batches against per-bucket batches. The
budget: bucketing may cost at most 10% of samples/s. No S3 server is needed for it.

    python tools/bench/loader_bench.py --buckets [--resolution 256] [--bucket-step 32] [--repeats 7]

Throughput is counted per CPU-second of the main process plus its loader workers ("samples/s per core"):
on a shared machine wall time depends on the neighbours, CPU time much less. Wall samples/s are printed too.
Each measurement starts fresh workers, lets every worker deliver one batch (start-up, shard opening and
shuffle-buffer fill excluded), then times --batches batches. The loaders alternate (ABBA order) over
--repeats rounds after one warm-up round; medians are reported. A second table times the per-image
decode paths in this process, without I/O, to show where the difference comes from.
"""

from __future__ import annotations

import argparse
import gc
import io
import json
import os
import statistics
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageEnhance

from ldmscale.config import DataConfig
from ldmscale.data import (
    ResumableLoader,
    decode_image,
    storage,
    to_tensor,
)
from ldmscale.data.shard_writer import ShardSample, write_laion_shards

ROOT = Path(__file__).resolve().parents[2]

CLK_TCK = os.sysconf("SC_CLK_TCK")
ASPECTS = (1.0, 4 / 3, 3 / 2, 16 / 9)


# ---------------------------------------------------------------- data


def make_photos(n: int, seed: int, min_side: int = 512, max_side: int = 1024) -> Iterator[ShardSample]:
    """n distinct real-sized photos from scikit-learn's two sample photos, seeded."""
    from sklearn.datasets import load_sample_images

    sources = [Image.fromarray(a) for a in load_sample_images().images]
    rng = np.random.default_rng(seed)
    for i in range(n):
        src_index = int(rng.integers(len(sources)))
        src = sources[src_index]
        sw, sh = src.size
        aspect = float(rng.choice(ASPECTS))
        portrait = bool(rng.random() < 0.3)
        # a crop of 45-100% of the source's short side, at the chosen aspect, somewhere in the photo
        ch = int(min(sh, sw / aspect) * rng.uniform(0.45, 1.0))
        cw = int(ch * aspect)
        left, top = int(rng.integers(0, sw - cw + 1)), int(rng.integers(0, sh - ch + 1))
        img = src.crop((left, top, left + cw, top + ch))
        angle = float(rng.uniform(-12, 12))
        if abs(angle) > 1:
            # rotate, then keep the inner rectangle so no black corners remain
            rot = img.rotate(angle, resample=Image.Resampling.BICUBIC)
            a = np.deg2rad(abs(angle))
            k = 1 / (np.cos(a) + np.sin(a) * max(cw / ch, ch / cw))
            iw, ih = int(cw * k), int(ch * k)
            img = rot.crop(((cw - iw) // 2, (ch - ih) // 2, (cw - iw) // 2 + iw, (ch - ih) // 2 + ih))
        if portrait:
            img = img.transpose(Image.Transpose.ROTATE_90)
        if rng.random() < 0.5:
            img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        short = int(rng.integers(min_side, max_side + 1))
        w, h = img.size
        scale = short / min(w, h)
        img = img.resize((round(w * scale), round(h * scale)), Image.Resampling.BICUBIC)
        for enhancer in (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color):
            img = enhancer(img).enhance(float(rng.uniform(0.7, 1.3)))
        grain = rng.normal(0.0, 4.0, (img.size[1], img.size[0], 1))
        img = Image.fromarray(np.clip(np.asarray(img, dtype=np.float32) + grain, 0, 255).astype(np.uint8))
        name = ("china", "flower")[src_index] if len(sources) == 2 else str(src_index)
        yield ShardSample(img, f"a photo of a {name} scene, variant {i}", url=f"sklearn://sample_images/{name}/{i}")


def build_shards(work: Path, images: int, per_shard: int, seed: int,
                 sides: tuple[int, int] = (512, 1024)) -> list[Path]:
    """Local LAION-layout shards, cached in `work` by their parameters."""
    name = f"photos-{images}-{per_shard}-{seed}" + ("" if sides == (512, 1024) else f"-{sides[0]}-{sides[1]}")
    out = work / name
    done = out / "DONE"
    if done.exists():
        return sorted(out.glob("*.tar"))
    t0 = time.perf_counter()
    tars = write_laion_shards(list(make_photos(images, seed, *sides)), out, samples_per_shard=per_shard,
                              jpeg_quality=95, progress=False)
    done.write_text("ok")
    print(f"wrote {images} photos in {len(tars)} shards to {out} in {time.perf_counter() - t0:.0f}s", flush=True)
    return tars


def s3_server() -> dict[str, str]:
    """Endpoint and credentials: from the environment, else the local radosgw (started if needed)."""
    if os.environ.get("LDMSCALE_S3_ENDPOINT"):
        return {"endpoint_url": os.environ["LDMSCALE_S3_ENDPOINT"], "key": os.environ["AWS_ACCESS_KEY_ID"],
                "secret": os.environ["AWS_SECRET_ACCESS_KEY"]}
    proc = subprocess.run([str(ROOT / "tools/s3_local/start.sh")], capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        sys.exit(f"tools/s3_local/start.sh failed ({proc.returncode}):\n{proc.stderr[-2000:]}")
    env = dict(line.split("=", 1) for line in proc.stdout.splitlines() if "=" in line)
    return {"endpoint_url": env["AWS_ENDPOINT_URL"], "key": env["AWS_ACCESS_KEY_ID"],
            "secret": env["AWS_SECRET_ACCESS_KEY"]}


def upload(tars: list[Path], opts: dict[str, str], bucket: str) -> list[str]:
    import s3fs

    fs = s3fs.S3FileSystem(**opts, skip_instance_cache=True)
    if not fs.exists(bucket):
        fs.mkdir(bucket)
    prefix = f"{bucket}/{tars[0].parent.name}"
    t0, size = time.perf_counter(), 0
    for tar in tars:
        for path in tar.parent.glob(f"{tar.stem}*"):  # the .tar, .parquet and _stats.json
            fs.put_file(str(path), f"{prefix}/{path.name}")
            size += path.stat().st_size
    print(f"uploaded {size / 2**20:.0f} MiB to s3://{prefix}/ in {time.perf_counter() - t0:.0f}s", flush=True)
    return [f"s3://{prefix}/{t.name}" for t in tars]


# ---------------------------------------------------------------- the reference pipeline


def reference_transform(img: Image.Image, resolution: int) -> torch.Tensor:
    """open_clip's transform without torchvision: Resize(resolution, bicubic) of the short side, CenterCrop,
    ToTensor, Normalize(0.5, 0.5), i.e. a float [-1, 1] CHW tensor like ldmscale's loader makes."""
    w, h = img.size
    scale = resolution / min(w, h)
    img = img.resize((max(resolution, round(w * scale)), max(resolution, round(h * scale))),
                     Image.Resampling.BICUBIC)
    w, h = img.size
    left, top = (w - resolution) // 2, (h - resolution) // 2
    img = img.crop((left, top, left + resolution, top + resolution))
    # what torchvision's to_tensor and normalize do to a PIL image
    chw = torch.from_numpy(np.array(img, dtype=np.uint8, copy=True)).permute(2, 0, 1).contiguous()
    return chw.float().div(255).sub_(0.5).div_(0.5)


class _RefTransform:
    """Picklable per-sample map (fork workers would not need it; spawn ones would)."""

    def __init__(self, resolution: int) -> None:
        self.resolution = resolution

    def __call__(self, sample: tuple[Image.Image, str]) -> tuple[torch.Tensor, str]:
        img, txt = sample
        return reference_transform(img, self.resolution), txt


def reference_iter(urls: list[str], a: argparse.Namespace) -> Iterator[Any]:
    import webdataset as wds

    ds = (
        # endless as open_clip's --dataset-resampled: each worker draws shards with replacement; repeating
        # at the batch level instead would decode, then drop, every epoch's partial batch
        wds.WebDataset(urls, resampled=True, shardshuffle=False, empty_check=False, seed=a.seed)
        .shuffle(a.shuffle_buffer, initial=a.shuffle_buffer)
        .decode("pil")
        .to_tuple("jpg", "txt")
        .map(_RefTransform(a.resolution))
        .batched(a.batch, partial=False)
    )
    loader = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=a.workers, prefetch_factor=4,
                                         multiprocessing_context="fork")
    return iter(loader)


def ldmscale_iter(urls: list[str], opts: dict[str, str], a: argparse.Namespace) -> Iterator[Any]:
    cfg = DataConfig(shards=urls, storage_options=opts, resolution=a.resolution, num_workers=a.workers,
                     shuffle_buffer=a.shuffle_buffer, samples_per_epoch=10**9)
    return ResumableLoader(cfg, None, seed=a.seed, rank=0, world=1, micro_batch=a.batch,
                           samples_per_epoch=10**9)  # one endless epoch: no worker restart mid-measurement


# ---------------------------------------------------------------- measuring


def _descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo += children.get(p, [])
    return out


def cpu_by_process() -> dict[int, float]:
    """CPU seconds (user + system, all threads) of this process and each live descendant."""
    out = {}
    for p in _descendants(os.getpid()):
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        out[p] = (int(fields[11]) + int(fields[12])) / CLK_TCK
    return out


def measure(make: Callable[[], Iterator[Any]], workers: int, batches: int) -> dict[str, float]:
    it = make()
    for _ in range(workers):  # every worker has started, opened its shards and filled its buffer
        next(it)
    cpu0, t0 = cpu_by_process(), time.perf_counter()
    n = 0
    for _ in range(batches):
        batch = next(it)
        pixels = batch["pixels"] if isinstance(batch, dict) else batch[0]
        n += pixels.shape[0]
    wall = time.perf_counter() - t0
    cpu1 = cpu_by_process()
    # a process that exited in the window would lose its time; workers live for the whole measurement
    cpu = sum(c - cpu0.get(p, 0.0) for p, c in cpu1.items())
    del it, batch
    gc.collect()  # joins the workers before the next measurement starts its own
    deadline = time.monotonic() + 30
    while len(_descendants(os.getpid())) > 1 and time.monotonic() < deadline:
        time.sleep(0.05)
    return {"samples": n, "wall_s": wall, "cpu_s": cpu, "per_core": n / cpu, "per_s": n / wall}


def decode_table(tars: list[Path], resolution: int, count: int) -> dict[str, float]:
    """ms per image of each decode path in this process (no I/O, no workers): where the time goes."""
    from ldmscale.data.shard_writer import iter_tar_samples

    jpgs = [s["jpg"] for t in tars for s in iter_tar_samples(t)][:count]
    sizes = [Image.open(io.BytesIO(j)).size for j in jpgs]
    out = {"mean_megapixels": float(np.mean([w * h for w, h in sizes]) / 1e6),
           "mean_jpeg_kib": float(np.mean([len(j) for j in jpgs]) / 1024)}

    def ref(j: bytes) -> torch.Tensor:
        img = Image.open(io.BytesIO(j))
        img.load()
        return reference_transform(img.convert("RGB"), resolution)

    def ours(j: bytes) -> torch.Tensor:
        return to_tensor([decode_image(j, resolution, True)])

    for name, fn in (("ldmscale_ms", ours), ("reference_ms", ref)):
        fn(jpgs[0])
        times = []
        for _ in range(3):
            t0 = time.process_time()
            for j in jpgs:
                fn(j)
            times.append((time.process_time() - t0) * 1000 / len(jpgs))
        out[name] = min(times)
    return out


def bucket_table(tars: list[Path], resolution: int, step: int, max_aspect: float, count: int, repeats: int,
                 seed: int) -> dict[str, Any]:
    """CPU ms per image of the square decode and the bucket decode (centre and random crop) on the same JPEGs,
    alternating ABBA over `repeats` rounds after a warm-up; medians, and samples/s ratios against the square."""
    from ldmscale.data.buckets import bucket_set
    from ldmscale.data.decode import decode_sample_to_bucket
    from ldmscale.data.shard_writer import iter_tar_samples

    samples = [s for t in tars for s in iter_tar_samples(t)][:count]
    buckets = bucket_set(resolution, step, max_aspect)
    paths: dict[str, Callable[[dict], Any]] = {
        "square": lambda s: decode_image(s["jpg"], resolution, True),
        "buckets_centre": lambda s: decode_sample_to_bucket(s, "jpg", buckets, True, seed),
        "buckets_random": lambda s: decode_sample_to_bucket(s, "jpg", buckets, False, seed),
    }
    times: dict[str, list[float]] = {name: [] for name in paths}
    for r in range(repeats + 1):
        order = list(paths) if r % 2 == 0 else list(reversed(paths))
        for name in order:
            t0 = time.process_time()
            for s in samples:
                paths[name](s)
            if r > 0:  # round 0 warms the page cache and the allocator
                times[name].append((time.process_time() - t0) * 1000 / len(samples))
    ms = {name: statistics.median(t) for name, t in times.items()}
    used = Counter(decode_sample_to_bucket(s, "jpg", buckets, True, seed)[1].target for s in samples)
    return {"images": len(samples), "buckets": [b.name for b in buckets], "ms_per_image": ms, "rounds_ms": times,
            "ratio_centre": ms["square"] / ms["buckets_centre"], "ratio_random": ms["square"] / ms["buckets_random"],
            "bucket_use": {f"{w}x{h}": n for (h, w), n in sorted(used.items())}}


def bucket_loader_table(tars: list[Path], resolution: int, step: int, max_aspect: float, batch: int,
                        repeats: int, seed: int) -> dict[str, Any]:
    """CPU ms per sample of the whole loader (ldmscale.data.ResumableLoader in this process, no workers: reading,
    filters, per-bucket queues, decode, collation) over one epoch of the shards, square crops against aspect-bucket
    batches (random crops both), alternating ABBA over `repeats` rounds after a warm-up; medians and the ratio."""
    from ldmscale.config import BucketConfig
    from ldmscale.data.shard_writer import iter_tar_samples

    urls = [str(t) for t in tars]
    n = sum(1 for t in tars for _ in iter_tar_samples(t))

    def epoch(bucketed: bool) -> float:
        dc = DataConfig(shards=urls, resolution=resolution, num_workers=0, shuffle_buffer=64, center_crop=False,
                        buckets=BucketConfig(enabled=bucketed, step=step, max_aspect=max_aspect))
        loader = ResumableLoader(dc, None, seed=seed, rank=0, world=1, micro_batch=batch, samples_per_epoch=n,
                                 urls=urls)
        t0 = time.process_time()
        for _ in range(loader.batches_per_epoch):
            next(loader)
        return (time.process_time() - t0) * 1000 / (loader.batches_per_epoch * batch)

    times: dict[str, list[float]] = {"square": [], "buckets": []}
    for r in range(repeats + 1):
        for name in (list(times) if r % 2 == 0 else list(reversed(times))):
            ms = epoch(name == "buckets")
            if r > 0:
                times[name].append(ms)
    ms = {name: statistics.median(t) for name, t in times.items()}
    return {"samples": n, "batch": batch, "ms_per_sample": ms, "rounds_ms": times,
            "ratio": ms["square"] / ms["buckets"]}


def run_buckets(a: argparse.Namespace) -> dict[str, Any]:
    tars = build_shards(a.work, a.images, a.per_shard, a.seed, (a.min_side, a.max_side))
    r = bucket_table(tars, a.resolution, a.bucket_step, a.max_aspect, a.images, a.repeats, a.seed)
    print(f"{r['images']} photos, {a.resolution}px, buckets {' '.join(r['buckets'])} (step {a.bucket_step}, "
          f"max aspect {a.max_aspect}); used: {r['bucket_use']}")
    for name, ms in r["ms_per_image"].items():
        print(f"  {name:15s}: {ms:6.2f} CPU-ms per image   {1000 / ms:7.1f} samples/s per core")
    print(f"  buckets / square samples/s: centre crop {r['ratio_centre']:.3f}x, random crop {r['ratio_random']:.3f}x "
          f"(budget: >= 0.90x; median of {a.repeats} ABBA rounds)")
    r["loader"] = lo = bucket_loader_table(tars, a.resolution, a.bucket_step, a.max_aspect, a.batch, a.repeats, a.seed)
    print(f"whole loader, one epoch of {lo['samples']} samples, micro-batch {lo['batch']}, random crops, in process:")
    for name, ms in lo["ms_per_sample"].items():
        print(f"  {name:15s}: {ms:6.2f} CPU-ms per sample  {1000 / ms:7.1f} samples/s per core")
    print(f"  per-bucket batches / square batches samples/s: {lo['ratio']:.3f}x (median of {a.repeats} ABBA rounds)")
    out = {"args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(a).items()}, **r,
           "cpus": os.cpu_count(), "run_id": uuid.uuid4().hex[:8]}
    if a.json:
        a.json.write_text(json.dumps(out, indent=2))
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=300, help="distinct photos in the shards")
    p.add_argument("--per-shard", type=int, default=50, help="samples per shard")
    p.add_argument("--resolution", type=int, default=256)
    p.add_argument("--workers", type=int, default=2, help="DataLoader workers, both loaders")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--batches", type=int, default=8, help="timed batches per measurement")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--shuffle-buffer", type=int, default=64, help="both loaders' shuffle buffer")
    p.add_argument("--min-side", type=int, default=512, help="photos' short side: at least this")
    p.add_argument("--max-side", type=int, default=1024, help="photos' short side: at most this")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work", type=Path, default=Path("/tmp/ldmscale-loader-bench"), help="local shard cache")
    p.add_argument("--bucket", default="ldmscale-bench")
    p.add_argument("--local", action="store_true", help="read the local shards instead of S3 (profiling)")
    p.add_argument("--json", type=Path, help="also write the results here")
    p.add_argument("--buckets", action="store_true",
                   help="compare the bucket decode with the square one instead (local shards, one process)")
    p.add_argument("--bucket-step", type=int, default=32, help="--buckets: data.buckets.step")
    p.add_argument("--max-aspect", type=float, default=2.0, help="--buckets: data.buckets.max_aspect")
    a = p.parse_args(argv)
    torch.set_num_threads(1)  # each loader process does single-threaded work; keep the main process alike
    if a.buckets:
        return run_buckets(a)

    tars = build_shards(a.work, a.images, a.per_shard, a.seed, (a.min_side, a.max_side))
    if len(tars) < a.workers:
        sys.exit(f"{len(tars)} shards cannot feed {a.workers} workers: lower --per-shard")
    if a.local:
        opts: dict[str, str] = {}
        urls = [str(t) for t in tars]
    else:
        opts = s3_server()
        urls = upload(tars, opts, a.bucket)
    storage.register_gopen_schemes(opts)  # the reference reads through the same opener (fork workers inherit)
    decode = decode_table(tars, a.resolution, min(a.images, 60))
    print(f"photos: {decode['mean_megapixels']:.2f} MP, {decode['mean_jpeg_kib']:.0f} KiB on average; "
          f"decode+resize+crop per image in one process: ldmscale {decode['ldmscale_ms']:.1f} ms, "
          f"reference {decode['reference_ms']:.1f} ms", flush=True)

    loaders: dict[str, Callable[[], Iterator[Any]]] = {
        "ldmscale": lambda: ldmscale_iter(urls, opts, a),
        "reference": lambda: reference_iter(urls, a),
    }
    results: dict[str, list[dict[str, float]]] = {name: [] for name in loaders}
    for r in range(a.repeats + 1):
        order = list(loaders) if r % 2 == 0 else list(reversed(loaders))  # ABBA: drift hits both alike
        for name in order:
            m = measure(loaders[name], a.workers, a.batches)
            if r == 0:
                continue  # warm-up: first connections, imports, page cache
            results[name].append(m)
            print(f"round {r}/{a.repeats} {name:9s}: {m['per_core']:6.1f} samples/s per core "
                  f"({m['samples']} samples, {m['cpu_s']:.1f} CPU-s, {m['per_s']:.1f} samples/s wall)", flush=True)

    summary = {name: {"per_core": statistics.median(x["per_core"] for x in ms),
                      "per_s": statistics.median(x["per_s"] for x in ms)} for name, ms in results.items()}
    ratio = summary["ldmscale"]["per_core"] / summary["reference"]["per_core"]
    ratio_wall = summary["ldmscale"]["per_s"] / summary["reference"]["per_s"]
    source = "local disk" if a.local else f"S3 {opts['endpoint_url']}"
    print(f"\n{a.images} photos from {source}, {a.resolution}px, batch {a.batch}, {a.workers} workers, "
          f"median of {a.repeats}:")
    for name, s in summary.items():
        print(f"  {name:9s}: {s['per_core']:7.1f} samples/s per core   {s['per_s']:7.1f} samples/s wall")
    print(f"  ratio    : {ratio:7.2f}x per core          {ratio_wall:7.2f}x wall")
    out = {"args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(a).items()}, "source": source,
           "decode": decode, "summary": summary, "ratio_per_core": ratio, "ratio_wall": ratio_wall,
           "rounds": results, "cpus": os.cpu_count(), "run_id": uuid.uuid4().hex[:8]}
    if a.json:
        a.json.write_text(json.dumps(out, indent=2))
    return out


if __name__ == "__main__":
    main()
