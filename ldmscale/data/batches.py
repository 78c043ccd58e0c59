"""One rank's epoch as micro-batches: each DataLoader worker plays a role (its segments of source streams),
decodes each sample (one replaceable step: `ImageDecoder`) and collates micro-batches.

A micro-batch is exactly `micro_batch` consecutive stream samples of its role, so positions count samples and
convert to any micro-batch, and a skip never decodes. A sample that fails to decode keeps its place: it is
filled with another sample of the same micro-batch (the next that decoded), or, when none of them decoded,
with the first sample after it in the role's streams that does (a pure function of the streams: a resume
fills it alike). It is counted as `decode_error`.

Every batch carries its role's position after it, so the main process always holds a position that resumes
right after the last batch it handed to the trainer, whatever the workers prefetched.
"""

from __future__ import annotations

import bisect
import copy
import hashlib
import logging
from collections import Counter, deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch

from ldmscale.config import DataConfig, StyleConfig
from ldmscale.data import storage
from ldmscale.data.decode import decode_image, stack_uint8
from ldmscale.data.filters import IMAGE_EXTS
from ldmscale.data.latent_format import LATENT_EXT, collate_latents, decode_latent
from ldmscale.data.position import RolePlan, Segment
from ldmscale.data.stream import SourceStream, StreamCursor
from ldmscale.data.tokens import tokenize

log = logging.getLogger(__name__)
FAILED = object()  # a sample that did not decode
MAX_FILL_LOOKAHEAD = 100_000  # samples searched for a decodable one to fill a micro-batch none of whose decoded


class SampleDecoder(Protocol):
    """Raw sample (bytes by extension) -> the arrays of one training example (raises on bad data), and the
    collation of a micro-batch's examples."""

    def __call__(self, sample: dict[str, Any]) -> dict[str, Any]: ...

    def collate(self, examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]: ...


def flipped(seed: int, epoch: int, key: str) -> bool:
    """data.random_flip: whether sample `key` is mirrored in this epoch (a pure function: resumes agree)."""
    return hashlib.blake2b(f"flip/{seed}/{epoch}/{key}".encode(), digest_size=1).digest()[0] & 1 == 1


class ImageDecoder:
    """JPEG/PNG/WebP -> uint8 HWC at the training resolution (+ the style reference when style is on).
    data.random_flip mirrors half the images of each epoch left-right (which half: seed, epoch and key); a
    style reference is never mirrored with its image (style has no left and right; augment references flip
    on their own)."""

    def __init__(self, cfg: DataConfig, seed: int, style: StyleConfig | None, epoch: int = 0) -> None:
        self.cfg, self.seed, self.epoch = cfg, seed, epoch
        self.style = style if style is not None and style.enabled else None

    def __call__(self, sample: dict[str, Any]) -> dict[str, np.ndarray]:
        ext = next(e for e in IMAGE_EXTS if e in sample)
        image = decode_image(sample[ext], self.cfg.resolution, self.cfg.center_crop)
        out = {"pixels": image}
        if self.cfg.random_flip and flipped(self.seed, self.epoch, sample["__key__"]):
            out["pixels"] = np.ascontiguousarray(image[:, ::-1])
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


@dataclass
class _Item:
    """One stream sample of a role, with the position right after it."""

    sample: dict[str, Any] | None  # dropped once decoded
    key: str
    caption: str
    seg: int  # the role's segment it belongs to (len(segments): after the role's last, a fill candidate only)
    cursor: StreamCursor
    counts: dict[str, int]  # the stream's drop counters after it
    example: Any = None  # None: not decoded yet; FAILED; or the decoded example


class RoleSamples:
    """A role's segments as one sequence of stream samples: `take()` moves the position, `peek(k)` looks ahead
    (into the following segments, and past the last one) without moving it."""

    def __init__(self, plan: RolePlan, open_stream: Callable[[Segment], SourceStream]) -> None:
        self.plan, self.open_stream = copy.deepcopy(plan), open_stream
        self.counts: Counter[str] = Counter(plan.counts)  # drops of the samples this role gave, by reason
        self._baselines: dict[int, dict[str, int]] = {}  # per segment: counters it did not count (set when opened)
        self._ahead: deque[_Item] = deque()
        self._items = self._produce()
        self._last: _Item | None = None
        self._used = 0  # samples taken from segment self._last.seg

    def _produce(self) -> Iterator[_Item]:
        stream: SourceStream | None = None
        for i, seg in enumerate(self.plan.segments):
            stream = self.open_stream(seg)
            stream.skip(seg.skip)  # another role gives these: read, never decoded
            self._baselines[i] = seg.baseline if seg.baseline is not None else dict(stream.counts)
            for _ in range(seg.samples):
                yield self._item(next(stream), i, stream)
        while stream is not None:  # past the role's last sample: only ever looked at, to fill
            yield self._item(next(stream), len(self.plan.segments), stream)

    @staticmethod
    def _item(sample: dict[str, Any], seg: int, stream: SourceStream) -> _Item:
        caption = sample.get("txt", b"").decode("utf-8", "replace").strip()
        return _Item(sample, sample["__key__"], caption, seg, stream.cursor(), stream.block_counts)

    def take(self) -> _Item:
        item = self._ahead.popleft() if self._ahead else next(self._items)
        if self._last is None or item.seg != self._last.seg:
            before, self._used = self._baselines[item.seg], 0
        else:
            before = self._last.counts
        if item.counts is not before:  # the stream read a block: count what it dropped, once
            self.counts.update(Counter(item.counts) - Counter(before))
        self._last, self._used = item, self._used + 1
        return item

    def peek(self, k: int) -> _Item:
        while len(self._ahead) <= k:
            self._ahead.append(next(self._items))
        return self._ahead[k]

    def snapshot(self) -> RolePlan:
        """What the role still gives after the samples taken, and its counters: resumes right after them."""
        if self._last is None:
            return RolePlan(copy.deepcopy(self.plan.segments), dict(self.counts))
        i, last = self._last.seg, self._last
        current = self.plan.segments[i]
        rest = copy.deepcopy(self.plan.segments[i + 1 :])
        left = current.samples - self._used
        head = [Segment(current.src, left, 0, last.cursor, dict(last.counts))] if left > 0 else []
        return RolePlan(head + rest, dict(self.counts))


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
        roles: list[RolePlan],
        first_batch: int,
        style: StyleConfig | None = None,
        decoder: SampleDecoder | None = None,
    ) -> None:
        super().__init__()
        self.cfg, self.urls, self.tokenizer, self.style = cfg, urls, tokenizer, style
        self.seed, self.epoch, self.micro_batch = seed, epoch, micro_batch
        self.roles, self.first_batch = roles, first_batch
        self.decoder = decoder or (LatentDecoder() if cfg.format == "latents"
                                   else ImageDecoder(cfg, seed, style, epoch))

    def _open(self, seg: Segment) -> SourceStream:
        return SourceStream(self.cfg, self.urls, seed=self.seed, epoch=self.epoch, src=seg.src, cursor=seg.cursor,
                            style=self.style)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        # spawned workers (the GPU default) start without the parent's registered openers and options
        storage.register_gopen_schemes(self.cfg.storage_options)
        info = torch.utils.data.get_worker_info()
        role = (self.first_batch + (info.id if info is not None else 0)) % len(self.roles)
        samples = RoleSamples(self.roles[role], self._open)
        batches, rest = divmod(samples.plan.samples, self.micro_batch)
        assert rest == 0, f"role {role} holds {samples.plan.samples} samples, not whole micro-batches"
        for _ in range(batches):
            batch = self._collate(samples)
            state = samples.snapshot()
            batch.update(role=role, state=state, dropped=dict(state.counts))
            yield batch

    def _decoded(self, item: _Item, counts: Counter[str] | None) -> Any:
        """The item's example (decoded once), or FAILED; a failure of a sample given is counted in `counts`."""
        if item.example is None:
            assert item.sample is not None
            try:
                item.example = self.decoder(item.sample)
            except Exception as exc:  # a corrupt image is data, not a bug: fill its place, count it, go on
                item.example = FAILED
                if counts is not None and counts["decode_error"] + 1 in (1, 10, 100, 1000):
                    log.warning("skipping bad data (decode_error, %d so far on this worker role): %s: %r",
                                counts["decode_error"] + 1, item.key, exc)
            item.sample = None
        if item.example is FAILED and counts is not None:
            counts["decode_error"] += 1
        return item.example

    def _fill(self, samples: RoleSamples) -> _Item:
        """The first sample after the micro-batch that decodes (looked at, not taken: it is given in its turn)."""
        for k in range(MAX_FILL_LOOKAHEAD):
            item = samples.peek(k)
            if self._decoded(item, None) is not FAILED:
                return item
        raise RuntimeError(f"none of {MAX_FILL_LOOKAHEAD:,} consecutive samples decoded (last: {item.key}): the shards "
                           f"hold no readable images; check data.shards and data.format")

    def _collate(self, samples: RoleSamples) -> dict[str, Any]:
        items = [samples.take() for _ in range(self.micro_batch)]
        decoded = [self._decoded(item, samples.counts) for item in items]
        good = [i for i, e in enumerate(decoded) if e is not FAILED]
        if good:  # each failed place takes the next sample of the batch that decoded (cyclically)
            chosen = [items[i] if decoded[i] is not FAILED else items[good[bisect.bisect(good, i) % len(good)]]
                      for i in range(len(items))]
        else:
            chosen = [self._fill(samples)] * len(items)
        batch: dict[str, Any] = self.decoder.collate([item.example for item in chosen])
        captions = [item.caption for item in chosen]
        batch.update(captions=captions, keys=[item.key for item in chosen])
        if self.tokenizer is not None:  # the autoencoder stage has no text
            batch["input_ids"] = tokenize(self.tokenizer, captions)
        return batch
