"""ldmscale's training step against a bare PyTorch loop on the same U-Net, frozen VAE and text encoder, batch
and optimizer, measured side by side in one process: alternating rounds (the order flips every round), medians.

    python tools/bench/trainer_bench.py --preset small                      # CPU: docs/results/trainer-bench.md
    python tools/bench/trainer_bench.py --preset sd15 --resolution 512 --precision bf16 [--compile]   # one GPU

ldmscale's step is the trainer's: the stage's loss (VAE encode on the fly, text encoding, per-sample noise,
timesteps and posterior samples keyed by global sample ids), the DeepSpeed engine's backward and step (ZeRO as
configured, gradient clipping, LR schedule), the sharded EMA update, and the per-step metrics line written to
log.jsonl. The bare loop: the same frozen encoders, torch.randn noise, the U-Net under autocast when bf16,
torch AdamW with the same hyper-parameters, clip_grad_norm_. Models are random-init (nothing is downloaded);
the speed of a step does not depend on the weights.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch
import torch.nn.functional as F

from ldmscale.config import load_config
from ldmscale.data import normalize_pixels
from ldmscale.data.accounting import DROP_REASONS, Accounting, DataTally
from ldmscale.data.position import DataPosition
from ldmscale.models.networks import build_unet
from ldmscale.models.offline import train_tokenizer, write_text_encoder, write_vae
from ldmscale.runtime import dist
from ldmscale.trainer.ds_config import build_ds_config, precision_dtype
from ldmscale.trainer.ema import EMA, warmup_decay
from ldmscale.trainer.engine import build_engine
from ldmscale.trainer.monitor import Monitor, StepStats, StepTimer, peak_tflops
from ldmscale.trainer.stages import build_stage

# small: the CPU demo's U-Net on 32 px digits-sized inputs; sd15: Stable Diffusion 1.x (U-Net, VAE, CLIP-L sizes)
PRESETS: dict[str, dict[str, Any]] = {
    "small": dict(unet="small", vae="tiny", text_hidden=64, text_layers=2, max_length=16, resolution=32, batch=16,
                  precision="fp32"),
    "sd15": dict(unet="sd15", vae="sd15", text_hidden=768, text_layers=12, max_length=77, resolution=512, batch=16,
                 precision="bf16"),
}


def write_models(root: Path, p: dict[str, Any]) -> None:
    captions = [f"a photo of a {c} {n}" for c in ("red", "green", "blue", "large", "small") for n in range(50)]
    tok = train_tokenizer(captions, root / "tokenizer", max_length=p["max_length"])
    write_text_encoder(root / "text_encoder", tok, hidden_size=p["text_hidden"], layers=p["text_layers"])
    write_vae(root / "vae", preset=p["vae"])


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


class FixedBatches:
    """What the monitor asks of the loader; the batch itself is the same prepared one for both loops."""

    position = DataPosition()
    accounting = Accounting(["default"], [None])

    def accounting_vector(self) -> list[float]:
        return [0.0] * len(DROP_REASONS)

    def read_accounting(self, values: list[float]) -> DataTally:
        return self.accounting.read(values)


class Ldmscale:
    """The trainer's per-step work (ldmscale/train.py's loop body), from the trainer's own parts."""

    def __init__(self, cfg: Any, device: torch.device, out: Path, compile_unet: bool) -> None:
        self.cfg, self.device = cfg, device
        self.task = build_stage(cfg, device, precision_dtype(cfg.deepspeed))
        self.init_state = {k: v.clone() for k, v in self.task.trained.state_dict().items()}
        if compile_unet:
            self.task.module.unet = torch.compile(self.task.module.unet)
        trainable = [(n, p) for n, p in self.task.module.named_parameters() if p.requires_grad]
        ds_config = build_ds_config(cfg.deepspeed, cfg.optim, cfg.train, 1)
        self.engine = build_engine(self.task.module, [p for _, p in trainable], ds_config)
        self.ema = EMA(trainable, cfg.train.ema_decay, self.engine.optimizer)
        self.monitor = Monitor(cfg, out, is_main=True)
        self.timer, self.loader, self.step = StepTimer(), FixedBatches(), 0

    def __call__(self, batch: dict[str, Any]) -> None:
        t = self.cfg.train
        ids = range(self.step * t.global_batch_size, (self.step + 1) * t.global_batch_size)
        stats = StepStats()
        loss, parts = self.task.loss(self.engine, batch, ids, self.step)
        self.engine.backward(loss)
        self.engine.step()
        stats.add(loss, parts)
        self.step += 1
        self.timer.samples += t.global_batch_size
        self.ema.update(warmup_decay(t.ema_decay, self.step - 1))
        self.monitor.log_step(self.step, stats, stop_requested=False, engine=self.engine, loader=self.loader,
                              timer=self.timer, samples_seen=self.step * t.global_batch_size, max_steps=t.max_steps,
                              log_every=t.log_every, world=1, flops_per_sample=0.0, peak=0.0)


class Bare:
    """What a hand-written loop does with the same models: the reference."""

    def __init__(self, ldm: Ldmscale, compile_unet: bool) -> None:
        cfg, task = ldm.cfg, ldm.task
        self.enc, self.scheduler, self.device = task.encoders, task.module.scheduler, ldm.device
        self.bf16 = cfg.deepspeed.precision == "bf16"
        size = cfg.data.resolution // (2 ** (len(self.enc.vae.config.block_out_channels) - 1))
        unet = build_unet(cfg.model.unet, self.enc.latent_channels, self.enc.text_dim, size)
        unet.load_state_dict(ldm.init_state)
        if cfg.model.gradient_checkpointing:
            unet.enable_gradient_checkpointing()
        self.unet = unet.to(self.device).train()
        self.forward = torch.compile(self.unet) if compile_unet else self.unet
        o = cfg.optim
        fused = {"fused": True} if self.device.type == "cuda" else {}
        self.opt = torch.optim.AdamW(self.unet.parameters(), lr=o.lr, betas=o.betas, eps=o.eps,
                                     weight_decay=o.weight_decay, **fused)
        self.grad_clip = o.grad_clip

    def __call__(self, batch: dict[str, Any]) -> None:
        with torch.no_grad():
            pixels = normalize_pixels(batch["pixels"].to(self.device, non_blocking=True))
            latents = self.enc.vae.encode(pixels.to(self.enc.dtype)).latent_dist.sample().float()
            latents = latents * self.enc.scaling_factor
            context = self.enc.text_encoder(batch["input_ids"].to(self.device)).last_hidden_state
        noise = torch.randn_like(latents)
        t = torch.randint(0, self.scheduler.config.num_train_timesteps, (latents.shape[0],), device=self.device)
        noisy = self.scheduler.add_noise(latents, noise, t)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            pred = self.forward(noisy, t, encoder_hidden_states=context).sample
        loss = F.mse_loss(pred.float(), noise)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.unet.parameters(), self.grad_clip)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        loss.item()  # the loop prints its loss: one host sync, as the trainer has


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", choices=sorted(PRESETS), default="small")
    ap.add_argument("--resolution", type=int, help="pixels (default: the preset's)")
    ap.add_argument("--precision", choices=["fp32", "bf16"], help="default: the preset's")
    ap.add_argument("--batch", type=int, help="images per step (default: the preset's)")
    ap.add_argument("--zero", type=int, default=2, choices=[0, 1, 2, 3], help="ldmscale's ZeRO stage (default 2)")
    ap.add_argument("--compile", action="store_true", help="torch.compile the U-Net in both loops")
    ap.add_argument("--gradient-checkpointing", action="store_true")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--steps", type=int, default=10, help="steps per round and loop")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("overrides", nargs="*", help="more config overrides for ldmscale's side (section.key=value), "
                    "e.g. 'deepspeed.extra={zero_optimization: {contiguous_gradients: false}}'")
    args = ap.parse_args(argv)
    p = dict(PRESETS[args.preset])
    p.update({k: v for k, v in (("resolution", args.resolution), ("precision", args.precision),
                                ("batch", args.batch)) if v})
    info = dist.init_distributed()
    if info.device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
    root = Path(tempfile.mkdtemp(prefix="trainer_bench_"))
    write_models(root / "models", p)
    cfg = load_config(None, [
        f"model.vae={root / 'models/vae'}", f"model.text_encoder={root / 'models/text_encoder'}",
        f"model.tokenizer={root / 'models/tokenizer'}", f"model.unet={p['unet']}", f"data.resolution={p['resolution']}",
        f"data.shards=[{root}]", f"train.micro_batch_size={p['batch']}", f"train.global_batch_size={p['batch']}",
        f"deepspeed.precision={p['precision']}", f"deepspeed.zero_stage={args.zero}", "train.ema_decay=0.9999",
        f"model.gradient_checkpointing={str(args.gradient_checkpointing).lower()}", "optim.warmup_steps=10",
        f"train.max_steps={10**6}", f"train.out_dir={root / 'run'}", "wandb.mode=disabled", *args.overrides,
    ])
    ldm = Ldmscale(cfg, info.device, root / "run", args.compile)
    bare = Bare(ldm, args.compile)
    gen = torch.Generator().manual_seed(0)
    batch = {
        "pixels": torch.randint(0, 256, (p["batch"], 3, p["resolution"], p["resolution"]), dtype=torch.uint8,
                                generator=gen),
        "input_ids": torch.randint(0, len(ldm.task.tokenizer), (p["batch"], p["max_length"]), generator=gen),
        "keys": [f"{i:09d}" for i in range(p["batch"])],
    }
    if info.device.type == "cuda":
        batch["pixels"], batch["input_ids"] = batch["pixels"].pin_memory(), batch["input_ids"].pin_memory()
    loops = {"ldmscale": ldm, "bare": bare}
    for loop in loops.values():  # compile, allocator, cudnn autotuning
        for _ in range(args.warmup):
            loop(batch)
    sync(info.device)
    rates: dict[str, list[float]] = {name: [] for name in loops}
    for r in range(args.rounds):
        for name in (("ldmscale", "bare") if r % 2 == 0 else ("bare", "ldmscale")):
            t0 = time.perf_counter()
            for _ in range(args.steps):
                loops[name](batch)
            sync(info.device)
            rates[name].append(args.steps * p["batch"] / (time.perf_counter() - t0))
    med = {name: statistics.median(v) for name, v in rates.items()}
    unet_flops, vae_flops = ldm.task.flops_per_sample(), ldm.task.encode_flops_per_sample()
    peak = peak_tflops(0.0)
    dev = torch.cuda.get_device_name() if info.device.type == "cuda" else f"cpu x{torch.get_num_threads()} threads"
    print(f"device: {dev} | preset {args.preset} {p['resolution']}px {p['precision']} batch {p['batch']} "
          f"zero {args.zero} compile {args.compile} | rounds {args.rounds} x {args.steps} steps")
    for name in loops:
        mfu = f" | MFU {100 * med[name] * unet_flops / (peak * 1e12):.1f}% (U-Net fwd+bwd)" if peak else ""
        print(f"{name:9s} median {med[name]:8.2f} img/s  (rounds: {', '.join(f'{x:.2f}' for x in rates[name])})"
              + mfu)
    print(f"FLOPs per image: U-Net fwd+bwd {unet_flops / 1e9:.2f} GFLOP, VAE encode {vae_flops / 1e9:.2f} GFLOP")
    print(f"ratio ldmscale / bare = {med['ldmscale'] / med['bare']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
