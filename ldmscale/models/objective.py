"""The module DeepSpeed wraps: it owns the U-Net and the noise schedule, and forward returns the loss.

Everything random arrives as arguments (drawn per sample in noise.py), so this module is a pure
function of its inputs and weights: the property exact resume rests on.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, UNet2DConditionModel
from diffusers.training_utils import compute_snr

from ldmscale.config import ModelConfig
from ldmscale.models.size_conditioning import added_cond_kwargs
from ldmscale.style.encoder import kl_to_standard_normal


def build_noise_scheduler(cfg: ModelConfig) -> DDPMScheduler:
    """The training schedule. Its config is what sampling, evaluation and export build their schedulers from
    (inference.samplers), so model.zero_terminal_snr travels with it: the rescaled betas, and "trailing" timestep
    spacing, which starts sampling at the last (pure-noise) timestep as Lin et al. 2024 prescribe."""
    zero_snr = {"rescale_betas_zero_snr": True, "timestep_spacing": "trailing"} if cfg.zero_terminal_snr else {}
    return DDPMScheduler(
        num_train_timesteps=cfg.num_train_timesteps,
        beta_schedule=cfg.beta_schedule,
        beta_start=0.00085,
        beta_end=0.012,
        prediction_type=cfg.prediction_type,
        clip_sample=False,
        **zero_snr,
    )


class LatentDiffusion(torch.nn.Module):
    def __init__(self, unet: UNet2DConditionModel, scheduler: DDPMScheduler, snr_gamma: float = 0.0,
                 style: torch.nn.Module | None = None) -> None:
        super().__init__()
        self.unet = unet
        if style is not None:  # parameters named "style.*": checkpoints and EMA tell the encoder from the U-Net
            self.style = style
        self.scheduler = scheduler
        self.snr_gamma = snr_gamma
        # model.channels_last: NHWC activations let cuDNN pick NHWC kernels. The conv weights are made NHWC under
        # ZeRO-0 only, after deepspeed.initialize (trainer/stages.py): DeepSpeed's first broadcast and ZeRO 1-3's
        # flat buffers need standard strides ("stride(-1) must be 1").
        self.channels_last = False

    def target(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        if self.scheduler.config.prediction_type == "v_prediction":
            return self.scheduler.get_velocity(latents, noise, timesteps)
        return noise

    def loss_weights(self, timesteps: torch.Tensor) -> torch.Tensor | None:
        """Min-SNR-gamma (Hang et al. 2023): w = min(SNR, gamma) / SNR for eps, / (SNR + 1) for v."""
        if self.snr_gamma <= 0:
            return None
        snr = compute_snr(self.scheduler, timesteps)
        clipped = torch.clamp(snr, max=self.snr_gamma)
        if self.scheduler.config.prediction_type == "v_prediction":
            return clipped / (snr + 1)
        return clipped / snr

    def forward(
        self,
        latents: torch.Tensor,
        context: torch.Tensor,
        noise: torch.Tensor,
        timesteps: torch.Tensor,
        style_input: torch.Tensor | None = None,
        style_noise: torch.Tensor | None = None,
        style_keep: torch.Tensor | None = None,
        beta: float = 0.0,
        size_cond: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """latents [B,C,h,w] (scaled), context [B,L,D] cross-attention tokens, noise like latents,
        timesteps [B] int64 -> (loss, parts). With a style encoder: style_input (reference pixels or frozen
        backbone features), style_noise [B,K,D] for the reparameterisation, style_keep [B] (0 = style dropped:
        all-zero tokens) and the KL weight beta. With size conditioning: size_cond [B, 6] (original h, w, crop
        top, left, target h, w; models/size_conditioning.py)."""
        dtype = next(self.unet.parameters()).dtype
        noisy = self.scheduler.add_noise(latents, noise, timesteps)
        kwargs: dict = {}
        parts: dict[str, torch.Tensor] = {}
        if size_cond is not None:
            kwargs["added_cond_kwargs"] = added_cond_kwargs(size_cond)
        kl = None
        if style_input is not None:
            assert style_noise is not None and style_keep is not None  # a style batch carries all three
            mu, logvar = self.style(style_input.to(dtype))
            mu, logvar = mu.float(), logvar.float()
            keep = style_keep.to(mu).view(-1, 1, 1)
            tokens = (mu + (0.5 * logvar).exp() * style_noise.to(mu)) * keep
            kwargs["cross_attention_kwargs"] = {"style_tokens": tokens.to(dtype)}
            # dropped references have no denoising signal; a KL on them would only pull toward the prior
            kl = (kl_to_standard_normal(mu, logvar) * keep.flatten()).sum() / keep.sum().clamp(min=1.0)
            parts["kl"] = kl.detach()
        x = noisy.to(dtype)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        pred = self.unet(x, timesteps, encoder_hidden_states=context.to(dtype), **kwargs).sample.float()
        per_sample = F.mse_loss(pred, self.target(latents, noise, timesteps), reduction="none").mean(dim=(1, 2, 3))
        weights = self.loss_weights(timesteps)
        mse = per_sample.mean()
        loss = (per_sample * weights).mean() if weights is not None else mse
        if kl is not None:
            parts["denoise"] = loss.detach()
            parts["beta"] = torch.tensor(float(beta))
            loss = loss + beta * kl
        return loss, {"mse": mse.detach(), **parts}
