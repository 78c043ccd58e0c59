"""What a mixture costs the loader: the same photo shards read as one source and as a two-source mixture, side by side.

    python tools/bench/mixture_bench.py [--images 240] [--per-shard 20] [--resolution 256] [--workers 2] \
        [--batch 16] [--batches 8] [--repeats 4] [--json out.json]

Data: loader_bench.py's photos (real-sized JPEGs made from scikit-learn's offline sample photos), local shards.
Loaders, same shards, workers, batch, prefetch and shuffle block:
- one source: data.shards = every shard;
- mixture: data.sources = the first half of the shards (weight 0.5) and the second half (0.5): every worker reads two
  streams, every sample slot draws its source (ldmscale/data/mixture.py), drops and draws are counted per source.
Decode dominates both: the ratio shows what the mixture adds (streams, the draw, per-source positions).
Measured as loader_bench.py does: samples per CPU-second of the main process and its workers (wall samples/s too),
fresh workers per measurement, the first batch of each worker excluded, ABBA order, medians of --repeats rounds.
Also reported, in this process: the draw's speed (slots a second), the counting a re-division does per cut piece at
LAION scale (an old worker's rest of a 400 M-sample epoch, 1,024 ranks x 8 workers) and a rank's saved position in
bytes, one source against the mixture.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from loader_bench import build_shards, measure

from ldmscale.config import DataConfig, SourceConfig
from ldmscale.data import ResumableLoader
from ldmscale.data.mixture import Deal, Mixture, role_counts


def loader(urls: list[str], mixture: bool, a: argparse.Namespace) -> ResumableLoader:
    common: dict[str, Any] = {"resolution": a.resolution, "num_workers": a.workers, "shuffle_buffer": a.shuffle_buffer}
    if mixture:
        half = len(urls) // 2
        cfg = DataConfig(sources=[SourceConfig(name="a", shards=urls[:half], weight=0.5),
                                  SourceConfig(name="b", shards=urls[half:], weight=0.5)], **common)
    else:
        cfg = DataConfig(shards=urls, **common)
    return ResumableLoader(cfg, None, seed=a.seed, rank=0, world=1, micro_batch=a.batch,
                           samples_per_epoch=10**9)  # one endless epoch: no worker restart mid-measurement


def draw_speed(slots: int = 10**7) -> float:
    mix = Mixture.of(0, [0.8, 0.2])
    t0 = time.perf_counter()
    mix.sources(0, np.arange(slots))
    return slots / (time.perf_counter() - t0)


def resplit_counting(epoch: int = 400_000_000, ranks: int = 1024, workers: int = 8, micro: int = 2,
                     global_batch: int = 2048, at: float = 0.1) -> dict[str, float]:
    """The per-source count a re-division makes for a piece cut inside an old worker's rest: at most that rest."""
    rest = int(epoch / (ranks * workers) * (1 - at))
    deal = Deal(ranks, workers, micro, global_batch)
    mix = Mixture.of(0, [0.8, 0.2])
    t0 = time.perf_counter()
    counts = role_counts(mix, 0, deal, ranks - 1, workers - 1, int(epoch / (ranks * workers) * at), rest)
    return {"slots": rest, "seconds": time.perf_counter() - t0, "share_b": counts[1] / rest}


def position_bytes(urls: list[str], a: argparse.Namespace) -> dict[str, int]:
    out = {}
    for name, mixture in (("one source", False), ("mixture", True)):
        ld = loader(urls, mixture, argparse.Namespace(**{**vars(a), "workers": 0}))
        for _ in range(3):
            next(ld)
        state = ld.state_dict()
        state.pop("shard_urls", None)  # rank 0's copy of the lists, once per checkpoint
        out[name] = len(json.dumps(state))
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--images", type=int, default=240)
    p.add_argument("--per-shard", type=int, default=20)
    p.add_argument("--resolution", type=int, default=256)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--batches", type=int, default=8, help="timed batches per measurement")
    p.add_argument("--repeats", type=int, default=4)
    p.add_argument("--shuffle-buffer", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work", type=Path, default=Path("/tmp/ldmscale-loader-bench"), help="local shard cache")
    p.add_argument("--json", type=Path)
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    urls = [str(t) for t in build_shards(a.work, a.images, a.per_shard, a.seed)]
    if len(urls) < 2 * a.workers:
        sys.exit(f"{len(urls)} shards cannot give two sources a shard per worker: lower --per-shard")
    loaders = {"one source": lambda: loader(urls, False, a), "mixture": lambda: loader(urls, True, a)}
    results: dict[str, list[dict[str, float]]] = {name: [] for name in loaders}
    for r in range(a.repeats + 1):
        for name in (list(loaders) if r % 2 == 0 else list(reversed(loaders))):  # ABBA
            m = measure(loaders[name], a.workers, a.batches)
            if r:
                results[name].append(m)
                print(f"round {r}/{a.repeats} {name:10s}: {m['per_core']:6.1f} samples/s per core "
                      f"({m['per_s']:.1f} wall)", flush=True)
    summary = {n: {k: statistics.median(x[k] for x in ms) for k in ("per_core", "per_s")} for n, ms in results.items()}
    ratio = summary["mixture"]["per_core"] / summary["one source"]["per_core"]
    ratio_wall = summary["mixture"]["per_s"] / summary["one source"]["per_s"]
    draws, counting, sizes = draw_speed(), resplit_counting(), position_bytes(urls, a)
    print(f"\n{len(urls)} local shards of {a.per_shard} photos, {a.resolution}px, batch {a.batch}, {a.workers} "
          f"workers, median of {a.repeats}:")
    for name, s in summary.items():
        print(f"  {name:10s}: {s['per_core']:7.1f} samples/s per core   {s['per_s']:7.1f} samples/s wall")
    print(f"  ratio     : {ratio:7.3f}x per core (mixture / one source)   {ratio_wall:7.3f}x wall")
    print(f"  the draw: {draws / 1e6:.0f} M slots/s; a re-division's count of a cut piece at 1,024 x 8 workers, "
          f"400 M samples an epoch: {counting['slots']:,} slots in {counting['seconds'] * 1e3:.1f} ms")
    print(f"  a rank's position (3 micro-batches in, workers 0): one source {sizes['one source']:,} bytes, "
          f"mixture {sizes['mixture']:,} bytes")
    out = {"args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(a).items()}, "summary": summary,
           "ratio_per_core": ratio, "ratio_wall": ratio_wall, "draw_slots_per_s": draws, "resplit_count": counting,
           "position_bytes": sizes, "rounds": results}
    if a.json:
        a.json.write_text(json.dumps(out, indent=2))
    return out


if __name__ == "__main__":
    main()
