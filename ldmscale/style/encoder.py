"""The variational style encoder: reference image -> K style tokens in the U-Net's cross-attention space.

q(s | ref) = N(mu, diag(exp(logvar))) per token channel; training samples s = mu + sigma * eps with eps
drawn per sample id (noise.Stream.STYLE, so resume stays bitwise), sampling uses mu. The KL to N(0, I)
keeps the style space smooth and small enough that the encoder cannot smuggle the reference's content.

Backbones: `conv` is a small net trained from scratch and lives inside the DeepSpeed engine with its head;
`clip` is a frozen CLIP vision model that runs outside the engine under no_grad (like the VAE and text
encoder: ZeRO would only add traffic for weights that never change) and feeds a trainable head inside the engine.
The clip head (`style.clip_head`) is by default diffusers' IP-Adapter image projection: the projected
`image_embeds` of a CLIPVisionModelWithProjection -> Linear -> LayerNorm per token, which is what
`pipe.load_ip_adapter` rebuilds from an exported model (ldmscale/inference/ip_adapter.py). Its Linear and
LayerNorm have no bias, so an all-zero image embedding (diffusers' unconditional image branch) gives all-zero
tokens: exactly the dropped style of training and of ldmscale's guidance.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ldmscale.config import StyleConfig

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class ConvBackbone(torch.nn.Module):
    """Stride-2 conv stages with GroupNorm and SiLU, then global average and max pooling (colour statistics
    and the strongest local texture both survive)."""

    def __init__(self, channels: list[int]) -> None:
        super().__init__()
        layers: list[torch.nn.Module] = []
        c_in = 3
        for c in channels:
            layers += [torch.nn.Conv2d(c_in, c, 3, stride=2, padding=1), torch.nn.GroupNorm(min(8, c), c),
                       torch.nn.SiLU()]
            c_in = c
        self.net = torch.nn.Sequential(*layers)
        self.out_dim = 2 * c_in

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        h = self.net(pixels)
        return torch.cat([h.mean(dim=(2, 3)), h.amax(dim=(2, 3))], dim=1)


COLOUR_QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)
COLOUR_STATS_DIM = 3 * (2 + len(COLOUR_QUANTILES))


def colour_statistics(pixels: torch.Tensor) -> torch.Tensor:
    """[B,3,H,W] in [-1, 1] -> [B, COLOUR_STATS_DIM]: per channel mean, std and quantiles of the pixel values.

    Why a path of its own: the conv backbone normalises every group of channels per image (GroupNorm), so the
    absolute colours reach its pooled features only indirectly. What these 21 numbers change is measured in
    docs/results/style.md."""
    x = pixels.float().flatten(2)
    q = torch.quantile(x, torch.tensor(COLOUR_QUANTILES, device=x.device), dim=2).permute(1, 2, 0)
    return torch.cat([x.mean(dim=2), x.std(dim=2), q.flatten(1)], dim=1).to(pixels.dtype)


class ImageProjection(torch.nn.Module):
    """diffusers' IP-Adapter ImageProjection without biases: [B, E] -> Linear -> [B, K, D] -> LayerNorm(D)."""

    def __init__(self, embed_dim: int, num_tokens: int, token_dim: int) -> None:
        super().__init__()
        self.num_tokens = num_tokens
        self.proj = torch.nn.Linear(embed_dim, num_tokens * token_dim, bias=False)
        self.norm = torch.nn.LayerNorm(token_dim, bias=False)

    def forward(self, image_embeds: torch.Tensor) -> torch.Tensor:
        return self.norm(self.proj(image_embeds).reshape(len(image_embeds), self.num_tokens, -1))


class StyleEncoder(torch.nn.Module):
    """The trainable part: (conv backbone +) a head to mean and log-variance of K tokens of width D.

    conv backbone, or clip with clip_head=pooled: features -> LayerNorm (+ colour_statistics(reference) when
    cfg.uses_colour_stats; for clip FrozenVisionBackbone appends them) -> one Linear to (mu, logvar).
    clip with clip_head=ip_adapter: mu = ImageProjection(image_embeds), logvar = its own Linear (training only)."""

    def __init__(self, cfg: StyleConfig, token_dim: int, feature_dim: int | None = None) -> None:
        super().__init__()
        self.num_tokens, self.token_dim = cfg.num_tokens, token_dim
        self.backbone = ConvBackbone(cfg.conv_channels) if cfg.backbone == "conv" else None
        self.stats_dim = COLOUR_STATS_DIM if cfg.uses_colour_stats else 0
        if self.backbone is None and feature_dim is None:
            raise ValueError("a clip-backbone StyleEncoder needs the vision model's feature_dim")
        self.ip_adapter = cfg.backbone == "clip" and cfg.clip_head == "ip_adapter"
        if self.ip_adapter:
            assert feature_dim is not None and not self.stats_dim
            self.image_proj = ImageProjection(feature_dim, cfg.num_tokens, token_dim)
            self.logvar = torch.nn.Linear(feature_dim, cfg.num_tokens * token_dim)
            with torch.no_grad():  # a small posterior variance at first: early tokens carry the mean's signal
                self.logvar.weight.zero_()
                self.logvar.bias.fill_(-4.0)
            return
        if self.backbone is not None:
            in_dim = self.backbone.out_dim
        else:
            assert feature_dim is not None  # checked above
            in_dim = feature_dim - self.stats_dim
        self.norm = torch.nn.LayerNorm(in_dim)
        self.head = torch.nn.Linear(in_dim + self.stats_dim, 2 * cfg.num_tokens * token_dim)
        with torch.no_grad():  # start with a small posterior variance: early tokens carry the mean's signal
            self.head.bias[cfg.num_tokens * token_dim :].fill_(-4.0)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Pixels [B,3,H,W] in [-1, 1] (conv) or backbone features [B,F(+stats)] (clip) -> (mu, logvar) [B,K,D]."""
        if self.ip_adapter:
            logvar = self.logvar(x).view(-1, self.num_tokens, self.token_dim)
            return self.image_proj(x), logvar.clamp(-20.0, 10.0)
        if self.backbone is not None:
            h = self.norm(self.backbone(x))
            if self.stats_dim:
                h = torch.cat([h, colour_statistics(x)], dim=1)
        else:  # the frozen features carry the statistics as their last stats_dim columns
            f = x.shape[1] - self.stats_dim
            h = torch.cat([self.norm(x[:, :f]), x[:, f:]], dim=1)
        out = self.head(h).view(-1, 2, self.num_tokens, self.token_dim)
        return out[:, 0], out[:, 1].clamp(-20.0, 10.0)


def kl_to_standard_normal(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, exp(logvar)) || N(0, I)) in nats per sample, summed over tokens and channels -> [B]."""
    return 0.5 * (mu.pow(2) + logvar.exp() - 1.0 - logvar).flatten(1).sum(dim=1)


def beta_at(cfg: StyleConfig, step: int) -> float:
    """Linear warm-up of the KL weight from 0 (the denoiser first learns to use the tokens) to cfg.beta."""
    if cfg.beta_warmup_steps <= 0:
        return cfg.beta
    return cfg.beta * min(1.0, step / cfg.beta_warmup_steps)


class FrozenVisionBackbone:
    """A frozen CLIP vision model (from_pretrained) outside the engine: reference pixels -> features.

    projected=True (clip_head=ip_adapter): a CLIPVisionModelWithProjection and its projected `image_embeds`, as
    diffusers' IP-Adapter pipelines feed them; else a CLIPVisionModel's pooled output (+ colour statistics)."""

    def __init__(self, ref: str, device: torch.device, dtype: torch.dtype, colour_stats: bool = False,
                 projected: bool = False) -> None:
        from transformers import CLIPVisionModel, CLIPVisionModelWithProjection

        cls = CLIPVisionModelWithProjection if projected else CLIPVisionModel
        self.model = cls.from_pretrained(ref).requires_grad_(False).eval().to(device=device, dtype=dtype)
        self.projected = projected
        self.size = int(self.model.config.image_size)
        self.dtype = dtype
        self.colour_stats = colour_stats  # append colour_statistics(pixels) to the pooled features

    @property
    def feature_dim(self) -> int:
        c = self.model.config
        width = int(c.projection_dim) if self.projected else int(c.hidden_size)
        return width + (COLOUR_STATS_DIM if self.colour_stats else 0)

    def pixel_values(self, pixels: torch.Tensor) -> torch.Tensor:
        """[-1, 1] -> [0, 1], bicubic to the model's input size, CLIP's normalisation (its image processor's)."""
        x = (pixels.float() + 1) / 2
        x = F.interpolate(x, size=(self.size, self.size), mode="bicubic", align_corners=False).clamp(0, 1)
        mean = torch.tensor(CLIP_MEAN, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(CLIP_STD, device=x.device).view(1, 3, 1, 1)
        return ((x - mean) / std).to(self.model.device, self.dtype)

    @torch.no_grad()
    def features(self, pixels: torch.Tensor) -> torch.Tensor:
        out = self.model(pixel_values=self.pixel_values(pixels))
        if self.projected:
            return out.image_embeds.float()
        pooled = out.pooler_output.float()
        return torch.cat([pooled, colour_statistics(pixels.float())], dim=1) if self.colour_stats else pooled


def build_style(cfg: StyleConfig, token_dim: int, device: torch.device,
                dtype: torch.dtype) -> tuple[StyleEncoder, FrozenVisionBackbone | None]:
    """The trainable encoder (for the engine) and the frozen backbone (outside it; None for conv)."""
    frozen = None
    if cfg.backbone == "clip":
        frozen = FrozenVisionBackbone(cfg.vision_model, device, dtype, cfg.uses_colour_stats,
                                      projected=cfg.clip_head == "ip_adapter")
    enc = StyleEncoder(cfg, token_dim, frozen.feature_dim if frozen is not None else None)
    return enc, frozen


def style_input(frozen: FrozenVisionBackbone | None, pixels: torch.Tensor) -> torch.Tensor:
    """What the trainable encoder takes: the pixels themselves (conv) or the frozen backbone's features."""
    return pixels if frozen is None else frozen.features(pixels)


class StyleReference:
    """Sampling-time style encoding: reference pixels -> the posterior mean tokens (no sampling noise)."""

    def __init__(self, encoder: StyleEncoder, frozen: FrozenVisionBackbone | None) -> None:
        self.encoder, self.frozen = encoder.eval(), frozen

    @torch.no_grad()
    def tokens(self, pixels: torch.Tensor) -> torch.Tensor:
        """[B,3,H,W] in [-1, 1] at the training resolution -> [B,K,D] float."""
        p = next(self.encoder.parameters())
        mu, _ = self.encoder(style_input(self.frozen, pixels.to(p.device)).to(p.dtype))
        return mu.float()
