"""Validation loss on held-out shards: fixed samples, noise and timesteps, so the number depends only on the
weights: the same on every evaluation of the same weights, whatever the world size, and after a resume.

Rank 0 reads the first `train.eval_samples` samples of `data.val_shards` (in shard order) once at start-up, with
retries, and shares their encoded bytes with every rank (one read of the store per job, not one per rank; 256
LAION samples are ~10 MB); each rank decodes its share (j % world == rank). Sample j is scored at one timestep in
each third of the schedule (low / mid / high t), so every bucket averages the same samples. Its posterior
sample, noise and timesteps come from noise.py keyed by ids above any training id, so they never repeat a
training draw. Captions are never dropped. One all-reduce per evaluation; every rank runs the same number of
forward passes (under ZeRO-3 a forward gathers parameters collectively), padding its share with zero-weight
batches (of sample 0, so a world larger than the set works too).

With aspect buckets (data.buckets) every sample is cut into its bucket (centre crop, the image's own size as its
original), the samples of each bucket, in their fixed order (buckets.fixed_per_bucket), are cut into micro-batches,
and rank r scores batches r, r + world, ... of that list, each under its samples' own size conditioning: the set,
its batches and their draws depend only on the held-out shards and the bucket set, never on the world size.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as tdist

from ldmscale.data import IMAGE_EXTS, StorageError, decode_image, expand_shard_urls, normalize_pixels, stack_uint8
from ldmscale.data.buckets import Bucket, bucket_set, fixed_per_bucket
from ldmscale.data.decode import decode_to_bucket, image_bucket
from ldmscale.data.preflight import rank0_shared, with_retries
from ldmscale.eval.reference import shard_samples
from ldmscale.models import noise
from ldmscale.models.encoders import tokenize
from ldmscale.models.size_conditioning import has_size_conditioning

VAL_ID_BASE = 1 << 60  # training ids are step * global_batch + slot: far below this
BUCKETS = ("low", "mid", "high")


@dataclass
class ValidationSet:
    pixels: torch.Tensor  # uint8 [n, 3, R, R], this rank's share
    input_ids: torch.Tensor  # [n, L]
    ids: list[int]  # the samples' positions j in the validation set
    total: int  # samples over all ranks
    pad_pixels: torch.Tensor  # sample 0, for the zero-weight batches of a rank whose share ran out
    pad_input_ids: torch.Tensor
    # aspect buckets: this rank's batches (ids, pixels, input_ids, size_cond rows), each of one bucket, and the
    # forward passes every rank runs
    bucket_batches: list[tuple[list[int], torch.Tensor, torch.Tensor, torch.Tensor]] | None = None
    passes: int = 0
    pad_size_cond: torch.Tensor | None = None


def read_validation_samples(shards: list[str], storage_options: dict, limit: int) -> list[tuple[bytes, str]]:
    """The first `limit` samples of the shards that hold an image: (encoded image, caption)."""
    out: list[tuple[bytes, str]] = []
    for sample in shard_samples(expand_shard_urls(shards, storage_options), storage_options):
        if len(out) >= limit:
            break
        ext = next((e for e in IMAGE_EXTS if e in sample), None)
        if ext is not None:
            out.append((sample[ext], sample.get("txt", b"").decode("utf-8")))
    if not out:
        raise StorageError(f"data.val_shards {shards} holds no image sample; point it at held-out LAION-layout shards")
    return out


def shared_validation_samples(cfg: Any) -> list[tuple[bytes, str]]:
    """Collective: rank 0 reads the validation samples with retries, every rank gets them (or the error)."""
    d = cfg.data
    return rank0_shared(lambda: with_retries(lambda: read_validation_samples(d.val_shards, d.storage_options,
                                                                             cfg.train.eval_samples),
                                             "reading data.val_shards"), "reading data.val_shards")


def load_bucket_validation_set(samples: list[tuple[bytes, str]], tokenizer: Any, buckets: Sequence[Bucket],
                               batch_size: int, rank: int, world: int) -> ValidationSet:
    """This rank's batches of the validation samples, each of one bucket (see the module docstring)."""
    assigned = [image_bucket(image, buckets)[0] for image, _ in samples]
    batches = [ids[i : i + batch_size] for _, ids in fixed_per_bucket(assigned, len(samples))
               for i in range(0, len(ids), batch_size)]

    def decoded(ids: list[int]) -> tuple[list[int], torch.Tensor, torch.Tensor, torch.Tensor]:
        cut = [decode_to_bucket(samples[j][0], buckets, True, 0, str(j)) for j in ids]
        return (ids, stack_uint8([pixels for pixels, _ in cut]), tokenize(tokenizer, [samples[j][1] for j in ids]),
                torch.tensor([cond.as_list() for _, cond in cut]))

    mine = [decoded(ids) for ids in batches[rank::world]]
    _, pad_pixels, pad_ids, pad_cond = decoded([0])
    return ValidationSet(pad_pixels[:0], pad_ids[:0], [j for ids, *_ in mine for j in ids], len(samples), pad_pixels,
                         pad_ids, mine, math.ceil(len(batches) / world), pad_cond)


def load_validation_set(samples: list[tuple[bytes, str]], tokenizer: Any, resolution: int, center_crop: bool,
                        rank: int, world: int) -> ValidationSet:
    """This rank's share of the validation samples, decoded (any world size: a rank may get none)."""
    ids = list(range(rank, len(samples), world))
    pad_pixels = stack_uint8([decode_image(samples[0][0], resolution, center_crop)])
    pad_ids = tokenize(tokenizer, [samples[0][1]])
    if not ids:  # more ranks than samples: this rank only pads
        return ValidationSet(pad_pixels[:0], pad_ids[:0], ids, len(samples), pad_pixels, pad_ids)
    pixels = stack_uint8([decode_image(samples[j][0], resolution, center_crop) for j in ids])
    return ValidationSet(pixels, tokenize(tokenizer, [samples[j][1] for j in ids]), ids, len(samples), pad_pixels,
                         pad_ids)


class Validator:
    """Scores the diffusion module (the raw weights being trained) on the fixed validation set."""

    def __init__(self, vset: ValidationSet, encoders: Any, latent_shape: tuple[int, ...], num_timesteps: int,
                 seed: int, batch_size: int, world: int, device: torch.device, vae_factor: int | None = None) -> None:
        self.vset, self.encoders, self.latent_shape = vset, encoders, latent_shape
        self.num_timesteps, self.seed, self.batch, self.device = num_timesteps, seed, batch_size, device
        self.batches = math.ceil(math.ceil(vset.total / world) / batch_size)  # the same on every rank
        if vset.bucket_batches is not None:
            self.batches = vset.passes
        # a size-conditioned U-Net is scored under SDXL's default for the (square) validation images
        h, w = vset.pad_pixels.shape[-2:]
        self.size_row = torch.tensor([[h, w, 0, 0, h, w]]).to(device)
        self.vae_factor = vae_factor or h // latent_shape[-1]  # the square set's pixels are the latent's x factor

    def _draws(self, ids: list[int], bucket: int, shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        """Timesteps uniform in the bucket's third of the schedule, and the noise, for (sample, bucket)."""
        keys = [VAL_ID_BASE + 3 * j + bucket for j in ids]
        width = self.num_timesteps // len(BUCKETS)
        t = bucket * width + noise.randint(self.seed, keys, width, noise.Stream.TIMESTEP, self.device)
        return t, noise.randn(self.seed, keys, shape, noise.Stream.NOISE, self.device)

    def _batch(self, b: int) -> tuple[list[int], int, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Batch b of this rank: ids, weight (0: padding), pixels, input ids, size-conditioning rows (None: the
        square set's default)."""
        v = self.vset
        if v.bucket_batches is not None:
            if b < len(v.bucket_batches):
                ids, pixels, input_ids, cond = v.bucket_batches[b]
                return ids, len(ids), pixels, input_ids, cond
            return [0], 0, v.pad_pixels, v.pad_input_ids, v.pad_size_cond
        sl = slice(b * self.batch, (b + 1) * self.batch)
        ids, n = v.ids[sl], len(v.ids[sl])
        if n == 0:  # this rank's share ran out: a zero-weight batch keeps the forward passes in step
            return [0], 0, v.pad_pixels, v.pad_input_ids, None
        return ids, n, v.pixels[sl], v.input_ids[sl], None

    @torch.no_grad()
    def local_sums(self, module: torch.nn.Module) -> torch.Tensor:
        """[mse per bucket..., weighted loss per bucket..., samples] summed over this rank's share."""
        sums = torch.zeros(2 * len(BUCKETS) + 1, dtype=torch.float64, device=self.device)  # no host sync inside
        for b in range(self.batches):
            ids, n, pixels, input_ids, cond = self._batch(b)
            shape = self.latent_shape
            if cond is not None:  # a bucket's batch: its own latent shape and size conditioning
                h, w = pixels.shape[-2:]
                shape = (self.latent_shape[0], h // self.vae_factor, w // self.vae_factor)
            pixels = normalize_pixels(pixels.to(self.device))
            post = noise.randn(self.seed, [VAL_ID_BASE + 3 * j for j in ids], shape, noise.Stream.POSTERIOR,
                               self.device)
            latents = self.encoders.encode_images(pixels, post)
            context = self.encoders.encode_text(input_ids.to(self.device))
            rows = cond.to(self.device) if cond is not None else self.size_row.expand(len(ids), -1)
            sized = {"size_cond": rows} if has_size_conditioning(module.unet) else {}
            for k in range(len(BUCKETS)):
                t, eps = self._draws(ids, k, shape)
                loss, parts = module(latents, context, eps, t, **sized)
                sums[k] += parts["mse"].double() * n
                sums[len(BUCKETS) + k] += loss.detach().double() * n
            sums[-1] += n
        return sums

    def run(self, module: torch.nn.Module) -> dict[str, float]:
        sums = self.local_sums(module)
        if tdist.is_initialized():
            tdist.all_reduce(sums)
        return metrics_from_sums(sums.cpu())


def metrics_from_sums(sums: torch.Tensor) -> dict[str, float]:
    n, k = float(sums[-1]), len(BUCKETS)
    out = {f"val/mse_{name}": float(sums[i]) / n for i, name in enumerate(BUCKETS)}
    out["val/mse"] = float(sums[:k].sum()) / (k * n)
    out["val/loss"] = float(sums[k : 2 * k].sum()) / (k * n)  # the training objective's weighting (min-SNR)
    return out


def build_validator(cfg: Any, stage: Any, rank: int, world: int, device: torch.device,
                    samples: list[tuple[bytes, str]]) -> Validator:
    """The Validator of a diffusion run (ldmscale.config: data.val_shards, train.eval_samples), from the samples
    shared_validation_samples gave."""
    d = cfg.data
    if d.buckets.enabled:
        buckets = bucket_set(d.resolution, d.buckets.step, d.buckets.max_aspect)
        vset = load_bucket_validation_set(samples, stage.tokenizer, buckets, cfg.train.micro_batch_size, rank, world)
    else:
        vset = load_validation_set(samples, stage.tokenizer, d.resolution, d.center_crop, rank, world)
    return Validator(vset, stage.encoders, stage.latent_shape, cfg.model.num_train_timesteps, cfg.train.seed,
                     cfg.train.micro_batch_size, world, device, stage.vae_factor)
