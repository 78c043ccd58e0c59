"""Frozen encoders that run outside the DeepSpeed engine: the VAE (pixels -> latents) and the text encoder.

They never receive gradients, so wrapping them in ZeRO would only add communication; each rank holds
its own copy in the step's dtype and calls them under no_grad.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch
from diffusers import AutoencoderKL
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from transformers import CLIPTextModel, CLIPTokenizer

from ldmscale.config import ModelConfig
from ldmscale.data.tokens import tokenize


def _part(cfg: ModelConfig, name: str) -> tuple[str, str | None]:
    """(reference, subfolder) for one part: an explicit path wins over <pretrained>/<name>."""
    explicit = getattr(cfg, name)
    if explicit:
        return explicit, None
    return cfg.pretrained, name


def load_tokenizer(cfg: ModelConfig) -> CLIPTokenizer:
    ref, sub = _part(cfg, "tokenizer")
    return CLIPTokenizer.from_pretrained(ref, subfolder=sub) if sub else CLIPTokenizer.from_pretrained(ref)


def load_vae(cfg: ModelConfig) -> AutoencoderKL:
    ref, sub = _part(cfg, "vae")
    return AutoencoderKL.from_pretrained(ref, subfolder=sub) if sub else AutoencoderKL.from_pretrained(ref)


def load_text_encoder(cfg: ModelConfig) -> CLIPTextModel:
    ref, sub = _part(cfg, "text_encoder")
    kw = {"subfolder": sub} if sub else {}
    return CLIPTextModel.from_pretrained(ref, **kw)


def weights_hash(module: torch.nn.Module, prefixes: tuple[str, ...] = ("",)) -> str:
    """sha256 over the named tensors whose names start with one of `prefixes`, as loaded (before any cast):
    what a latent set's manifest records, so training can tell whether its encoder made those latents."""
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        if name.startswith(prefixes):
            h.update(name.encode())
            h.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


VAE_ENCODER_PARTS = ("encoder.", "quant_conv.")  # what maps pixels to the posterior; the decoder is not needed


@dataclass
class FrozenEncoders:
    vae: AutoencoderKL
    text_encoder: CLIPTextModel
    tokenizer: CLIPTokenizer
    dtype: torch.dtype
    vae_encoder_hash: str = ""  # set when loaded for latent shards (vae_encoder=False)
    text_encoder_hash: str = ""

    @classmethod
    def load(cls, cfg: ModelConfig, device: torch.device, dtype: torch.dtype,
             vae_encoder: bool = True) -> FrozenEncoders:
        """vae_encoder=False (training from latent shards): the VAE's encoder is hashed, then dropped; the decoder
        stays for sample grids."""
        vae, te = load_vae(cfg), load_text_encoder(cfg)
        hashes = {}
        if not vae_encoder:
            hashes = {"vae_encoder_hash": weights_hash(vae, VAE_ENCODER_PARTS), "text_encoder_hash": weights_hash(te)}
            vae.encoder = None
            vae.quant_conv = None
        for m in (vae, te):
            m.requires_grad_(False).eval().to(device=device, dtype=dtype)
        return cls(vae=vae, text_encoder=te, tokenizer=load_tokenizer(cfg), dtype=dtype, **hashes)

    @property
    def latent_channels(self) -> int:
        return int(self.vae.config.latent_channels)

    @property
    def text_dim(self) -> int:
        return int(self.text_encoder.config.hidden_size)

    @property
    def scaling_factor(self) -> float:
        return float(self.vae.config.scaling_factor)

    @property
    def shift_factor(self) -> float:
        return float(getattr(self.vae.config, "shift_factor", None) or 0.0)

    @torch.no_grad()
    def encode_images(self, pixels: torch.Tensor, posterior_noise: torch.Tensor | None) -> torch.Tensor:
        """Pixels in [-1, 1] -> scaled latents. `posterior_noise` samples the posterior reproducibly
        (a function of the sample ids, not of a global RNG); None takes the mean."""
        return self.sample_posterior(self.vae.encode(pixels.to(self.vae.device, self.dtype)).latent_dist,
                                     posterior_noise)

    @torch.no_grad()
    def latents_from_moments(self, moments: torch.Tensor, posterior_noise: torch.Tensor | None) -> torch.Tensor:
        """Stored posterior moments ([B, 2C, h, w], from latent shards) -> scaled latents, by the same arithmetic
        as encode_images, so a run from latent shards matches one from their image shards."""
        dist = DiagonalGaussianDistribution(moments.to(self.vae.device, self.dtype))
        return self.sample_posterior(dist, posterior_noise)

    def sample_posterior(self, dist: DiagonalGaussianDistribution, posterior_noise: torch.Tensor | None
                         ) -> torch.Tensor:
        z = dist.mean if posterior_noise is None else dist.mean + dist.std * posterior_noise.to(dist.mean)
        return ((z - self.shift_factor) * self.scaling_factor).float()

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        z = latents / self.scaling_factor + self.shift_factor
        return self.vae.decode(z.to(self.vae.device, self.dtype)).sample.float().clamp(-1, 1)

    @torch.no_grad()
    def encode_text(self, input_ids: torch.Tensor) -> torch.Tensor:
        out = self.text_encoder(input_ids.to(self.text_encoder.device))
        return out.last_hidden_state.float()

    def embed_prompts(self, prompts: list[str]) -> torch.Tensor:
        return self.encode_text(tokenize(self.tokenizer, prompts))

