"""model.channels_last: one U-Net training step (forward + backward) with NHWC activations only (what ZeRO 1-3
allow: their flat parameter buffers need standard strides), with NHWC activations and conv weights (what the
trainer does under ZeRO-0), and plain NCHW, side by side in one run, medians of interleaved repeats.

    OMP_NUM_THREADS=1 python tools/bench/channels_last.py                 # CPU
    python tools/bench/channels_last.py --device cuda --dtype bf16        # one GPU (the case it is for)

Prints each variant's median step time and its ratio to plain NCHW.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from ldmscale.models.networks import build_unet

VARIANTS = ("nchw", "nhwc activations", "nhwc activations + weights")


def make(variant: str, preset: str, latent: int, dtype: torch.dtype, device: torch.device) -> torch.nn.Module:
    torch.manual_seed(0)
    unet = build_unet(preset, 4, 768 if preset == "sd15" else 32, latent).to(device, dtype)
    if variant == "nhwc activations + weights":
        unet = unet.to(memory_format=torch.channels_last)
    return unet


def step_seconds(unet: torch.nn.Module, variant: str, batch: int, latent: int, ctx_dim: int,
                 device: torch.device, dtype: torch.dtype) -> float:
    x = torch.randn(batch, 4, latent, latent, device=device, dtype=dtype)
    if variant != "nchw":
        x = x.contiguous(memory_format=torch.channels_last)
    ctx = torch.randn(batch, 16, ctx_dim, device=device, dtype=dtype)
    t = torch.randint(0, 1000, (batch,), device=device)
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    unet(x, t, encoder_hidden_states=ctx).sample.float().pow(2).mean().backward()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--preset", default="small", help="U-Net preset (tiny, small, sd15)")
    p.add_argument("--latent", type=int, default=16, help="latent side (resolution / 8)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--repeats", type=int, default=7)
    args = p.parse_args()
    device, dtype = torch.device(args.device), {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    ctx_dim = 768 if args.preset == "sd15" else 32
    nets = {v: make(v, args.preset, args.latent, dtype, device) for v in VARIANTS}
    times: dict[str, list[float]] = {v: [] for v in VARIANTS}
    for v in VARIANTS:  # warm-up: allocator, oneDNN/cuDNN kernel choice
        step_seconds(nets[v], v, args.batch, args.latent, ctx_dim, device, dtype)
    for _ in range(args.repeats):  # interleaved, so a neighbour's load hits every variant alike
        for v in VARIANTS:
            times[v].append(step_seconds(nets[v], v, args.batch, args.latent, ctx_dim, device, dtype))
    base = statistics.median(times["nchw"])
    print(f"U-Net {args.preset}, batch {args.batch}, latent {args.latent}x{args.latent}, {args.dtype}, "
          f"{args.device}, median of {args.repeats}")
    for v in VARIANTS:
        med = statistics.median(times[v])
        print(f"  {v:28s} {1000 * med:8.1f} ms   {med / base:5.2f}x nchw")


if __name__ == "__main__":
    main()
