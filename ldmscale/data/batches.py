"""One rank's epoch as micro-batches: each DataLoader worker plays a role (its segments: slots of the epoch, each
filled from the role's stream of the source the mixture drew for it), decodes each sample (one replaceable step:
`ImageDecoder`) and collates micro-batches.

A micro-batch is exactly `micro_batch` consecutive stream samples of its role, so positions count samples and
convert to any micro-batch, and a skip never decodes. A sample that fails to decode keeps its place: it is
filled with another sample of the same micro-batch (the next that decoded), or, when none of them decoded,
with the first sample after it in the role's streams that does (a pure function of the streams: a resume
fills it alike). It is counted as `decode_error`.

Every batch carries its role's position after it, so the main process always holds a position that resumes
right after the last batch it handed to the trainer, whatever the workers prefetched.

The stages of a role, each its own piece: the per-source streams (stream.py: shards, shuffle blocks, filters,
captions) -> the source of each slot (mixture.py, `EpochBatches._slot_sources`) -> one sequence of stream samples
with a position after each (`RoleSamples`: `take`, `peek`, `snapshot`) -> decode (`SampleDecoder`) -> micro-batches
(`EpochBatches._collate`). A stage that regroups samples into micro-batches (by image size, say) sits between
`RoleSamples` and `_collate`; a resume stays exact as long as what it holds back is a pure function of the samples
taken and is counted in the position it saves.
"""

from __future__ import annotations

import bisect
import copy
import hashlib
import itertools
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
from ldmscale.data.mixture import Deal, role_sources
from ldmscale.data.position import SHORTHAND, RolePlan, Segment, StreamPos
from ldmscale.data.sources import MixSource, mixture_of, stream_seed
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
    """One stream sample of a role, with the position of its stream right after it."""

    sample: dict[str, Any] | None  # dropped once decoded
    key: str
    caption: str
    seg: int  # the role's segment it belongs to (len(segments): after the role's last, a fill candidate only)
    source: int  # the source the mixture drew for its slot
    cursor: StreamCursor
    counts: dict[str, int]  # its stream's drop counters after it
    example: Any = None  # None: not decoded yet; FAILED; or the decoded example


class RoleSamples:
    """A role's segments as one sequence of stream samples: `take()` moves the position, `peek(k)` looks ahead
    (into the following segments, and past the last one) without moving it. Each slot takes the next sample of
    the stream of the source drawn for it (`slot_sources`: a segment's sources, slot by slot)."""

    def __init__(self, plan: RolePlan, open_stream: Callable[[Segment, int], SourceStream],
                 slot_sources: Callable[[Segment], Iterator[int]] | None = None) -> None:
        self.plan, self.open_stream = copy.deepcopy(plan), open_stream
        self.slot_sources = slot_sources or (lambda seg: itertools.repeat(0, seg.samples))
        self.counts: list[Counter[str]] = [Counter(c) for c in plan.counts]  # drops of the samples given, by source
        self._baselines: dict[tuple[int, int], dict[str, int]] = {}  # (segment, source): counters it did not count
        self._ahead: deque[_Item] = deque()
        self._items = self._produce()
        self._last: _Item | None = None
        self._used = 0  # samples taken from segment self._last.seg
        self._taken: dict[int, _Item] = {}  # per source: the last item taken from it in segment self._last.seg

    def _open(self, i: int, seg: Segment, k: int) -> SourceStream:
        stream = self.open_stream(seg, k)
        pos = seg.streams[k]
        stream.skip(pos.skip)  # other roles give these: read, never decoded
        self._baselines[i, k] = pos.baseline if pos.baseline is not None else dict(stream.counts)
        return stream

    def _produce(self) -> Iterator[_Item]:
        streams: dict[int, SourceStream] = {}
        k = 0
        for i, seg in enumerate(self.plan.segments):
            streams = {}
            for k in self.slot_sources(seg):
                stream = streams.get(k) or streams.setdefault(k, self._open(i, seg, k))
                yield self._item(next(stream), i, k, stream)
        while k in streams:  # past the role's last sample: only ever looked at, to fill
            yield self._item(next(streams[k]), len(self.plan.segments), k, streams[k])

    @staticmethod
    def _item(sample: dict[str, Any], seg: int, source: int, stream: SourceStream) -> _Item:
        return _Item(sample, sample["__key__"], stream.caption(sample), seg, source, stream.cursor(),
                     stream.block_counts)

    def take(self) -> _Item:
        item = self._ahead.popleft() if self._ahead else next(self._items)
        if self._last is None or item.seg != self._last.seg:
            self._used, self._taken = 0, {}
        last = self._taken.get(item.source)
        before = last.counts if last is not None else self._baselines[item.seg, item.source]
        if item.counts is not before:  # the stream read a block: count what it dropped, once
            self.counts[item.source].update(Counter(item.counts) - Counter(before))
        self._last, self._used, self._taken[item.source] = item, self._used + 1, item
        return item

    def peek(self, k: int) -> _Item:
        while len(self._ahead) <= k:
            self._ahead.append(next(self._items))
        return self._ahead[k]

    def snapshot(self) -> RolePlan:
        """What the role still gives after the samples taken, and its counters: resumes right after them."""
        counts = [dict(c) for c in self.counts]
        if self._last is None:
            return RolePlan(copy.deepcopy(self.plan.segments), counts)
        i = self._last.seg
        current = self.plan.segments[i]
        rest = copy.deepcopy(self.plan.segments[i + 1 :])
        left = current.samples - self._used
        if left <= 0:
            return RolePlan(rest, counts)
        streams = [StreamPos(self._taken[k].cursor, 0, dict(self._taken[k].counts)) if k in self._taken
                   else copy.deepcopy(pos) for k, pos in enumerate(current.streams)]
        return RolePlan([Segment(current.src, left, current.start + self._used, streams), *rest], counts)


class EpochBatches(torch.utils.data.IterableDataset):
    """One epoch of one rank: DataLoader worker j plays role (first_batch + j) % workers. `sources`: the mixture's
    sources (or one source's shard URLs); `deal`: how the epoch's slots were dealt (the mixture draw's slots)."""

    def __init__(
        self,
        cfg: DataConfig,
        sources: list[MixSource] | list[str],
        tokenizer: Any,
        *,
        seed: int,
        epoch: int,
        micro_batch: int,
        roles: list[RolePlan],
        first_batch: int,
        style: StyleConfig | None = None,
        decoder: SampleDecoder | None = None,
        deal: Deal | None = None,
    ) -> None:
        super().__init__()
        if sources and isinstance(sources[0], str):  # one source's shard list
            sources = [MixSource(SHORTHAND, 1.0, cfg, list(sources))]  # type: ignore[arg-type]
        self.cfg, self.sources, self.tokenizer, self.style = cfg, sources, tokenizer, style
        self.seed, self.epoch, self.micro_batch = seed, epoch, micro_batch
        self.roles, self.first_batch, self.deal = roles, first_batch, deal
        self.mixture = mixture_of(self.sources, seed)  # type: ignore[arg-type]
        self.decoder = decoder or (LatentDecoder() if cfg.format == "latents"
                                   else ImageDecoder(cfg, seed, style, epoch))

    def _open(self, seg: Segment, k: int) -> SourceStream:
        source: MixSource = self.sources[k]  # type: ignore[assignment]
        return SourceStream(source.cfg, source.urls, seed=stream_seed(self.seed, k), epoch=self.epoch, src=seg.src,
                            cursor=seg.streams[k].cursor, style=self.style)

    def _slot_sources(self, seg: Segment) -> Iterator[int]:
        if len(self.sources) == 1:
            return itertools.repeat(0, seg.samples)
        assert self.deal is not None, "a mixture needs the epoch's deal"
        rank, _, role, _ = seg.src
        return role_sources(self.mixture, self.epoch, self.deal, rank, role, seg.start, seg.samples)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        # spawned workers (the GPU default) start without the parent's registered openers and options
        storage.register_gopen_schemes(self.cfg.storage_options)
        info = torch.utils.data.get_worker_info()
        role = (self.first_batch + (info.id if info is not None else 0)) % len(self.roles)
        samples = RoleSamples(self.roles[role], self._open, self._slot_sources)
        batches, rest = divmod(samples.plan.samples, self.micro_batch)
        assert rest == 0, f"role {role} holds {samples.plan.samples} samples, not whole micro-batches"
        for _ in range(batches):
            batch = self._collate(samples)
            state = samples.snapshot()
            batch.update(role=role, state=state)
            yield batch

    def _decoded(self, item: _Item, counts: list[Counter[str]] | None) -> Any:
        """The item's example (decoded once), or FAILED; a failure of a sample given is counted in `counts`."""
        if item.example is None:
            assert item.sample is not None
            try:
                item.example = self.decoder(item.sample)
            except Exception as exc:  # a corrupt image is data, not a bug: fill its place, count it, go on
                item.example = FAILED
                if counts is not None and counts[item.source]["decode_error"] + 1 in (1, 10, 100, 1000):
                    log.warning("skipping bad data (decode_error, %d so far on this worker role): %s: %r",
                                counts[item.source]["decode_error"] + 1, item.key, exc)
            item.sample = None
        if item.example is FAILED and counts is not None:
            counts[item.source]["decode_error"] += 1
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
        batch.update(captions=captions, keys=[item.key for item in chosen], sources=[item.source for item in items])
        if self.tokenizer is not None:  # the autoencoder stage has no text
            batch["input_ids"] = tokenize(self.tokenizer, captions)
        return batch
