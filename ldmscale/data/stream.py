"""One rank's epoch as seen by one DataLoader worker role: shards -> tar -> filter -> shuffle -> [resume skip]
-> decode -> micro-batch. The undecoded stream is a pure function of (seed, epoch, rank, role), which is what
makes the resume exact."""

from __future__ import annotations

import itertools
import logging
import random
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import webdataset as wds
from webdataset.tariterators import tarfile_samples

from ldmscale.config import DataConfig, StyleConfig
from ldmscale.data import storage
from ldmscale.data.decode import decode_image, stack_uint8
from ldmscale.data.filters import IMAGE_EXTS, reject_reason
from ldmscale.latents.format import LATENT_EXT, collate_latents, decode_latent

log = logging.getLogger(__name__)


@dataclass
class DataPosition:
    """Where a rank's loader stands: resume state saved in every checkpoint."""

    epoch: int = 0
    batches: int = 0  # batches this rank consumed in the epoch
    consumed: list[int] = field(default_factory=list)  # raw samples consumed, per worker role

    def to_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "batches": self.batches, "consumed": list(self.consumed)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DataPosition:
        return cls(epoch=int(d["epoch"]), batches=int(d["batches"]), consumed=[int(c) for c in d["consumed"]])


def _rng(*parts: int) -> random.Random:
    return random.Random(hash(tuple(parts)) & ((1 << 63) - 1))


def shards_for(urls: list[str], seed: int, epoch: int, rank: int, world: int, role: int, workers: int) -> list[str]:
    """This (rank, worker role)'s shards for an epoch: seeded shuffle, split by node, then by worker."""
    order = list(urls)
    _rng(seed, epoch).shuffle(order)
    return order[rank::world][role::workers]


class ShardStream(torch.utils.data.IterableDataset):
    """One epoch of one rank: each DataLoader worker plays a role and yields its fixed number of batches."""

    def __init__(
        self,
        cfg: DataConfig,
        urls: list[str],
        tokenizer: Any,
        *,
        seed: int,
        rank: int,
        world: int,
        micro_batch: int,
        batches_per_worker: int,
        position: DataPosition,
        style: StyleConfig | None = None,
    ) -> None:
        super().__init__()
        self.style = style if style is not None and style.enabled else None
        self.cfg, self.urls, self.tokenizer = cfg, urls, tokenizer
        self.seed, self.rank, self.world, self.micro_batch = seed, rank, world, micro_batch
        self.batches_per_worker, self.position = batches_per_worker, position
        self.workers = max(1, cfg.num_workers)

    def _raw(self, role: int) -> Iterator[dict[str, Any]]:
        """Undecoded samples that pass the filters, cycling over the role's shards; a pure function."""
        shards = shards_for(self.urls, self.seed, self.position.epoch, self.rank, self.world, role, self.workers)
        handler = self._skip_error("shard_error")
        for cycle in itertools.count():
            order = list(shards)
            _rng(self.seed, self.position.epoch, self.rank, role, cycle).shuffle(order)
            kept = 0
            for sample in tarfile_samples(iter([{"url": u} for u in order]), handler=handler):
                reason = reject_reason(sample, self.cfg.filters)
                if reason:
                    self.counts[reason] += 1
                    continue
                kept += 1
                yield sample
            if kept == 0:
                raise RuntimeError(
                    f"rank {self.rank} worker role {role}: its shards {order[:3]}... yielded no sample that "
                    f"passes data.filters (dropped: {dict(self.counts)}); loosen the filters or check the shards"
                )

    def __iter__(self) -> Iterator[dict[str, Any]]:
        # spawned workers (the GPU default) start without the parent's registered openers and options
        storage.register_gopen_schemes(self.cfg.storage_options)
        info = torch.utils.data.get_worker_info()
        wid = info.id if info is not None else 0
        role = (self.position.batches + wid) % self.workers
        consumed = self.position.consumed[role] if self.position.consumed else 0
        done = len(range(role, self.position.batches, self.workers))  # batches this role already gave
        self.counts: Counter[str] = Counter()
        self._last_warning = -1e9
        stream = wds.filters._shuffle(
            self._raw(role), bufsize=self.cfg.shuffle_buffer, initial=self.cfg.shuffle_buffer,
            rng=_rng(self.seed, self.position.epoch, self.rank, role, -1),
        )
        if self.style is not None and self.style.reference == "metadata":
            from ldmscale.style.refs import pair_by_style

            # before the skip: a replayed stream rebuilds the same pairs without decoding what it skips
            stream = pair_by_style(stream, self.style.metadata_key, self.style.pair_window,
                                   _rng(self.seed, self.position.epoch, self.rank, role, -2), IMAGE_EXTS, self.counts)
        stream = itertools.islice(stream, consumed, None)  # exact resume: skip before any decode
        images: list[np.ndarray] = []
        refs: list[np.ndarray] = []
        captions: list[str] = []
        keys: list[str] = []
        for _ in range(self.batches_per_worker - done):
            while len(images) < self.micro_batch:
                sample = next(stream)
                consumed += 1
                try:
                    if self.cfg.format == "latents":  # the one step that differs: stored moments, not a JPEG
                        images.append(decode_latent(sample[LATENT_EXT]))
                    else:
                        ext = next(e for e in IMAGE_EXTS if e in sample)
                        image = decode_image(sample[ext], self.cfg.resolution, self.cfg.center_crop)
                        if self.style is not None:
                            refs.append(self._reference(sample, image))
                        images.append(image)
                except Exception as exc:  # a corrupt image is data, not a bug: count it and go on
                    self._skip_error("decode_error")(exc)
                    continue
                captions.append(sample["txt"].decode("utf-8", "replace").strip())
                keys.append(sample["__key__"])
            batch = {
                **(collate_latents(images) if self.cfg.format == "latents" else {"pixels": stack_uint8(images)}),
                "captions": captions,
                "keys": keys,
                "role": role,
                "consumed": consumed,
                "dropped": dict(self.counts),
            }
            if self.tokenizer is not None:  # the autoencoder stage has no text
                batch["input_ids"] = self._tokenize(captions)
            if self.style is not None:
                batch["style_pixels"] = stack_uint8(refs)
            yield batch
            images, captions, keys, refs = [], [], [], []

    def _reference(self, sample: dict[str, Any], image: np.ndarray) -> np.ndarray:
        """The style reference of a sample: its metadata partner, else an augmented view of itself."""
        from ldmscale.style.refs import REF_BYTES, augment_view

        assert self.style is not None
        if REF_BYTES in sample:
            return decode_image(sample[REF_BYTES], self.cfg.resolution, self.cfg.center_crop)
        return augment_view(image, self.seed, sample["__key__"], self.style.crop_scale, self.style.shuffle_grid)

    def _skip_error(self, reason: str) -> Any:
        """A webdataset-style handler: count the error, warn at most once per 10 s per worker, go on."""

        def handler(exc: Exception) -> bool:
            self.counts[reason] += 1
            now = time.monotonic()
            if now - self._last_warning > 10.0:
                self._last_warning = now
                log.warning("skipping bad data (%s, %d so far on this worker): %r", reason, self.counts[reason], exc)
            return True

        return handler

    def _tokenize(self, captions: list[str]) -> torch.Tensor:
        from ldmscale.encoders import tokenize

        return tokenize(self.tokenizer, captions)
