"""The checks that need the world: the number of ranks, the device, the model folders. They run before any process
group (from the environment's WORLD_SIZE) and again once the group is up."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from ldmscale.config.presets import UNET_PRESETS, VAE_PRESETS
from ldmscale.config.schema import Config, ConfigError
from ldmscale.runtime.cli import output_dir_problem


def _looks_local(ref: str) -> bool:
    return ref.startswith(("/", "./", "../", "~")) or os.path.sep in ref and ref.count("/") != 1


def check_model_ref(key: str, ref: str, need: str = "") -> None:
    """A local folder must exist (and hold `need`); a hub id needs a network the user has."""
    if not ref:
        return
    p = Path(os.path.expanduser(ref))
    if p.exists():
        if need and not (p / need).exists():
            raise ConfigError(f"{key}={ref!r}: the folder has no {need}; point it at a diffusers/transformers folder")
        return
    if _looks_local(ref):
        raise ConfigError(
            f"{key}={ref!r}: no such folder. Write one with tools/make_offline_models.py or give a hub id"
        )
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        raise ConfigError(f"{key}={ref!r} is not a local folder and HF_HUB_OFFLINE=1 forbids the hub")


def _local_config(ref: str, sub: str | None) -> dict[str, Any] | None:
    """A model folder's config.json when it is on disk (a hub id is only known once the model loads)."""
    for folder in ([Path(os.path.expanduser(ref)) / sub] if sub else []) + [Path(os.path.expanduser(ref))]:
        if ref and (folder / "config.json").is_file():
            return json.loads((folder / "config.json").read_text())
    return None


def pixel_multiple(cfg: Config) -> tuple[int, str] | None:
    """What every side of a training or sampling canvas must be a multiple of: the VAE's downsampling factor
    times the U-Net's, with the sum spelled out for messages; None when a model is not on disk yet."""
    m = cfg.model
    vae = _local_config(m.vae, None) if m.vae else _local_config(m.pretrained, "vae") if m.pretrained else None
    if vae is None and not m.vae and not m.pretrained and cfg.train.stage == "autoencoder":
        vae = VAE_PRESETS.get(m.vae_preset)
    if vae is None:
        return None
    vae_f = 2 ** (len(vae["block_out_channels"]) - 1)
    if cfg.train.stage == "autoencoder":
        return vae_f, f"the VAE's factor {vae_f}"
    unet = UNET_PRESETS.get(m.unet) or _local_config(m.unet, "unet")
    if unet is None:
        return None
    unet_f = 2 ** (len(unet["block_out_channels"]) - 1)
    return vae_f * unet_f, f"VAE factor {vae_f} x U-Net downsampling {unet_f}"


def check_bucket_step(cfg: Config) -> None:
    """data.buckets.step against the models (when their configs are on disk; the stage checks again once the
    models are loaded)."""
    if not cfg.data.buckets.enabled:
        return
    found = pixel_multiple(cfg)
    step = cfg.data.buckets.step
    if found is not None and step % found[0]:
        raise ConfigError(f"data.buckets.step={step} is not a multiple of {found[0]} ({found[1]}): every canvas "
                          f"side must be; give data.buckets.step={max(found[0], step // found[0] * found[0])}")


def world_size_from_env() -> int:
    for var in ("WORLD_SIZE", "SLURM_NTASKS"):
        if os.environ.get(var):
            return int(os.environ[var])
    return 1


def resolve_micro_batch(cfg: Config, world: int) -> None:
    """train.micro_batch_size=0: the largest divisor of global / ranks up to train.max_micro_batch_size, so one
    config runs at 8, 128 or 1,024 ranks. Set on the config (remembered as derived: validated again on another
    world, it is derived again)."""
    t = cfg.train
    if t.micro_batch_size and not getattr(t, "_micro_derived", False):
        return
    if t.global_batch_size % world:
        raise ConfigError(f"train.global_batch_size={t.global_batch_size} is not divisible by the {world} ranks: with "
                          f"train.micro_batch_size=0 every rank takes global / ranks samples a step; choose a global "
                          f"batch that is a multiple of {world}")
    per_rank = t.global_batch_size // world
    t.micro_batch_size = max(d for d in range(1, min(per_rank, t.max_micro_batch_size) + 1) if per_rank % d == 0)
    t._micro_derived = True  # type: ignore[attr-defined]


def validate(cfg: Config, world_size: int | None = None, device_type: str | None = None) -> None:
    """What needs the world: the number of ranks, the device, the model folders. Runs before any process
    group (from the environment's WORLD_SIZE) and again once the group is up."""
    cfg.check()
    if "://" not in cfg.train.out_dir:
        problem = output_dir_problem(cfg.train.out_dir)
        if problem:
            raise ConfigError(f"train.out_dir={cfg.train.out_dir}: {problem}; give a folder this job can write")
    world = world_size or world_size_from_env()
    t, m, ds = cfg.train, cfg.model, cfg.deepspeed
    if device_type is None:
        import torch

        device_type = "cuda" if torch.cuda.is_available() else "cpu"
    if ds.precision == "fp16" and device_type == "cpu":
        raise ConfigError("deepspeed.precision=fp16 is not supported on CPU; use bf16 or fp32")
    resolve_micro_batch(cfg, world)
    per_step = world * t.micro_batch_size
    if t.global_batch_size % per_step:
        raise ConfigError(
            f"train.global_batch_size={t.global_batch_size} is not divisible by ranks ({world}) x "
            f"train.micro_batch_size ({t.micro_batch_size}) = {per_step}; make it a multiple of {per_step}"
        )
    if m.unet not in UNET_PRESETS:
        if "/" not in m.unet and not Path(os.path.expanduser(m.unet)).exists():  # hub ids are org/name
            raise ConfigError(f"model.unet={m.unet!r} is no preset ({', '.join(UNET_PRESETS)}), folder or hub id "
                              f"(org/name)")
        check_model_ref("model.unet", m.unet, need="config.json")
    check_bucket_step(cfg)
    if t.eval_every and t.stage != "diffusion":
        raise ConfigError("train.eval_every (a diffusion validation loss) is for train.stage=diffusion; set it to 0")
    if t.eval_every and not cfg.data.val_shards:
        raise ConfigError("train.eval_every needs data.val_shards: held-out shards, e.g. data.val_shards='[DIR/val]'")
    if t.stage == "autoencoder":
        if not m.vae and m.vae_preset not in VAE_PRESETS:
            raise ConfigError(f"model.vae_preset={m.vae_preset!r} is not allowed; choose one of {list(VAE_PRESETS)}")
        check_model_ref("model.vae", m.vae, need="config.json")
        return
    if not (m.pretrained or (m.vae and m.text_encoder and m.tokenizer)):
        raise ConfigError(
            "the diffusion stage needs model.pretrained (a folder with vae/ text_encoder/ tokenizer/) "
            "or all of model.vae, model.text_encoder and model.tokenizer"
        )
    check_model_ref("model.pretrained", m.pretrained)
    check_model_ref("model.vae", m.vae, need="config.json")
    check_model_ref("model.text_encoder", m.text_encoder, need="config.json")
    check_model_ref("model.tokenizer", m.tokenizer)
    s = cfg.style
    if s.enabled and s.backbone == "clip":
        check_model_ref("style.vision_model", s.vision_model, need="config.json")
    if s.enabled and s.init_from and not Path(os.path.expanduser(s.init_from)).exists():
        raise ConfigError(f"style.init_from={s.init_from!r}: no such run dir or checkpoint folder")

