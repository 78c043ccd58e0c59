"""The training loop, readable top to bottom in labelled paragraphs (the command line is trainer/cli.py).

data check -> setup (process group, stage, DeepSpeed engine, EMA, data, checkpointer/resume) -> loop of
[micro-batches -> backward -> step -> EMA -> one reduction + log -> preemption -> sample grid / checkpoint]
-> final save and the stage's finish (sample grid or VAE export).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import IO

import torch

from ldmscale.checkpoint import CheckpointError, resolve_resume
from ldmscale.checkpoint.checkpointer import Checkpointer, TrainState
from ldmscale.checkpoint.elastic import prepare_elastic
from ldmscale.checkpoint.store import ResumeError, read_rank_state, read_trainer_state
from ldmscale.config import Config, dump_config, validate, world_size_from_env
from ldmscale.data import ResumableLoader, shared_plan
from ldmscale.data.position import check_saved_shards
from ldmscale.data.shardlist import is_local
from ldmscale.data.sources import MixSource, check_splits, listed_without_store
from ldmscale.eval.validation import build_validator, shared_validation_samples
from ldmscale.latents.manifest import check_shard_format, shared_source_manifests
from ldmscale.runtime import dist, preemption
from ldmscale.trainer.ds_config import accumulation_steps, build_ds_config, precision_dtype
from ldmscale.trainer.ema import EMA, warmup_decay
from ldmscale.trainer.engine import build_engine, optimizer_groups
from ldmscale.trainer.monitor import Monitor, StepStats, StepTimer, peak_tflops, rank_keys_file
from ldmscale.trainer.stages import build_stage


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
    for source in cfg.data.sources:
        source.shards = [str(Path(s).resolve()) if Path(s).exists() else s for s in source.shards]
    cfg.data.val_shards = [str(Path(s).resolve()) if Path(s).exists() else s for s in cfg.data.val_shards]
    for key in ("vision_model", "init_from"):
        ref = getattr(cfg.style, key)
        if ref and Path(ref).exists():
            setattr(cfg.style, key, str(Path(ref).resolve()))


def check_data_early(cfg: Config, world: int) -> bool:
    """Before any process group and without asking the store, for every source: a local source that names no shard,
    too few shards for ranks x workers (when the shard list is local or a brace pattern), and, for local shards,
    latent shards made for another config. Returns whether every source's format was checked (else rank 0 reads
    their manifests once the group is up)."""
    listed = listed_without_store(cfg.data)
    if all(urls is not None for _, _, urls in listed):
        check_splits([(name, len(urls or [])) for name, _, urls in listed], world, cfg.data.num_workers)
    checked = True
    for _, view, urls in listed:
        if urls is None:
            checked = False
            continue
        if not all(is_local(u) for u in urls):  # an object store: one read by rank 0, not one per rank
            checked = False
            continue
        check_shard_format(replace(cfg, data=view), urls)  # latent shards: their manifest must match this config
    return checked


def saved_shard_check(cfg: Config, tag_dir: Path | None) -> Callable[[list[MixSource]], str | None] | None:
    """For the data plan (rank 0): the sources now against those the checkpoint's data position indexes."""
    if tag_dir is None:
        return None

    def check(sources: list[MixSource]) -> str | None:
        saved = read_rank_state(tag_dir, 0, int(read_trainer_state(tag_dir).get("world_size", 1)))
        return check_saved_shards(saved["data"], [s.identity() for s in sources], cfg.data.on_shard_list_change,
                                  [s.urls for s in sources])

    return check


def main(cfg: Config, resume: str = "auto") -> TrainResult:
    # Check what needs neither a process group nor the store: the resume folder, the shard split
    out = Path(cfg.train.out_dir)
    try:
        tag_dir = resolve_resume(out / "checkpoints", resume)
    except CheckpointError as e:
        raise ResumeError(str(e)) from None
    format_checked = check_data_early(cfg, world_size_from_env())

    # Setup: process group, the checks that need the world size and device, the run folder
    info = dist.init_distributed()
    validate(cfg, world_size=info.world_size, device_type=info.device.type)
    absolutize_model_paths(cfg)
    config_yaml = dump_config(cfg)
    if info.is_main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.yaml").write_text(config_yaml)

    # Plan the data once: rank 0 lists, checks and sizes it (with retries), every rank gets the plan or its error.
    # A resume over another shard list than the checkpoint's is refused here, before any model is built. The latent
    # manifest and the validation samples are read the same way: by rank 0, shared.
    plan = shared_plan(cfg.data, on_urls=saved_shard_check(cfg, tag_dir))
    sources = plan.mix_sources(cfg.data)
    shared = check_splits([(s.name, len(s.urls)) for s in sources], info.world_size, cfg.data.num_workers)
    manifest = None
    if cfg.data.format == "latents" or not format_checked:
        manifest = shared_source_manifests(cfg, sources)
    val_samples = shared_validation_samples(cfg) if cfg.train.eval_every else []
    dist.print0(plan.summary())
    for line in filter(None, [plan.note, *shared]):
        dist.print0(line)

    # Create the stage (frozen encoders outside the engine, the module DeepSpeed trains), the engine and the EMA
    torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank
    torch.backends.cudnn.benchmark = cfg.train.cudnn_benchmark  # fixed shapes: the fastest kernels, found once
    stage = build_stage(cfg, info.device, precision_dtype(cfg.deepspeed), fresh=tag_dir is None, manifest=manifest)
    trainable = [(n, p) for n, p in stage.module.named_parameters() if p.requires_grad]
    # another world size: DeepSpeed's universal checkpoint, converted once by rank 0 beside the original
    universal, elastic_note = prepare_elastic(tag_dir, info.world_size, cfg.deepspeed.zero_stage)
    ds_config = build_ds_config(cfg.deepspeed, cfg.optim, cfg.train, info.world_size)
    if universal:
        ds_config["checkpoint"] = {**ds_config.get("checkpoint", {}), "load_universal": True}
    engine = build_engine(stage.module, optimizer_groups(trainable, cfg), ds_config)
    # each rank averages its own share of the optimizer's fp32 masters: no communication per step
    ema = EMA(trainable, cfg.train.ema_decay, engine.optimizer) if cfg.train.ema_decay > 0 else None

    # Setup data: every rank its own shards; every worker the same number of batches per epoch
    loader = ResumableLoader(
        cfg.data, stage.tokenizer, seed=cfg.train.seed, rank=info.rank, world=info.world_size,
        micro_batch=cfg.train.micro_batch_size, samples_per_epoch=plan.samples_per_epoch,
        global_batch=cfg.train.global_batch_size, sources=sources, style=cfg.style,
    )

    # Setup validation (train.eval_every): fixed held-out samples read once, each rank its share
    validator = (build_validator(cfg, stage, info.rank, info.world_size, info.device, val_samples)
                 if cfg.train.eval_every else None)

    # Resume: the checkpointer holds everything a checkpoint restores (engine, EMA, data position, counters)
    state = TrainState()
    ckpt = Checkpointer(out / "checkpoints", keep_last=cfg.train.keep_last, every=cfg.train.ckpt_every,
                        engine=engine, ema=ema, loader=loader, train_state=state, config_yaml=config_yaml,
                        world_size=info.world_size)
    monitor = Monitor(cfg, out, info.is_main)
    monitor.record("data_plan", plan.describe())  # per source: shards, samples, pass rate, weight, passes an epoch
    if tag_dir is not None:
        note = "; ".join(filter(None, [elastic_note, ckpt.restore(tag_dir, universal=universal)]))
        monitor.event(f"resumed from {tag_dir} at step {state.step}")
        monitor.event(note)  # rank 0's; every other rank prints its own data resume too
        if not info.is_main:
            print(note, flush=True)
    elif stage.init_note:
        monitor.event(f"style step 2: U-Net initialised from {stage.init_note}")
    gas = accumulation_steps(cfg.train, info.world_size)
    keys_log = open_keys_log(out, info.rank) if cfg.train.log_sample_keys else None
    dist.print0(
        f"ldmscale: stage={cfg.train.stage} ranks={info.world_size} device={info.device.type} "
        f"params={sum(p.numel() for _, p in trainable) / 1e6:.2f}M zero={cfg.deepspeed.zero_stage} "
        f"precision={cfg.deepspeed.precision} global_batch={cfg.train.global_batch_size} "
        f"micro={cfg.train.micro_batch_size} accum={gas} batches/epoch/rank={loader.batches_per_epoch} "
        f"start_step={state.step} max_steps={cfg.train.max_steps}"
    )
    preemption.install()
    timer, flops, peak = StepTimer(), stage.flops_per_sample(), peak_tflops(cfg.train.peak_tflops)
    if flops:  # MFU counts the U-Net; encoding latents on the fly costs extra, shown apart
        dist.print0(f"FLOPs per image: U-Net fwd+bwd {flops / 1e9:.3f} G, VAE encode "
                    f"{stage.encode_flops_per_sample() / 1e9:.3f} G")
    stage.compile()  # model.compile, last: FLOPs were counted on an eager twin

    # Training loop
    status = "finished"
    while state.step < cfg.train.max_steps:
        # single training step: gas micro-batches, each its own backward; DeepSpeed steps at the boundary
        stats, step_keys = StepStats(), []
        for micro in range(gas):
            with timer.measure_wait():
                batch = next(loader)
            # global sample index: the same sample gets the same noise whatever the world size or accumulation
            slot = (micro * info.world_size + info.rank) * cfg.train.micro_batch_size
            first = state.step * cfg.train.global_batch_size + slot
            loss, parts = stage.loss(engine, batch, range(first, first + len(batch["keys"])), state.step)
            engine.backward(loss)
            engine.step()
            stats.add(loss, parts)
            step_keys += batch["keys"]
        state.step += 1
        state.samples_seen += cfg.train.global_batch_size
        timer.samples += cfg.train.global_batch_size
        if ema is not None and state.step > cfg.train.ema_start_step:
            n = state.step - cfg.train.ema_start_step - 1  # a function of the step: resumes exactly
            ema.update(warmup_decay(cfg.train.ema_decay, n) if cfg.train.ema_warmup else None)

        # logging: one reduction per step, which also tells every rank whether any was asked to stop
        if keys_log is not None:
            keys_log.write(json.dumps({"step": state.step, "keys": step_keys}) + "\n")
            keys_log.flush()
        stop = monitor.log_step(
            state.step, stats, stop_requested=preemption.requested(), engine=engine, loader=loader, timer=timer,
            samples_seen=state.samples_seen, max_steps=cfg.train.max_steps, log_every=cfg.train.log_every,
            world=info.world_size, flops_per_sample=flops, peak=peak,
        )

        # preemption: all ranks save the same step together, then stop (the launcher requeues)
        if stop:
            ckpt.maybe_save(state.step, force=True)
            status = "preempted"
            monitor.event(f"PREEMPTED step={state.step} (signals: {preemption.received() or 'requested'})")
            break

        # once in a while: validation loss, sample grid, checkpoint
        if validator is not None and (state.step % cfg.train.eval_every == 0 or state.step == cfg.train.max_steps):
            monitor.log(validator.run(engine.module), state.step)
        stage.periodic(engine, ema, monitor, out, state.step)
        if ckpt.maybe_save(state.step):
            monitor.event(f"saved checkpoint step {state.step}")

    # The end: last checkpoint, then the stage's own finish (sample grid / VAE export)
    if status == "finished":
        if ckpt.maybe_save(state.step, force=True):
            monitor.event(f"saved checkpoint step {state.step}")
        stage.finish(engine, ema, monitor, out, state.step, loader)
        monitor.event(f"FINISHED step={state.step}")
    if keys_log is not None:
        keys_log.close()
    monitor.finish()
    dist.barrier()
    return TrainResult(status=status, step=state.step, out_dir=out)


def open_keys_log(out: Path, rank: int) -> IO[str]:
    """Each rank's sample keys per step (train.log_sample_keys): what resume audits compare."""
    path = rank_keys_file(out, rank)
    path.parent.mkdir(parents=True, exist_ok=True)
    return open(path, "a")
