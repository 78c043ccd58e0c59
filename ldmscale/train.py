"""`ldmscale-train`: the training loop, readable top to bottom.

setup (process group, frozen encoders, the DeepSpeed engine, EMA, resume, data) -> loop of
[micro-batches -> backward -> step -> EMA -> log -> sample -> checkpoint / preemption] -> final save.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import deepspeed
import torch

from ldmscale import dist, preemption
from ldmscale.checkpoint import Checkpointer, load_ema, resolve_resume
from ldmscale.config import Config, ConfigError, dump_config, load_config, validate
from ldmscale.data import DataPosition, ResumableLoader, count_samples, normalize_pixels
from ldmscale.data.storage import StorageError
from ldmscale.ds_config import accumulation_steps, build_ds_config, precision_dtype
from ldmscale.ema import EMA, gathered, warmup_decay
from ldmscale.monitor import Monitor, StepTimer, peak_tflops, rank_keys_file
from ldmscale.stages import Task


@dataclass
class TrainResult:
    status: str  # "finished" | "preempted"
    step: int
    out_dir: Path


def absolutize_model_paths(cfg: Config) -> None:
    """Saved configs must find the encoders again from another working directory (sampling, export)."""
    m = cfg.model
    for key in ("pretrained", "vae", "text_encoder", "tokenizer", "unet"):
        ref = getattr(m, key)
        if ref and Path(ref).exists():
            setattr(m, key, str(Path(ref).resolve()))
    cfg.data.shards = [str(Path(s).resolve()) if Path(s).exists() else s for s in cfg.data.shards]
    for key in ("vision_model", "init_from"):
        ref = getattr(cfg.style, key)
        if ref and Path(ref).exists():
            setattr(cfg.style, key, str(Path(ref).resolve()))


def check_data(cfg: Config) -> int:
    """Before any process group: an empty shard list, a wrong endpoint, bad credentials or uncountable shards
    fail here, fast, on every rank alike. Returns the samples per epoch."""
    from ldmscale.data import check_shards_reachable, expand_shard_urls

    try:
        urls = expand_shard_urls(cfg.data.shards, cfg.data.storage_options)
        check_shards_reachable(urls, cfg.data.storage_options)
        return count_samples(cfg.data, urls)
    except ValueError as e:
        raise StorageError(str(e)) from None


def main(cfg: Config, resume: str = "auto") -> TrainResult:
    samples_per_epoch = check_data(cfg)
    info = dist.init_distributed()
    validate(cfg, world_size=info.world_size, device_type=info.device.type)
    absolutize_model_paths(cfg)
    out = Path(cfg.train.out_dir)
    ck = Checkpointer(out / "checkpoints", cfg.train.keep_last)
    config_yaml = dump_config(cfg)
    if info.is_main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.yaml").write_text(config_yaml)
    torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank
    dtype = precision_dtype(cfg)
    tag_dir = resolve_resume(ck.root, resume)
    task = Task(cfg, info.device, dtype, fresh=tag_dir is None)
    flops = task.flops_per_sample()
    trainable = [(n, p) for n, p in task.module.named_parameters() if p.requires_grad]
    engine, _, _, _ = deepspeed.initialize(
        model=task.module, model_parameters=[p for _, p in trainable], config=build_ds_config(cfg, info.world_size)
    )
    ema = EMA(trainable, cfg.train.ema_decay, keep=info.is_main) if cfg.train.ema_decay > 0 else None
    state: dict[str, Any] = {"step": 0, "samples_seen": 0, "data": None}
    if tag_dir is not None:
        state = ck.load(engine, tag_dir)
        if ema is not None:
            ema.load_state_dict(load_ema(tag_dir) if info.is_main else {})
    monitor = Monitor(cfg, out, info.is_main)
    if tag_dir is not None:
        monitor.event(f"resumed from {tag_dir} at step {state['step']}")
    elif task.init_note:
        monitor.event(f"style step 2: U-Net initialised from {task.init_note}")
    loader = ResumableLoader(
        cfg.data, task.tokenizer, seed=cfg.train.seed, rank=info.rank, world=info.world_size,
        micro_batch=cfg.train.micro_batch_size, samples_per_epoch=samples_per_epoch,
        position=DataPosition.from_dict(state["data"]) if state.get("data") else None, style=cfg.style,
    )
    gas = accumulation_steps(cfg, info.world_size)
    keys_log = None
    if cfg.train.log_sample_keys:
        rank_keys_file(out, info.rank).parent.mkdir(parents=True, exist_ok=True)
        keys_log = open(rank_keys_file(out, info.rank), "a")
    dist.print0(
        f"ldmscale: stage={cfg.train.stage} ranks={info.world_size} device={info.device.type} "
        f"params={sum(p.numel() for _, p in trainable) / 1e6:.2f}M zero={cfg.deepspeed.zero_stage} "
        f"precision={cfg.deepspeed.precision} global_batch={cfg.train.global_batch_size} "
        f"micro={cfg.train.micro_batch_size} accum={gas} batches/epoch/rank={loader.batches_per_epoch} "
        f"start_step={state['step']} max_steps={cfg.train.max_steps}"
    )
    preemption.install()
    timer = StepTimer()
    peak = peak_tflops(cfg.train.peak_tflops)
    step = state["step"]
    saved_step = step if tag_dir is not None else -1

    def save() -> None:
        nonlocal saved_step
        if saved_step == step:
            return
        st = {"step": step, "samples_seen": state["samples_seen"], "data": loader.state_dict(),
              "world_size": info.world_size, "time": time.time()}
        ck.save(engine, step, st, ema.state_dict() if ema is not None and info.is_main else None, config_yaml)
        saved_step = step
        monitor.event(f"saved checkpoint step {step}")

    status = "finished"
    while step < cfg.train.max_steps:
        losses: list[torch.Tensor] = []
        parts: dict[str, float] = {}
        step_keys: list[str] = []
        for micro in range(gas):
            with timer.measure_wait():
                batch = next(loader)
            # global sample index: the same sample gets the same noise whatever the world size or accumulation
            slot = (micro * info.world_size + info.rank) * cfg.train.micro_batch_size
            first = step * cfg.train.global_batch_size + slot
            ids = list(range(first, first + len(batch["keys"])))
            loss, p = task.loss(engine, batch, ids)
            engine.backward(loss)
            engine.step()
            losses.append(loss.detach().float())
            for k, v in p.items():
                parts[k] = parts.get(k, 0.0) + float(v) / gas
            step_keys += batch["keys"]
        step += 1
        state["samples_seen"] += cfg.train.global_batch_size
        timer.samples += cfg.train.global_batch_size
        if ema is not None and step > cfg.train.ema_start_step:
            n = step - cfg.train.ema_start_step - 1  # a function of the step: resumes exactly
            ema.update(warmup_decay(cfg.train.ema_decay, n) if cfg.train.ema_warmup else None)
        mean_loss = torch.stack(losses).mean().to(info.device)
        if torch.distributed.is_initialized():
            torch.distributed.all_reduce(mean_loss)
        mean_loss = mean_loss.item() / info.world_size
        if parts and torch.distributed.is_initialized():  # loss parts as global means, like the loss itself
            vec = torch.tensor(list(parts.values()), dtype=torch.float64, device=info.device)
            torch.distributed.all_reduce(vec)
            parts = dict(zip(parts, (vec / info.world_size).tolist()))
        if keys_log is not None:
            keys_log.write(json.dumps({"step": step, "keys": step_keys}) + "\n")
            keys_log.flush()
        grad_norm = engine.get_global_grad_norm()
        metrics: dict[str, Any] = {"loss": mean_loss, "lr": engine.get_lr()[0], "samples_seen": state["samples_seen"],
                                   "epoch": loader.position.epoch, **parts}
        if grad_norm is not None:
            metrics["grad_norm"] = float(grad_norm)
        if step % cfg.train.log_every == 0 or step == cfg.train.max_steps:
            metrics.update(timer.summary(info.world_size, flops, peak))
            dropped = loader.dropped_counts()
            metrics.update({f"data/dropped_{k}": v for k, v in dropped.items()})
            dist.print0(
                f"step {step}/{cfg.train.max_steps} | loss {mean_loss:.4f} | lr {metrics['lr']:.2e}"
                + (f" | gnorm {metrics['grad_norm']:.3f}" if "grad_norm" in metrics else "")
                + f" | {metrics['images_per_s']:.1f} img/s | data wait {100 * metrics['data_wait_frac']:.0f}%"
                + (f" | MFU {100 * metrics['mfu']:.1f}%" if "mfu" in metrics else "")
            )
            timer.reset()
        monitor.log(metrics, step)
        if cfg.train.sample_every and step % cfg.train.sample_every == 0 and task.encoders is not None:
            sample_grid(cfg, task, engine, ema, monitor, out, step)
        if dist.any_rank(preemption.requested(), info.device):
            save()
            status = "preempted"
            monitor.event(f"PREEMPTED step={step} (signals: {preemption.received() or 'requested'})")
            break
        if step % cfg.train.ckpt_every == 0:
            save()
    if status == "finished":
        save()
        sampled_already = cfg.train.sample_every and step % cfg.train.sample_every == 0
        if task.encoders is not None and not sampled_already:
            sample_grid(cfg, task, engine, ema, monitor, out, step)
        if task.encoders is None:
            finish_autoencoder(cfg, task, engine, ema, loader, out, info.is_main)
        monitor.event(f"FINISHED step={step}")
    if keys_log is not None:
        keys_log.close()
    monitor.finish()
    dist.barrier()
    return TrainResult(status=status, step=step, out_dir=out)


def trained_weights(task: Task, engine: Any, ema: EMA | None) -> dict[str, torch.Tensor]:
    """Full fp32 weights of the trained network on rank 0 (EMA if kept). Collective under ZeRO-3."""
    prefix = "unet." if task.encoders is not None else "vae."
    if ema is not None:
        return {k[len(prefix):]: v for k, v in ema.state_dict().items() if k.startswith(prefix)}
    params = list(engine.module.parameters())
    with gathered(params):
        if dist.rank() != 0:
            return {}
        full = {n[len(prefix):]: p.detach().float().cpu().clone() for n, p in engine.module.named_parameters()
                if n.startswith(prefix)}
    # buffers are not partitioned and not trained; take them from the module as they are
    return {**{n[len(prefix):]: b for n, b in engine.module.named_buffers() if n.startswith(prefix)}, **full}


def sample_grid(cfg: Config, task: Task, engine: Any, ema: EMA | None, monitor: Monitor, out: Path, step: int) -> None:
    """Rank 0 draws the configured prompts with the EMA weights; the others wait (a short, timed job)."""
    from ldmscale.sample import generate, to_pil, write_samples

    weights = trained_weights(task, engine, ema)
    if dist.rank() == 0:
        t0 = time.perf_counter()
        from diffusers import UNet2DConditionModel

        unet = UNet2DConditionModel.from_config(task.trained.config).to(task.device)
        if cfg.style.enabled:  # grids during style training are text-only: the style path adds nothing
            from ldmscale.style.attention import add_style_path

            add_style_path(unet, task.encoders.text_dim, sdpa=cfg.model.attention == "sdpa")
        unet.load_state_dict(weights, strict=True)
        unet.eval()
        s = cfg.sample
        prompts = [p for p in s.prompts for _ in range(s.images_per_prompt)]
        images = generate(unet, task.encoders, dict(task.module.scheduler.config), prompts, seed=cfg.train.seed,
                          steps=s.num_steps, guidance_scale=s.guidance_scale, sampler=s.sampler)
        grid = write_samples(to_pil(images), prompts, out / "samples" / f"step_{step:08d}", s.images_per_prompt,
                             {"step": step})
        monitor.log_image("samples", grid, step, caption=f"step {step}")
        monitor.event(f"sample grid {grid} ({time.perf_counter() - t0:.1f}s)")
    dist.barrier()


def finish_autoencoder(cfg: Config, task: Task, engine: Any, ema: EMA | None, loader: ResumableLoader,
                       out: Path, is_main: bool) -> None:
    """Export the trained VAE as a diffusers folder with its measured latent scaling factor."""
    from ldmscale.autoencoder import measure_scaling_factor, save_vae

    weights = trained_weights(task, engine, ema)
    if is_main:
        vae = type(task.trained).from_config(task.trained.config)
        vae.load_state_dict(weights, strict=True)
        vae.eval()
        probe = ResumableLoader(cfg.data, None, seed=cfg.train.seed + 1, rank=0, world=1,
                                micro_batch=cfg.train.micro_batch_size, samples_per_epoch=count_samples(cfg.data))
        factor = measure_scaling_factor(vae, (normalize_pixels(next(probe)["pixels"]) for _ in range(10**9)),
                                        cfg.autoencoder.scaling_samples)
        save_vae(vae, weights, factor, out / "vae")
        print(f"autoencoder: exported {out / 'vae'} with scaling_factor={factor:.4f}", flush=True)
    dist.barrier()


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="ldmscale-train", description="Train a latent diffusion model or its autoencoder")
    p.add_argument("--config", help="YAML file (configs/*.yaml)")
    p.add_argument("--resume", default="auto", help="auto (latest if any) | never | a checkpoint folder")
    # the deepspeed launcher passes --local_rank; LOCAL_RANK in the environment says the same
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("overrides", nargs="*", help="section.key=value, e.g. train.max_steps=100")
    return p.parse_args(argv)


def cli(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        # before any process group: every rank prints it, nobody hangs
        print(f"ldmscale-train: config error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        main(cfg, args.resume)  # prints FINISHED step=N or PREEMPTED step=N
    except StorageError as e:  # raised by the first check in main(), before any process group
        print(f"ldmscale-train: data error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    dist.cleanup()


if __name__ == "__main__":
    cli()
