"""One rank's epoch as micro-batches: each DataLoader worker plays a role (its segments of source streams),
decodes each sample (one replaceable step: `ImageDecoder`) and collates micro-batches.

Every batch carries its role's position after it, so the main process always holds a position that resumes
right after the last batch it handed to the trainer, whatever the workers prefetched.
"""

from __future__ import annotations

import copy
import logging
from collections import Counter
from collections.abc import Iterator
from typing import Any, Protocol

import numpy as np
import torch

from ldmscale.config import DataConfig, StyleConfig
from ldmscale.data import storage
from ldmscale.data.decode import decode_image, stack_uint8
from ldmscale.data.filters import IMAGE_EXTS
from ldmscale.data.latent_format import LATENT_EXT, collate_latents, decode_latent
from ldmscale.data.stream import SourceStream
from ldmscale.data.tokens import tokenize

log = logging.getLogger(__name__)


class SampleDecoder(Protocol):
    """Raw sample (bytes by extension) -> the arrays of one training example (raises on bad data), and the
    collation of a micro-batch's examples."""

    def __call__(self, sample: dict[str, Any]) -> dict[str, Any]: ...

    def collate(self, examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]: ...


class ImageDecoder:
    """JPEG/PNG/WebP -> uint8 HWC at the training resolution (+ the style reference when style is on)."""

    def __init__(self, cfg: DataConfig, seed: int, style: StyleConfig | None) -> None:
        self.cfg, self.seed = cfg, seed
        self.style = style if style is not None and style.enabled else None

    def __call__(self, sample: dict[str, Any]) -> dict[str, np.ndarray]:
        ext = next(e for e in IMAGE_EXTS if e in sample)
        image = decode_image(sample[ext], self.cfg.resolution, self.cfg.center_crop)
        out = {"pixels": image}
        if self.style is not None:
            out["style_pixels"] = self._reference(sample, image)
        return out

    def collate(self, examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        return {name: stack_uint8([e[name] for e in examples]) for name in examples[0]}

    def _reference(self, sample: dict[str, Any], image: np.ndarray) -> np.ndarray:
        """The style reference of a sample: its metadata partner, else an augmented view of itself."""
        from ldmscale.data.style_refs import REF_BYTES, augment_view

        assert self.style is not None
        if REF_BYTES in sample:
            return decode_image(sample[REF_BYTES], self.cfg.resolution, self.cfg.center_crop)
        return augment_view(image, self.seed, sample["__key__"], self.style.crop_scale, self.style.shuffle_grid)


class LatentDecoder:
    """data.format=latents: the stored posterior moments (and text embeddings) of ldmscale-encode, no JPEG."""

    def __call__(self, sample: dict[str, Any]) -> dict[str, Any]:
        return decode_latent(sample[LATENT_EXT])

    def collate(self, examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        return collate_latents(examples)


class EpochBatches(torch.utils.data.IterableDataset):
    """One epoch of one rank: DataLoader worker j plays role (first_batch + j) % workers."""

    def __init__(
        self,
        cfg: DataConfig,
        urls: list[str],
        tokenizer: Any,
        *,
        seed: int,
        epoch: int,
        micro_batch: int,
        roles: list[dict[str, Any]],
        first_batch: int,
        style: StyleConfig | None = None,
        decoder: SampleDecoder | None = None,
    ) -> None:
        super().__init__()
        self.cfg, self.urls, self.tokenizer, self.style = cfg, urls, tokenizer, style
        self.seed, self.epoch, self.micro_batch = seed, epoch, micro_batch
        self.roles, self.first_batch = roles, first_batch
        self.decoder = decoder or (LatentDecoder() if cfg.format == "latents" else ImageDecoder(cfg, seed, style))

    def __iter__(self) -> Iterator[dict[str, Any]]:
        # spawned workers (the GPU default) start without the parent's registered openers and options
        storage.register_gopen_schemes(self.cfg.storage_options)
        info = torch.utils.data.get_worker_info()
        role = (self.first_batch + (info.id if info is not None else 0)) % len(self.roles)
        state = copy.deepcopy(self.roles[role])
        decode_counts: Counter[str] = Counter(state["counts"])
        while state["segments"]:
            seg = state["segments"][0]
            stream = SourceStream(self.cfg, self.urls, seed=self.seed, epoch=self.epoch, src=seg["src"],
                                  cursor=seg["cursor"], style=self.style)
            samples = iter(stream)
            for _ in range(seg["skip"]):  # a re-split piece starting inside a stream: drop what others give
                self._collate(samples, Counter())
            seg["skip"] = 0
            while seg["batches"] > 0:
                batch = self._collate(samples, decode_counts)
                seg["batches"] -= 1
                seg["cursor"] = stream.cursor()
                if seg["batches"] == 0:
                    state["segments"].pop(0)
                state["counts"] = dict(decode_counts)
                batch.update(role=role, state=copy.deepcopy(state), dropped=dict(decode_counts + stream.counts))
                yield batch

    def _collate(self, samples: Iterator[dict[str, Any]], counts: Counter[str]) -> dict[str, Any]:
        examples: list[dict[str, Any]] = []
        captions: list[str] = []
        keys: list[str] = []
        while len(examples) < self.micro_batch:
            sample = next(samples)
            try:
                examples.append(self.decoder(sample))
            except Exception as exc:  # a corrupt image is data, not a bug: count it and go on
                counts["decode_error"] += 1
                if counts["decode_error"] in (1, 10, 100, 1000):
                    log.warning("skipping bad data (decode_error, %d so far on this worker): %r",
                                counts["decode_error"], exc)
                continue
            captions.append(sample["txt"].decode("utf-8", "replace").strip())
            keys.append(sample["__key__"])
        batch: dict[str, Any] = self.decoder.collate(examples)
        batch.update(captions=captions, keys=keys)
        if self.tokenizer is not None:  # the autoencoder stage has no text
            batch["input_ids"] = tokenize(self.tokenizer, captions)
        return batch
