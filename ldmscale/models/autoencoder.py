"""The autoencoder stage: a KL-regularised AutoencoderKL (LDM paper, sec. 3) for data no pre-trained VAE fits.

Loss = L1 (and optionally L2) reconstruction + kl_weight * KL(q(z|x) || N(0, I)). After training the
latent scaling factor is measured on the data as 1 / std(z), so the diffusion stage sees unit-variance
latents, and stored in the exported VAE's config.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL

from ldmscale.config import AutoencoderConfig


class AutoencoderObjective(torch.nn.Module):
    def __init__(self, vae: AutoencoderKL, cfg: AutoencoderConfig) -> None:
        super().__init__()
        self.vae = vae
        self.cfg = cfg

    def forward(self, pixels: torch.Tensor, posterior_noise: torch.Tensor) -> tuple[torch.Tensor, dict]:
        dtype = next(self.vae.parameters()).dtype
        dist = self.vae.encode(pixels.to(dtype)).latent_dist
        z = dist.mean + dist.std * posterior_noise.to(dist.mean)
        recon = self.vae.decode(z).sample.float()
        l1 = F.l1_loss(recon, pixels)
        l2 = F.mse_loss(recon, pixels)
        kl = dist.kl().float().mean() / pixels[0].numel()  # per pixel, like the reconstruction terms
        loss = self.cfg.l1_weight * l1 + self.cfg.l2_weight * l2 + self.cfg.kl_weight * kl
        return loss, {"l1": l1.detach(), "l2": l2.detach(), "kl": kl.detach()}


@torch.no_grad()
def measure_scaling_factor(vae: AutoencoderKL, batches: Iterable[torch.Tensor], max_samples: int) -> float:
    """1 / std of posterior samples over up to `max_samples` images (Rombach et al.'s rescaling)."""
    total, s, s2 = 0, 0.0, 0.0
    for pixels in batches:
        z = vae.encode(pixels.to(vae.device, vae.dtype)).latent_dist.sample().double()
        s += z.sum().item()
        s2 += (z * z).sum().item()
        total += z.numel()
        if total >= max_samples * z[0].numel():
            break
    mean = s / total
    std = (s2 / total - mean * mean) ** 0.5
    return float(1.0 / std)


def save_vae(vae: AutoencoderKL, state: dict[str, torch.Tensor], scaling_factor: float, out: Path) -> None:
    vae.load_state_dict(state, strict=True)
    vae.register_to_config(scaling_factor=scaling_factor)
    vae.save_pretrained(out, safe_serialization=True)
