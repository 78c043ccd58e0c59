"""FID: torchmetrics' FrechetInceptionDistance with a chosen feature extractor, and reference statistics.

Feature extractors (`--features`), all fed uint8 [N, 3, H, W]:
  inception:PATH  the standard FID network (torch-fidelity's InceptionV3 "inception-v3-compat", 2048-d pool
                  features) with its weights from a local file (pt_inception-2015-12-05-6726825d.pth);
                  needs torch-fidelity, which imports torchvision.
  clip:FOLDER     CLIP image embeddings (FID in CLIP space, Kynkaanniemi et al. 2023) from a local CLIP folder.
  pixels:N        grayscale averaged over an NxN grid of cells: no weights at all; only meaningful for tiny,
                  centred images such as the CPU demo's digits.
Reference statistics are the Gaussian (mean, covariance, count) of the reference features; torchmetrics keeps
sums, so loading statistics means writing back the sums they came from (on one rank: states are summed).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics.image.fid import FrechetInceptionDistance
from transformers import CLIPModel

from ldmscale.eval.clip_score import embedding
from ldmscale.runtime.errors import InputError


class FeatureError(InputError, ValueError):
    """A --features spec that names no usable extractor; the message says what to pass."""


FEATURE_KINDS = ("inception", "clip", "pixels")


def parse_features(spec: str) -> tuple[str, str]:
    """'kind:arg' -> (kind, arg), checked without loading anything (before any process group)."""
    kind, _, arg = spec.partition(":")
    if kind not in FEATURE_KINDS or not arg:
        raise FeatureError(f"--features {spec!r}: give inception:WEIGHTS.pth, clip:FOLDER or pixels:N")
    if kind == "pixels" and not (arg.isdigit() and int(arg) > 0):
        raise FeatureError(f"--features {spec!r}: pixels:N needs a positive grid size N, e.g. pixels:8")
    if kind == "inception" and not Path(arg).is_file():
        raise FeatureError(f"--features {spec!r}: no weights file {arg} (torch-fidelity's "
                           f"pt_inception-2015-12-05-6726825d.pth; nothing here can download it)")
    if kind == "inception":
        try:
            import torch_fidelity  # noqa: F401
        except Exception as e:  # ImportError, or torchvision failing to load inside it
            raise FeatureError(f"--features inception needs torch-fidelity (pip install torch-fidelity, with a "
                               f"torchvision matching torch): {type(e).__name__}: {e}") from None
    return kind, arg


def feature_size(spec: str) -> int:
    """How many features the extractor `spec` gives, read from configs only (no weights)."""
    kind, arg = parse_features(spec)
    if kind == "pixels":
        return int(arg) ** 2
    if kind == "inception":
        return 2048
    from transformers import CLIPConfig

    try:
        return int(CLIPConfig.from_pretrained(arg).projection_dim)
    except Exception as e:
        raise FeatureError(f"--features {spec!r}: {arg} is not a CLIP folder ({type(e).__name__}); save one with "
                           f"CLIPModel.save_pretrained") from None


def check_stats_file(path: str | Path, features: str) -> GaussianStats:
    """Reference statistics that this --features can be scored against, or a FeatureError saying why not."""
    fix = f"write them with ldmscale-eval --save-reference-stats FILE.npz --features {features}"
    try:
        stats = GaussianStats.load(path)
    except Exception as e:  # not an .npz, or one without mu/sigma
        raise FeatureError(f"--reference {path} is not a statistics file of ldmscale-eval ({type(e).__name__}: "
                           f"{str(e)[:120]}); {fix}") from None
    if stats.features and stats.features != features:
        raise FeatureError(f"--reference {path} was computed with --features {stats.features}, not {features}: pass "
                           f"--features {stats.features}, or {fix}")
    d = feature_size(features)
    if stats.mu.shape != (d,) or stats.sigma.shape != (d, d):
        raise FeatureError(f"--reference {path} holds statistics of {stats.mu.shape[-1] if stats.mu.ndim else 0} "
                           f"features; --features {features} gives {d}: {fix}")
    if stats.n < 2:
        raise FeatureError(f"--reference {path} records {'no' if stats.n == 0 else 'only ' + str(stats.n)} reference "
                           f"sample count (n; FID needs >= 2): {fix}")
    if not (np.isfinite(stats.mu).all() and np.isfinite(stats.sigma).all()):
        raise FeatureError(f"--reference {path} holds non-finite statistics: {fix}")
    return stats


class PixelFeatures(nn.Module):
    """Ink (255 - grey) averaged over an NxN grid, scaled to 0..16: load_digits' own feature layout."""

    def __init__(self, grid: int) -> None:
        super().__init__()
        self.grid = grid
        self.num_features = grid * grid

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        grey = images.float().mean(dim=1, keepdim=True)
        return ((255.0 - F.adaptive_avg_pool2d(grey, self.grid)) * (16.0 / 255.0)).flatten(1)


class CLIPImageFeatures(nn.Module):
    """CLIP's projected image embedding, preprocessed as CLIPImageProcessor does (bicubic resize of the short
    side, centre crop, CLIP's mean/std) but on tensors, on the metric's device."""

    mean: torch.Tensor  # buffers, registered in __init__
    std: torch.Tensor

    def __init__(self, name_or_path: str) -> None:
        super().__init__()
        from transformers import CLIPImageProcessor  # not at the top: importing it warns when torchvision is absent

        # the whole CLIPModel: a vision-only class would not read the top-level projection_dim of a CLIP folder
        self.model = CLIPModel.from_pretrained(name_or_path).eval().requires_grad_(False)
        proc = CLIPImageProcessor.from_pretrained(name_or_path)
        self.size = int(proc.crop_size["height"])
        self.register_buffer("mean", torch.tensor(proc.image_mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(proc.image_std).view(1, 3, 1, 1), persistent=False)
        self.num_features = int(self.model.config.projection_dim)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.float() / 255.0
        h, w = x.shape[-2:]
        scale = self.size / min(h, w)
        x = F.interpolate(x, size=(max(self.size, round(h * scale)), max(self.size, round(w * scale))),
                          mode="bicubic", antialias=True, align_corners=False)
        top, left = (x.shape[-2] - self.size) // 2, (x.shape[-1] - self.size) // 2
        x = x[..., top : top + self.size, left : left + self.size]
        return embedding(self.model.get_image_features(pixel_values=(x - self.mean) / self.std))


def build_fid(spec: str, device: torch.device) -> FrechetInceptionDistance:
    """A FrechetInceptionDistance that keeps its reference (real) statistics across reset(): one per eval,
    reset between guidance scales."""
    kind, arg = parse_features(spec)
    if kind == "inception":
        # torch-fidelity unpickles the file with weights_only=False; a plain state dict (the published one)
        # also loads with weights_only=True, so refuse anything else before it gets that far
        try:
            torch.load(arg, map_location="cpu", weights_only=True)
        except Exception as e:
            raise FeatureError(f"--features inception:{arg}: not a plain state dict ({type(e).__name__}); use "
                               f"torch-fidelity's weights-inception-2015-12-05-6726825d.pth") from None
        metric = FrechetInceptionDistance(feature=2048, feature_extractor_weights_path=arg,
                                          reset_real_features=False)
    else:
        extractor = PixelFeatures(int(arg)) if kind == "pixels" else CLIPImageFeatures(arg)
        metric = FrechetInceptionDistance(feature=extractor, reset_real_features=False)
    return metric.to(device)


@dataclass
class GaussianStats:
    mu: np.ndarray  # [D] float64
    sigma: np.ndarray  # [D, D] float64
    n: int
    features: str  # the --features spec they were computed with

    def save(self, path: str | Path) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.stem}.tmp.npz")
        np.savez(tmp, mu=self.mu, sigma=self.sigma, n=np.int64(self.n), features=np.array(self.features))
        tmp.replace(path)

    @classmethod
    def load(cls, path: str | Path) -> GaussianStats:
        with np.load(path, allow_pickle=False) as z:
            features = str(z["features"]) if "features" in z else ""
            return cls(z["mu"].astype(np.float64), z["sigma"].astype(np.float64), int(z["n"]) if "n" in z else 0,
                       features)


def stats_of(metric: FrechetInceptionDistance, real: bool) -> GaussianStats:
    """Mean and covariance of the features seen so far on all ranks (a collective when distributed)."""
    prefix = "real" if real else "fake"
    with metric.sync_context():
        n = int(getattr(metric, f"{prefix}_features_num_samples"))
        total = getattr(metric, f"{prefix}_features_sum").double()
        cov_sum = getattr(metric, f"{prefix}_features_cov_sum").double()
    mu = total / n
    sigma = (cov_sum - n * torch.outer(mu, mu)) / (n - 1)  # torchmetrics' own estimator
    return GaussianStats(mu.cpu().numpy(), sigma.cpu().numpy(), n, "")


def load_stats(metric: FrechetInceptionDistance, stats: GaussianStats, real: bool, owner: bool) -> None:
    """Write statistics back as the sums torchmetrics accumulates; only on the owner rank (the sync adds ranks)."""
    prefix = "real" if real else "fake"
    ref = getattr(metric, f"{prefix}_features_sum")
    if ref.shape[0] != stats.mu.shape[0]:
        raise FeatureError(f"reference statistics have {stats.mu.shape[0]} features, the extractor gives "
                           f"{ref.shape[0]}: compute them with the same --features")
    n = stats.n if owner else 0
    mu = torch.from_numpy(stats.mu).to(ref.device, torch.float64)
    sigma = torch.from_numpy(stats.sigma).to(ref.device, torch.float64)
    setattr(metric, f"{prefix}_features_sum", mu * n)
    setattr(metric, f"{prefix}_features_cov_sum", sigma * (n - 1) + n * torch.outer(mu, mu) if n else sigma * 0)
    setattr(metric, f"{prefix}_features_num_samples", torch.tensor(n, dtype=torch.long, device=ref.device))
