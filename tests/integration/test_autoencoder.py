"""The autoencoder stage trains a KL-regularised VAE, exports it with a measured scaling factor, and it
round-trips a held-out image far better than the untrained network."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import torch
from diffusers import AutoencoderKL
from webdataset.tariterators import tarfile_samples

from ldmscale.data import decode_image, to_tensor
from tests.conftest import REPO, train_env

STEPS = 30


def _heldout_pixels(assets: Path, n: int = 16) -> torch.Tensor:
    tar = sorted((assets / "digits/heldout").glob("*.tar"))[0]
    samples = tarfile_samples(iter([{"url": str(tar)}]))
    return to_tensor([decode_image(s["jpg"], 32, True) for _, s in zip(range(n), samples)])


def _recon_mse(vae: AutoencoderKL, x: torch.Tensor) -> float:
    with torch.no_grad():
        return torch.mean((vae.decode(vae.encode(x).latent_dist.mode()).sample - x) ** 2).item()


def test_autoencoder_stage_round_trips_images(assets: Path, tmp_path: Path) -> None:
    out = tmp_path / "ae"
    # 30 steps: the held-out error is ~0.06x the untrained network's there (0.04x after 40, 0.14x after 20; the
    # bound below is 0.25x). The scaling factor from 64 images: the check below needs unit variance within 40 %.
    cmd = [sys.executable, "-m", "ldmscale.train", "--config", str(REPO / "configs/demo-autoencoder.yaml"),
           f"train.out_dir={out}", f"data.shards=[{assets / 'digits/train'}]", f"train.max_steps={STEPS}",
           "train.ckpt_every=1000", "optim.warmup_steps=5", "train.micro_batch_size=16", "train.global_batch_size=16",
           "autoencoder.scaling_samples=64"]
    r = subprocess.run(cmd, env=train_env(), capture_output=True, text=True, timeout=600, cwd=REPO)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert f"FINISHED step={STEPS}" in r.stdout
    trained = AutoencoderKL.from_pretrained(out / "vae").eval()
    untrained = AutoencoderKL.from_pretrained(assets / "models/vae").eval()
    x = _heldout_pixels(assets)
    assert _recon_mse(trained, x) < 0.25 * _recon_mse(untrained, x)
    with torch.no_grad():  # the stored factor makes the data's latents unit-variance
        z = trained.encode(x).latent_dist.sample() * trained.config.scaling_factor
    assert 0.6 < z.std().item() < 1.6
    assert trained.config.scaling_factor != untrained.config.scaling_factor
