"""One micro-batch's per-sample draws (posterior, noise, timesteps, caption dropout): ldmscale's counter-based
generator on the training device against the per-sample CPU `torch.Generator`s it replaced (one generator,
kernel and stack per sample and stream, then a copy to the device), side by side in one run, medians.

    OMP_NUM_THREADS=1 python tools/bench/noise_bench.py                 # CPU
    python tools/bench/noise_bench.py --device cuda                     # one GPU (the case it was made for)

Both are pure functions of (seed, sample id, stream), which exact resume needs; only their cost differs.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

from ldmscale.models import noise

# (name, micro-batch, latent shape): the demo's 32 px, SD 1.x at 256 and 512 px
CASES = [("small 32px", 16, (4, 8, 8)), ("sd 256px", 64, (4, 32, 32)), ("sd 512px", 32, (4, 64, 64))]


def per_sample_generators(seed: int, ids: range, shape: tuple[int, ...], device: torch.device) -> list[torch.Tensor]:
    """The previous noise.py: a CPU generator per (sample, stream), stacked, then copied unpinned."""
    def gen(i: int, stream: noise.Stream) -> torch.Generator:
        key = noise.splitmix64(noise.splitmix64(noise.splitmix64(seed) ^ int(stream)) ^ i) & ((1 << 63) - 1)
        return torch.Generator().manual_seed(key)

    post = torch.stack([torch.randn(shape, generator=gen(i, noise.Stream.POSTERIOR)) for i in ids])
    drop = torch.cat([torch.rand(1, generator=gen(i, noise.Stream.CAPTION_DROP)) for i in ids])
    t = torch.cat([torch.randint(1000, (1,), generator=gen(i, noise.Stream.TIMESTEP)) for i in ids])
    eps = torch.stack([torch.randn(shape, generator=gen(i, noise.Stream.NOISE)) for i in ids])
    return [post.to(device), drop, t.to(device), eps.to(device)]


def counter_based(seed: int, ids: range, shape: tuple[int, ...], device: torch.device) -> list[torch.Tensor]:
    return [noise.randn(seed, ids, shape, noise.Stream.POSTERIOR, device),
            noise.rand(seed, ids, noise.Stream.CAPTION_DROP),
            noise.randint(seed, ids, 1000, noise.Stream.TIMESTEP, device),
            noise.randn(seed, ids, shape, noise.Stream.NOISE, device)]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--reps", type=int, default=10, help="micro-batches per round and way")
    args = ap.parse_args(argv)
    device = torch.device(args.device)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    print(f"device: {torch.cuda.get_device_name() if device.type == 'cuda' else f'cpu x{torch.get_num_threads()}'}"
          f" | {args.rounds} rounds x {args.reps} micro-batches, medians (ms per micro-batch, all four draws)")
    for name, batch, shape in CASES:
        ways = {"generators": per_sample_generators, "counter": counter_based}
        ms: dict[str, list[float]] = {w: [] for w in ways}
        for r in range(args.rounds + 1):  # round 0 warms up (allocator, kernels)
            for w in (list(ways) if r % 2 == 0 else list(ways)[::-1]):
                sync()
                t0 = time.perf_counter()
                for k in range(args.reps):
                    ways[w](0, range(k * batch, (k + 1) * batch), shape, device)
                sync()
                if r:
                    ms[w].append((time.perf_counter() - t0) / args.reps * 1e3)
        g, c = statistics.median(ms["generators"]), statistics.median(ms["counter"])
        print(f"{name:11s} batch {batch:3d} latents {'x'.join(map(str, shape)):8s} generators {g:8.3f} ms | "
              f"counter {c:8.3f} ms | speed-up {g / c:6.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
