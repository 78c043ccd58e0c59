"""Weights out of a checkpoint for inference and warm starts: the EMA file, the raw weights consolidated from any
ZeRO stage by DeepSpeed's own utility, and the whole trained model (U-Net, frozen encoders, scheduler, style
path) that sampling, evaluation and export start from."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers import DDPMScheduler, UNet2DConditionModel
from safetensors import SafetensorError
from safetensors.torch import load_file

from ldmscale.checkpoint.resume import find_tag_dir
from ldmscale.checkpoint.store import CheckpointError
from ldmscale.config import Config, ModelConfig, config_from_yaml_text
from ldmscale.models.encoders import FrozenEncoders
from ldmscale.models.networks import build_unet, strip_prefix, vae_downsample_factor
from ldmscale.models.objective import build_noise_scheduler
from ldmscale.models.size_conditioning import apply_size_config
from ldmscale.runtime.precision import torch_dtype
from ldmscale.style.encoder import StyleReference, build_style
from ldmscale.style.install import install_style_path


def load_ema(tag_dir: Path) -> dict[str, torch.Tensor]:
    f = tag_dir / "ema.safetensors"
    if not f.exists():
        raise CheckpointError(f"{tag_dir} holds no EMA weights (train.ema_decay was 0); use raw weights")
    try:
        return load_file(str(f))
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{f} cannot be read ({e}): the checkpoint is damaged; use an earlier step") from None


def raw_state_dict(tag_dir: Path) -> dict[str, torch.Tensor]:
    """fp32 weights of the trained module, consolidated from ZeRO shards by DeepSpeed's own utility."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    if not any(tag_dir.glob("*model_states.pt")):
        raise CheckpointError(f"{tag_dir} holds EMA weights only (a post-hoc EMA written by ldmscale-ema): use "
                              f"--weights ema")
    try:
        if any(tag_dir.glob("*optim_states.pt")):
            return get_fp32_state_dict_from_zero_checkpoint(str(tag_dir.parent), tag=tag_dir.name)
        # ZeRO stage 0 without a ZeRO optimizer: the whole module sits in the model-states file
        states = torch.load(tag_dir / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=True)
    except (RuntimeError, OSError, EOFError, ValueError) as e:  # a shard cut short: torch's zip reader fails
        raise CheckpointError(f"{tag_dir}: DeepSpeed's files cannot be read ({str(e)[:200]}); use an earlier "
                              f"step") from None
    return {k: v.float() for k, v in states["module"].items()}


def inference_dtype(choice: str, path: str | Path, device: str | torch.device) -> torch.dtype:
    """--dtype of ldmscale-sample and -eval. auto: on a GPU the precision the checkpoint was trained in (its
    deepspeed.precision; bf16 for an exported pipeline folder), half the memory and the tensor cores of fp32;
    on the CPU fp32."""
    if choice != "auto":
        return torch_dtype(choice)
    if torch.device(device).type != "cuda":
        return torch.float32
    path = Path(path)
    if (path / "model_index.json").exists():
        return torch.bfloat16
    cfg = config_from_yaml_text((find_tag_dir(path, verify=False) / "config.yaml").read_text())
    return torch_dtype(cfg.deepspeed.precision)


def saved_config(path: str | Path) -> Config:
    """The config a checkpoint was trained with (a run dir, its checkpoints/ or a step_* folder)."""
    return config_from_yaml_text((find_tag_dir(Path(path)) / "config.yaml").read_text())


@dataclass
class TrainedModel:
    cfg: Config | None
    unet: UNet2DConditionModel
    encoders: FrozenEncoders
    scheduler_config: dict[str, Any]
    style: Any = None  # ldmscale.style.encoder.StyleReference for style checkpoints


def load_trained(path: str | Path, weights: str = "ema", device: str | torch.device = "cpu",
                 dtype: torch.dtype = torch.float32) -> TrainedModel:
    """From a checkpoint (EMA by default, or raw) or an exported diffusers folder."""
    path = Path(path)
    device = torch.device(device)
    if (path / "model_index.json").exists():
        unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet")
        mcfg = ModelConfig(pretrained=str(path))
        enc = FrozenEncoders.load(mcfg, device, dtype)
        sched = DDPMScheduler.from_pretrained(path, subfolder="scheduler").config
        return TrainedModel(None, unet.to(device, dtype).eval(), enc, dict(sched))
    tag_dir = find_tag_dir(path)
    cfg = saved_config(tag_dir)
    if cfg.train.stage != "diffusion":
        raise CheckpointError(
            f"{tag_dir} is an autoencoder-stage checkpoint; its VAE is exported as {cfg.train.out_dir}/vae"
        )
    enc = FrozenEncoders.load(cfg.model, device, dtype)
    f = vae_downsample_factor(enc.vae.config)
    unet = build_unet(cfg.model.unet, enc.latent_channels, enc.text_dim, cfg.data.resolution // f)
    unet = apply_size_config(unet, cfg.model.size_conditioning, cfg.model.size_embed_dim)
    state = load_ema(tag_dir) if weights == "ema" else raw_state_dict(tag_dir)
    style = None
    if cfg.style.enabled:  # the style path and encoder as trained: "unet.*processor.to_*_style.*", "style.*"
        install_style_path(unet, cfg.style, enc.text_dim, sdpa=cfg.model.attention == "sdpa")
        encoder, frozen = build_style(cfg.style, enc.text_dim, device, dtype)
        encoder.load_state_dict(strip_prefix(state, "style."), strict=True)
        style = StyleReference(encoder.to(device, dtype), frozen)
    unet.load_state_dict(strip_prefix(state, "unet."), strict=True)
    sched = dict(build_noise_scheduler(cfg.model).config)
    return TrainedModel(cfg, unet.to(device, dtype).eval(), enc, sched, style)


