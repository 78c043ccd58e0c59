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
from ldmscale.data.bucket_fill import BucketFill, Entry
from ldmscale.data.buckets import Bucket, bucket_set
from ldmscale.data.decode import decode_image, decode_sample_to_bucket, image_bucket, sample_meta, stack_uint8
from ldmscale.data.filters import IMAGE_EXTS
from ldmscale.data.latent_format import LATENT_EXT, collate_latents, decode_latent, peek_size_cond
from ldmscale.data.mixture import Deal, role_sources
from ldmscale.data.position import SHORTHAND, Pending, PositionError, RolePlan, Segment, StreamPos
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
    """JPEG/PNG/WebP -> uint8 HWC at the training resolution (+ the style reference when style is on); with
    aspect buckets (data.buckets) on the sample's bucket, with its size conditioning ("size_cond", SDXL's six
    numbers; the crop drawn from the seed and the key, as ldmscale-encode cuts it).
    data.random_flip mirrors half the images of each epoch left-right (which half: seed, epoch and key); a
    style reference is never mirrored with its image (style has no left and right; augment references flip
    on their own)."""

    def __init__(self, cfg: DataConfig, seed: int, style: StyleConfig | None, epoch: int = 0) -> None:
        self.cfg, self.seed, self.epoch = cfg, seed, epoch
        self.style = style if style is not None and style.enabled else None
        b = cfg.buckets
        self.buckets = bucket_set(cfg.resolution, b.step, b.max_aspect) if b.enabled else None

    def bucket(self, sample: dict[str, Any]) -> Bucket:
        """The sample's bucket without decoding its pixels (the json's original size, else the image header)."""
        assert self.buckets is not None
        ext = next(e for e in IMAGE_EXTS if e in sample)
        return image_bucket(sample[ext], self.buckets, sample_meta(sample))[0]

    def __call__(self, sample: dict[str, Any]) -> dict[str, np.ndarray]:
        ext = next(e for e in IMAGE_EXTS if e in sample)
        out: dict[str, np.ndarray] = {}
        if self.buckets is None:
            image = decode_image(sample[ext], self.cfg.resolution, self.cfg.center_crop)
        else:
            image, cond = decode_sample_to_bucket(sample, ext, self.buckets, self.cfg.center_crop, self.seed)
            out["size_cond"] = np.asarray(cond.as_list(), dtype=np.int64)
        out["pixels"] = image
        if self.cfg.random_flip and flipped(self.seed, self.epoch, sample["__key__"]):
            out["pixels"] = np.ascontiguousarray(image[:, ::-1])
        if self.style is not None:
            out["style_pixels"] = self._reference(sample, image)
        return out

    def collate(self, examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        return {name: torch.from_numpy(np.stack([e[name] for e in examples])) if name == "size_cond"
                else stack_uint8([e[name] for e in examples]) for name in examples[0]}

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

    def bucket(self, sample: dict[str, Any]) -> Bucket:
        """The bucket ldmscale-encode cut the sample into, from the member's header alone."""
        cond = peek_size_cond(sample[LATENT_EXT])
        if cond is None:
            raise ValueError("the latent sample holds no size conditioning (a set encoded without data.buckets)")
        return Bucket(height=int(cond[4]), width=int(cond[5]))

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
    sources (or one source's shard URLs); `deal`: how the epoch's slots were dealt (the mixture draw's slots).

    With aspect buckets (data.buckets.enabled) role j gives `role_left[j]` batches, each of one bucket
    (bucket_fill.py), reading into its slots of the next epoch (`next_roles`, dealt by `next_deal`) when its own
    run out; its pending samples are read again from their shards first."""

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
        role_left: list[int] | None = None,
        next_roles: list[RolePlan] | None = None,
        next_deal: Deal | None = None,
    ) -> None:
        super().__init__()
        if sources and isinstance(sources[0], str):  # one source's shard list
            sources = [MixSource(SHORTHAND, 1.0, cfg, list(sources))]  # type: ignore[arg-type]
        self.cfg, self.sources, self.tokenizer, self.style = cfg, sources, tokenizer, style
        self.seed, self.epoch, self.micro_batch = seed, epoch, micro_batch
        self.roles, self.first_batch, self.deal = roles, first_batch, deal
        self.role_left, self.next_roles, self.next_deal = role_left, next_roles, next_deal
        self.mixture = mixture_of(self.sources, seed)  # type: ignore[arg-type]
        self.custom_decoder = decoder
        self.decoder = decoder or self._decoder_of(epoch)
        self.bucketed = cfg.buckets.enabled

    def _decoder_of(self, epoch: int) -> SampleDecoder:
        """The decoder of a sample of `epoch` (random flips differ per epoch; carried samples keep theirs)."""
        if self.custom_decoder is not None:
            return self.custom_decoder
        return LatentDecoder() if self.cfg.format == "latents" else ImageDecoder(self.cfg, self.seed, self.style, epoch)

    def _stream(self, k: int, epoch: int, src: Any, cursor: StreamCursor | None) -> SourceStream:
        source: MixSource = self.sources[k]  # type: ignore[assignment]
        return SourceStream(source.cfg, source.urls, seed=stream_seed(self.seed, k), epoch=epoch, src=src,
                            cursor=cursor, style=self.style)

    def _open(self, seg: Segment, k: int, epoch: int | None = None) -> SourceStream:
        return self._stream(k, self.epoch if epoch is None else epoch, seg.src, seg.streams[k].cursor)

    def _slot_sources(self, seg: Segment, epoch: int | None = None, deal: Deal | None = None) -> Iterator[int]:
        if len(self.sources) == 1:
            return itertools.repeat(0, seg.samples)
        deal = deal or self.deal
        assert deal is not None, "a mixture needs the epoch's deal"
        rank, _, role, _ = seg.src
        return role_sources(self.mixture, self.epoch if epoch is None else epoch, deal, rank, role, seg.start,
                            seg.samples)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        # spawned workers (the GPU default) start without the parent's registered openers and options
        storage.register_gopen_schemes(self.cfg.storage_options)
        info = torch.utils.data.get_worker_info()
        role = (self.first_batch + (info.id if info is not None else 0)) % len(self.roles)
        if self.bucketed:
            yield from self._bucket_batches(role)
            return
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

    # ------------------------------------------------------------ aspect buckets

    def _bucket_batches(self, role: int) -> Iterator[dict[str, Any]]:
        """Role `role`'s batches, each of one bucket (bucket_fill.py), each with the role's position after it."""
        plan = self.roles[role]
        assert self.role_left is not None, "bucket batching needs each role's batches left"
        samples = RoleSamples(plan, self._open, self._slot_sources)
        nxt = self.epoch + 1

        def ahead() -> RoleSamples:
            if plan.ahead is not None:
                start = plan.ahead
            else:
                assert self.next_roles is not None, "bucket batching needs the next epoch's roles"
                start = self.next_roles[role]
            return RoleSamples(start, lambda seg, k: self._open(seg, k, nxt),
                               lambda seg: self._slot_sources(seg, nxt, self.next_deal or self.deal))

        fill = BucketFill(self.micro_batch, self.epoch, samples, ahead, self._assign, plan.ahead is not None)
        fill.restore(self._reread(plan.pending))
        left = self.role_left[role]
        for n in range(left):
            batch = self._collate_bucket(fill, samples)
            if n == left - 1:
                fill.drain()
            batch.update(role=role, state=fill.snapshot())
            yield batch

    def _assign(self, item: _Item, samples: Any) -> Bucket | None:
        """The item's bucket from its undecoded sample; None (counted as decode_error) when it has none."""
        try:
            return self.decoder.bucket(item.sample)  # type: ignore[attr-defined]
        except Exception as exc:  # an unreadable header is data, not a bug: the sample is not given
            counts = samples.counts[item.source]
            counts["decode_error"] += 1
            if counts["decode_error"] in (1, 10, 100, 1000):
                log.warning("skipping bad data (decode_error, %d so far on this worker role): %s: %r",
                            counts["decode_error"], item.key, exc)
            item.sample = None
            return None

    def _reread(self, pending: list[Pending]) -> list[tuple[Pending, _Item]]:
        """The pending samples of a saved position, read again from their shards: one stream per shuffle block
        they lie in, opened right before the first of them (the samples between are read, not decoded)."""
        groups: dict[str, list[Pending]] = {}
        for p in pending:
            block = StreamCursor(p.cursor.start, 0, p.cursor.failures).to_dict()
            groups.setdefault(repr((p.epoch, p.source, p.src, block)), []).append(p)
        found: dict[int, _Item] = {}
        for group in groups.values():
            group = sorted(group, key=lambda p: p.cursor.taken)
            first = group[0]
            c = first.cursor
            stream = self._stream(first.source, first.epoch, first.src,
                                  StreamCursor(c.start, c.taken - 1, c.failures))
            taken = c.taken - 1
            for p in group:
                while taken < p.cursor.taken:
                    sample, taken = next(stream), taken + 1
                if sample["__key__"] != p.key:
                    raise PositionError(f"a pending sample of the saved data position is {p.key}, its shard now "
                                        f"gives {sample['__key__']} there: the shards changed since the checkpoint; "
                                        f"restore them, or set data.on_shard_list_change=new_epoch")
                found[id(p)] = _Item(sample, p.key, stream.caption(sample), 0, p.source, p.cursor,
                                     dict(stream.block_counts))
        return [(p, found[id(p)]) for p in pending]

    def _collate_bucket(self, fill: BucketFill, samples: RoleSamples) -> dict[str, Any]:
        """One bucket's micro-batch: a failed decode takes the place of the next sample of the batch that decoded;
        a batch none of whose samples decoded is counted and replaced by the next batch."""
        while True:
            entries: list[Entry] = fill.next_batch()
            decoded = [self._decoded_in(e, samples.counts) for e in entries]
            good = [i for i, d in enumerate(decoded) if d is not FAILED]
            if good:
                break
        chosen = [entries[i] if decoded[i] is not FAILED else entries[good[bisect.bisect(good, i) % len(good)]]
                  for i in range(len(entries))]
        batch: dict[str, Any] = self.decoder.collate([e.item.example for e in chosen])
        captions = [e.item.caption for e in chosen]
        batch.update(captions=captions, keys=[e.item.key for e in chosen],
                     epochs=[e.epoch for e in chosen],  # the epoch whose slot each fills (carried: an earlier one)
                     sources=[e.item.source for e in entries])
        if self.tokenizer is not None:
            batch["input_ids"] = tokenize(self.tokenizer, captions)
        return batch

    def _decoded_in(self, entry: Entry, counts: list[Counter[str]]) -> Any:
        """_decoded with the decoder of the entry's epoch."""
        if entry.item.example is None and entry.epoch != self.epoch and self.custom_decoder is None:
            saved, self.decoder = self.decoder, self._decoder_of(entry.epoch)
            try:
                return self._decoded(entry.item, counts)
            finally:
                self.decoder = saved
        return self._decoded(entry.item, counts)
