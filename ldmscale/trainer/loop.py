"""The training loop, readable top to bottom in labelled paragraphs (the command line is trainer/cli.py).

preemption handler -> resume and data checks -> setup (process group, stage, DeepSpeed engine, EMA, data,
checkpointer/resume) -> loop of [micro-batches -> backward -> step -> EMA (+ post-hoc EMA snapshots) -> one
reduction + log -> preemption -> sample grid / checkpoint] -> final save and the stage's finish (sample grid or VAE
export). A preemption notice before the first step exits for requeue without saving; rank 0 keeps the run's state
for the job script (ldmscale/runtime/status.py).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import IO

import torch

from ldmscale.checkpoint.checkpointer import Checkpointer, TrainState
from ldmscale.checkpoint.elastic import prepare_elastic, saved_world_size
from ldmscale.checkpoint.resume import check_same_model, resolve_resume, select_intact
from ldmscale.checkpoint.store import read_rank_state, read_trainer_state, step_of
from ldmscale.config import Config, dump_config, validate
from ldmscale.data import ResumableLoader, shared_plan
from ldmscale.data.position import check_saved_shards
from ldmscale.data.shardlist import is_local
from ldmscale.data.sources import MixSource, check_splits, listed_without_store
from ldmscale.eval.validation import build_validator, shared_validation_samples
from ldmscale.latents.manifest import check_shard_format, shared_source_manifests
from ldmscale.runtime import dist, preemption
from ldmscale.runtime.atomic import atomic_write_text
from ldmscale.runtime.status import RunStatus
from ldmscale.trainer.ds_config import accumulation_steps, build_ds_config, precision_dtype
from ldmscale.trainer.ema import EMA, warmup_decay
from ldmscale.trainer.engine import build_engine, optimizer_groups
from ldmscale.trainer.extensions import prepare_ops
from ldmscale.trainer.monitor import Monitor, StepStats, StepTimer, peak_tflops, rank_keys_file
from ldmscale.trainer.posthoc_ema import PostHocEMA, check_resumable
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


def choose_checkpoint(tag_dir: Path | None, auto: bool, cfg: Config) -> tuple[Path | None, list[str], int]:
    """Rank 0, once: the resolved checkpoint if intact (else, under --resume auto, the newest intact one before
    it), checked against this config's model. (folder, warnings, the world size that saved it)."""
    tag_dir, notes = select_intact(tag_dir, auto)
    if tag_dir is None:
        return None, notes, 0
    check_same_model(tag_dir, cfg)
    check_resumable(tag_dir, cfg.train.posthoc_ema.sigma_rels)  # an older fallback must hold the profiles too
    return tag_dir, notes, saved_world_size(tag_dir)


def stop_before_training(status: RunStatus, step: int, out: Path, monitor: Monitor | None = None) -> TrainResult:
    """A preemption notice arrived before the first step: exit for requeue, saving nothing new (the checkpoint
    this job started from is still the newest)."""
    line = f"PREEMPTED step={step} before the first step (signals: {preemption.received() or 'requested'}): " \
           f"nothing new saved"
    if monitor is not None:
        monitor.event(line)
        monitor.finish()
    else:
        dist.print0(line)
    status.write("preempted", step)
    return TrainResult(status="preempted", step=step, out_dir=out)


def main(cfg: Config, resume: str = "auto") -> TrainResult:
    preemption.install()  # before any work: a notice during start-up sets the flag instead of killing the rank
    rank, world, _ = dist.world_info_from_env()
    out = Path(cfg.train.out_dir)
    status = RunStatus.from_env(out / "checkpoints", is_main=rank == 0)

    # Check what needs neither a process group nor the store: the resume folder and its model, the shard split.
    # The run's config.yaml is written only once the resume is accepted.
    absolutize_model_paths(cfg)
    tag_dir, notes = resolve_resume(out / "checkpoints", resume)
    if tag_dir is not None:
        check_same_model(tag_dir, cfg)
    check_resumable(tag_dir, cfg.train.posthoc_ema.sigma_rels)
    format_checked = check_data_early(cfg, world)
    status.resumed_from = tag_dir.name if tag_dir is not None else ""
    status.write("running")

    # Setup: process group, the checks that need the world size and device
    info = dist.init_distributed()
    validate(cfg, world_size=info.world_size, device_type=info.device.type)
    start_step = step_of(tag_dir.name) if tag_dir is not None else 0
    if dist.any_rank(preemption.requested()):
        return stop_before_training(status, start_step, out)
    # rank 0 checks the checkpoint's files against its manifest (a damaged one under auto gives way to an older one)
    tag_dir, more, saved_world = dist.on_rank0(lambda: choose_checkpoint(tag_dir, resume == "auto", cfg))
    resume_warnings = notes + more  # logged once the monitor exists
    status.resumed_from = tag_dir.name if tag_dir is not None else ""
    config_yaml = dump_config(cfg)

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
    universal, elastic_note = prepare_elastic(tag_dir, info.world_size, cfg.deepspeed.zero_stage, saved_world)
    ds_config = build_ds_config(cfg.deepspeed, cfg.optim, cfg.train, info.world_size)
    if universal:
        ds_config["checkpoint"] = {**ds_config.get("checkpoint", {}), "load_universal": True}
    for op in prepare_ops(ds_config):  # JIT-built ops, one process at a time; a killed build's lock is cleared
        dist.print0(f"removed the stale build lock of DeepSpeed's {op} op (a build was killed mid-way)")
    engine = build_engine(stage.module, optimizer_groups(trainable, cfg), ds_config)
    stage.channels_last_weights()  # model.channels_last under ZeRO-0: the conv weights too
    # each rank averages its own share of the optimizer's fp32 masters: no communication per step
    ema = EMA(trainable, cfg.train.ema_decay, engine.optimizer) if cfg.train.ema_decay > 0 else None
    ph = cfg.train.posthoc_ema  # EDM2's power-function EMAs, snapshotted for ldmscale-ema
    posthoc = PostHocEMA(trainable, ph.sigma_rels, ph.every, out, engine.optimizer) if ph.sigma_rels else None

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
    ckpt = Checkpointer(out / "checkpoints", {"engine": engine, "ema": ema, "data": loader, "train": state,
                                              "posthoc_ema": posthoc},
                        keep_last=cfg.train.keep_last, every=cfg.train.ckpt_every, config_yaml=config_yaml,
                        world_size=info.world_size)
    monitor = Monitor(cfg, out, info.is_main)
    monitor.record("data_plan", plan.describe())  # per source: shards, samples, pass rate, weight, passes an epoch
    for line in resume_warnings:
        monitor.event(line)
    if tag_dir is not None:
        note = "; ".join(filter(None, [elastic_note, ckpt.restore(tag_dir, universal=universal)]))
        monitor.event(f"resumed from {tag_dir} at step {state.step}")
        monitor.event(note)  # rank 0's; every other rank prints its own data resume too
        if not info.is_main:
            print(note, flush=True)
    elif stage.init_note:
        monitor.event(f"style step 2: U-Net initialised from {stage.init_note}")
    if info.is_main:  # the resume is accepted: this config is now the run's
        atomic_write_text(out / "config.yaml", config_yaml)
    gas = accumulation_steps(cfg.train, info.world_size)
    keys_log = open_keys_log(out, info.rank) if cfg.train.log_sample_keys else None
    dist.print0(
        f"ldmscale: stage={cfg.train.stage} ranks={info.world_size} device={info.device.type} "
        f"params={sum(p.numel() for _, p in trainable) / 1e6:.2f}M zero={cfg.deepspeed.zero_stage} "
        f"precision={cfg.deepspeed.precision} global_batch={cfg.train.global_batch_size} "
        f"micro={cfg.train.micro_batch_size} accum={gas} batches/epoch/rank={loader.batches_per_epoch} "
        f"start_step={state.step} max_steps={cfg.train.max_steps}"
    )
    timer, flops, peak = StepTimer(), stage.flops_per_sample(), peak_tflops(cfg.train.peak_tflops)
    if flops:  # MFU counts the U-Net; encoding latents on the fly costs extra, shown apart
        dist.print0(f"FLOPs per image: U-Net fwd+bwd {flops / 1e9:.3f} G, VAE encode "
                    f"{stage.encode_flops_per_sample() / 1e9:.3f} G")
    stage.compile(engine)  # model.compile, last: FLOPs were counted on an eager twin
    if dist.any_rank(preemption.requested()):  # a notice during start-up: nothing trained, nothing to save
        return stop_before_training(status, state.step, out, monitor)

    # Training loop
    outcome = "finished"
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
        if posthoc is not None:  # snapshots before the preemption check: a stop at a snapshot step still writes it
            posthoc.update(state.step)
            posthoc.maybe_snapshot(state.step, last=state.step == cfg.train.max_steps)

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
            outcome = "preempted"
            monitor.event(f"PREEMPTED step={state.step} (signals: {preemption.received() or 'requested'})")
            break

        # once in a while: validation loss, sample grid, checkpoint
        if validator is not None and (state.step % cfg.train.eval_every == 0 or state.step == cfg.train.max_steps):
            monitor.log(validator.run(engine.module), state.step)
        stage.periodic(engine, ema, monitor, out, state.step)
        if ckpt.maybe_save(state.step):
            monitor.event(f"saved checkpoint step {state.step}")

    # The end: last checkpoint, then the stage's own finish (sample grid / VAE export)
    if outcome == "finished":
        if ckpt.maybe_save(state.step, force=True):
            monitor.event(f"saved checkpoint step {state.step}")
        stage.finish(engine, ema, monitor, out, state.step, loader)
        monitor.event(f"FINISHED step={state.step}")
    if keys_log is not None:
        keys_log.close()
    monitor.finish()
    dist.barrier()
    status.write(outcome, state.step)
    return TrainResult(status=outcome, step=state.step, out_dir=out)


def open_keys_log(out: Path, rank: int) -> IO[str]:
    """Each rank's sample keys per step (train.log_sample_keys): what resume audits compare."""
    path = rank_keys_file(out, rank)
    path.parent.mkdir(parents=True, exist_ok=True)
    return open(path, "a")
