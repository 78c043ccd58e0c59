"""`ldmscale-encode --config C --out URL [section.key=value ...]`: image shards -> latent shards, once.

Reads the image shards of `data.shards` as training does (the same shard list, filters, caption key, JPEG decode,
resolution and crop), runs the frozen VAE encoder (and, with --text-embeddings, the text encoder) and writes one
latent shard per image shard to `--out` (any fsspec URL): per kept sample the posterior moments, token ids, txt
(the caption data.caption_key picks), json and key. With aspect buckets (data.buckets.enabled) each image is cut into
its bucket as training cuts it (the random crop drawn from train.seed and the key) and its size conditioning
(original size, crop, bucket) is stored with its moments. A mixture (data.sources) is written as one latent set per
source, in `--out/<name>/`, each with its own record and manifest.

Every rank (torchrun, Slurm, ldmscale-launch) takes its share of the shards by the trainer's per-rank split and
needs no process group: an output shard is written atomically and skipped when complete, so a killed or requeued
job resumes where it stopped, and whichever rank finds every shard complete writes the manifest.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tarfile
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from tqdm import tqdm
from webdataset.tariterators import group_by_keys

from ldmscale.config import Config, ConfigError, load_config
from ldmscale.data import (
    IMAGE_EXTS,
    decode_image,
    expand_shard_urls,
    normalize_pixels,
    shards_for,
    stack_uint8,
    storage,
)
from ldmscale.data.buckets import bucket_set
from ldmscale.data.captions import caption_of
from ldmscale.data.decode import decode_sample_to_bucket
from ldmscale.data.latent_format import LATENT_EXT, LatentDtype, encode_latent
from ldmscale.data.shardlist import check_shards_reachable, is_local, strip_file
from ldmscale.data.sources import source_views, stream_seed
from ldmscale.data.storage import StorageError, scrub
from ldmscale.data.stream import check_shard_length, sample_reason, tar_members
from ldmscale.latents.existing import check_same_set, existing_header, planned_header, record_header
from ldmscale.latents.manifest import buckets_entry, check_shard_format, vae_entry, write_manifest_if_complete
from ldmscale.latents.writer import LatentShardWriter, is_complete, join, shard_name
from ldmscale.runtime import dist
from ldmscale.runtime.cli import ArgumentParser, at_least, output_dir_problem, run_cli
from ldmscale.runtime.errors import InputError
from ldmscale.runtime.precision import torch_dtype

TAR_SUFFIXES = (".tar", ".tgz", ".tar.gz")
Row = tuple[str, bytes, bytes | None, list[int] | None]  # key, txt, json, size conditioning (buckets)


@dataclass
class EncodeResult:
    written: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # complete before this run
    failed: list[str] = field(default_factory=list)  # transient read errors after retries: rerun to retry
    samples: int = 0
    dropped: Counter[str] = field(default_factory=Counter)
    manifest: dict[str, Any] | None = None  # the set's (a mixture: the first source's, once every set is complete)
    manifests: dict[str, dict[str, Any]] = field(default_factory=dict)  # a mixture: each complete source's


class SourceShards(torch.utils.data.IterableDataset):
    """Loader workers read and decode the image shards; each yields chunks of one shard, in order, the last one
    marked and carrying the shard's drop counts and read error."""

    def __init__(self, cfg: Config, todo: list[tuple[str, str]], chunk: int, caption_seed: int = 0) -> None:
        super().__init__()
        self.cfg, self.todo, self.chunk, self.caption_seed = cfg, todo, chunk, caption_seed
        b = cfg.data.buckets
        self.buckets = bucket_set(cfg.data.resolution, b.step, b.max_aspect) if b.enabled else None

    def _decode(self, sample: dict[str, Any], ext: str) -> tuple[Any, list[int] | None]:
        """uint8 HWC as training decodes it, and the size conditioning with buckets (else None)."""
        d = self.cfg.data
        if self.buckets is None:
            return decode_image(sample[ext], d.resolution, d.center_crop), None
        image, cond = decode_sample_to_bucket(sample, ext, self.buckets, d.center_crop, self.cfg.train.seed)
        return image, cond.as_list()

    @staticmethod
    def _pixels(images: list[Any]) -> torch.Tensor | list[torch.Tensor]:
        """One uint8 batch for square images; with buckets, one [3, H, W] tensor per image (shapes differ)."""
        if len({im.shape for im in images}) == 1:
            return stack_uint8(images)
        return [stack_uint8([im])[0] for im in images]

    def __iter__(self) -> Iterator[dict[str, Any]]:
        storage.register_gopen_schemes(self.cfg.data.storage_options)  # spawned workers start without them
        info = torch.utils.data.get_worker_info()
        wid, n = (info.id, info.num_workers) if info is not None else (0, 1)
        for name, url in self.todo[wid::n]:
            yield from self._shard(name, url)

    def _shard(self, name: str, url: str) -> Iterator[dict[str, Any]]:
        d = self.cfg.data
        counts: Counter[str] = Counter()
        errors: list[BaseException] = []
        rows: list[Row] = []
        images: list[Any] = []
        for sample in self._samples(url, errors):
            # the training stream's filter wrapper (malformed json is bad_json; a missing caption is no_caption)
            reason = sample_reason(sample, d, self.caption_seed)
            if reason:
                counts[reason] += 1
                continue
            ext = next((e for e in IMAGE_EXTS if e in sample), None)
            if ext is None:  # a latent member but no image: not a source this encoder reads
                counts["no_image"] += 1
                continue
            try:
                image, cond = self._decode(sample, ext)
            except Exception:  # a corrupt image is data, not a bug: counted as in training
                counts["decode_error"] += 1
                continue
            # the caption data.caption_key picks, stored as the latent sample's txt (training from latents reads txt)
            caption = caption_of(sample, d.caption_key, self.caption_seed) or ""
            rows.append((sample["__key__"], caption.encode(), sample.get("json"), cond))
            images.append(image)
            if len(rows) == self.chunk:
                yield {"name": name, "rows": rows, "pixels": self._pixels(images), "last": False}
                rows, images = [], []
        err = errors[0] if errors else None
        if err is not None:
            counts["shard_error"] += 1
        yield {"name": name, "url": url, "rows": rows, "pixels": self._pixels(images) if images else None,
               "last": True, "counts": dict(counts),
               "error": scrub(repr(err))[:300] if err is not None else "",
               "transient": err is not None and storage.is_transient(err)}

    def _samples(self, url: str, errors: list[BaseException]) -> Iterator[dict[str, Any]]:
        """The shard's samples as the training stream reads them (members above data.max_member_bytes unread);
        a read error, or a shard shorter than its _stats.json lists, ends the shard and is recorded."""
        stream = None
        try:
            stream = storage.open_shard(url, self.cfg.data.storage_options)  # the source's own store
            seen = 0
            for sample in group_by_keys(tar_members(stream, url, self.cfg.data.max_member_bytes)):
                seen += 1
                yield sample
            check_shard_length(url, seen, self.cfg.data.storage_options)
        except Exception as exc:  # recorded; the caller decides (transient: retry later, else a shard error)
            errors.append(exc)
        finally:
            if stream is not None:
                stream.close()


class Encoder:
    """The frozen VAE encoder (+ tokenizer, + text encoder with --text-embeddings) of the configured model."""

    def __init__(self, cfg: Config, device: torch.device, text_embeddings: bool, dtype: LatentDtype) -> None:
        from ldmscale.latents.manifest import load_vae_config
        from ldmscale.models.encoders import (
            VAE_ENCODER_PARTS,
            load_text_encoder,
            load_tokenizer,
            load_vae,
            weights_hash,
        )

        self.device, self.dtype, self.compute = device, dtype, torch_dtype(cfg.deepspeed.precision)
        if device.type == "cpu" and self.compute == torch.float16:
            self.compute = torch.float32
        vae = load_vae(cfg.model)
        self.vae_info = vae_entry(cfg.model, load_vae_config(cfg.model), weights_hash(vae, VAE_ENCODER_PARTS))
        vae.decoder = None  # only the encoder runs here
        vae.post_quant_conv = None
        self.vae = vae.requires_grad_(False).eval().to(device, self.compute)
        self.tokenizer = load_tokenizer(cfg.model)
        self.text_encoder = None
        self.text_info: dict[str, str] | None = None
        if text_embeddings:
            te = load_text_encoder(cfg.model)
            self.text_info = {"ref": cfg.model.text_encoder or f"{cfg.model.pretrained}/text_encoder",
                              "hash": weights_hash(te)}
            self.text_encoder = te.requires_grad_(False).eval().to(device, self.compute)

    @torch.no_grad()
    def moments(self, pixels_uint8: torch.Tensor | list[torch.Tensor]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(mean, logvar) per image: one VAE forward per batch, or per bucket's images when their shapes differ
        (the images keep their order)."""
        groups: dict[tuple[int, ...], list[int]] = {}
        for i, im in enumerate(pixels_uint8):
            groups.setdefault(tuple(im.shape), []).append(i)
        out: list[Any] = [None] * len(pixels_uint8)
        for members in groups.values():
            if isinstance(pixels_uint8, torch.Tensor):  # one shape: the chunk's batch as it came
                batch = pixels_uint8
            else:
                batch = torch.stack([pixels_uint8[i] for i in members])
            pixels = normalize_pixels(batch.to(self.device))
            post = self.vae.encode(pixels.to(self.compute)).latent_dist
            for j, i in enumerate(members):
                out[i] = (post.mean[j], post.logvar[j])
        return out

    @torch.no_grad()
    def members(self, rows: list[Row], pixels_uint8: torch.Tensor | list[torch.Tensor]
                ) -> list[tuple[str, dict[str, bytes]]]:
        from ldmscale.models.encoders import tokenize

        moments = self.moments(pixels_uint8)
        captions = [r[1].decode("utf-8", "replace").strip() for r in rows]  # as the training stream reads them
        ids = tokenize(self.tokenizer, captions)
        emb = None
        if self.text_encoder is not None:
            emb = self.text_encoder(ids.to(self.device)).last_hidden_state
        out = []
        for i, (key, txt, meta, cond) in enumerate(rows):
            data = encode_latent(*moments[i], ids[i], emb[i] if emb is not None else None, self.dtype, cond)
            members = {LATENT_EXT: data, "txt": txt}
            if meta is not None:
                members["json"] = meta
            out.append((key, members))
        return out


def manifest_header(cfg: Config, enc: Encoder) -> dict[str, Any]:
    return {
        "resolution": cfg.data.resolution, "center_crop": cfg.data.center_crop, "buckets": buckets_entry(cfg),
        "dtype": enc.dtype,
        "vae": enc.vae_info, "text_embeddings": enc.text_encoder is not None, "text_encoder": enc.text_info,
        "tokenizer_max_length": int(enc.tokenizer.model_max_length),
        "filters": json.loads(json.dumps(cfg.data.filters.__dict__)), "caption_key": cfg.data.caption_key,
    }


def main(cfg: Config, out: str, *, dtype: LatentDtype = "fp16", batch_size: int = 64,
         text_embeddings: bool = False, progress: bool = True) -> EncodeResult:
    """Encode data.shards into `out`, or each source of data.sources into `out/<name>` (one latent set per source,
    each with its manifest): train on them with the same sources and weights, their shards at those folders."""
    rank, world, local = dist.world_info_from_env()
    device = torch.device("cuda", local) if torch.cuda.is_available() else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(local)
    enc = Encoder(cfg, device, text_embeddings, dtype)
    if not cfg.data.sources:
        return encode_set(cfg, out, enc, cfg.train.seed, batch_size=batch_size, progress=progress)
    res = EncodeResult()
    for index, (name, _, view) in enumerate(source_views(cfg.data)):
        part = encode_set(dataclasses.replace(cfg, data=view), join(out, name), enc, stream_seed(cfg.train.seed, index),
                          batch_size=batch_size, progress=progress, label=f"source {name}: ")
        for mine, theirs in ((res.written, part.written), (res.skipped, part.skipped), (res.failed, part.failed)):
            mine.extend(f"{name}/{n}" for n in theirs)
        res.samples += part.samples
        res.dropped.update(part.dropped)
        if part.manifest is not None:
            res.manifests[name] = part.manifest
    if len(res.manifests) == len(cfg.data.sources):
        res.manifest = res.manifests[cfg.data.sources[0].name]
        sources = ", ".join(f"{{name: {s.name}, shards: [{scrub(join(out, s.name))}/], weight: {s.weight:g}}}"
                            for s in cfg.data.sources)
        print(f"ldmscale-encode: every source's latent set is complete; train on them with data.format=latents "
              f"'data.sources=[{sources}]'", flush=True)
    return res


def encode_set(cfg: Config, out: str, enc: Encoder, caption_seed: int, *, batch_size: int, progress: bool,
               label: str = "") -> EncodeResult:
    """One latent set: this rank's share of cfg.data.shards (the trainer's per-rank split) into `out`, then the
    manifest if the set is complete. `caption_seed` keys the caption pick (the seed of the source's streams)."""
    rank, world, _ = dist.world_info_from_env()
    so = cfg.data.storage_options
    storage.register_gopen_schemes(so)
    sources = source_urls(cfg)
    names = [shard_name(i, len(sources)) for i in range(len(sources))]
    by_name = dict(zip(names, sources))
    mine = shards_for(names, cfg.train.seed, 0, rank, world, 0, 1)  # the trainer's per-rank split
    res = EncodeResult()
    todo: list[str] = []
    for name in mine:
        (res.skipped if is_complete(out, name, so) else todo).append(name)
    # what a rerun must agree with (the weights' hashes are known only now: before any shard is written)
    record = {**planned_header(cfg, enc.dtype, enc.text_encoder is not None, sources), **manifest_header(cfg, enc)}
    check_same_set(out, existing_header(out, so), record)
    record_header(out, record, so)
    workers = min(cfg.data.num_workers, len(todo))
    ds = SourceShards(cfg, [(n, by_name[n]) for n in todo], batch_size, caption_seed)
    chunks = iter(ds) if workers == 0 else iter(torch.utils.data.DataLoader(
        ds, batch_size=None, num_workers=workers, prefetch_factor=2,
        multiprocessing_context="fork" if enc.device.type == "cpu" else "spawn"))
    bar = tqdm(total=len(todo), unit="shard", desc=f"ldmscale-encode rank {rank}",
               disable=not progress or rank != 0, mininterval=1.0 if sys.stderr.isatty() else 30.0)
    open_writers: dict[str, LatentShardWriter] = {}
    t0 = time.perf_counter()
    try:
        for chunk in chunks:
            name = chunk["name"]
            w = open_writers.get(name) or open_writers.setdefault(name, LatentShardWriter(out, name, so))
            if chunk["rows"]:
                for key, members in enc.members(chunk["rows"], chunk["pixels"]):
                    w.add(key, members)
                res.samples += len(chunk["rows"])
            if not chunk["last"]:
                continue
            del open_writers[name]
            res.dropped.update(chunk["counts"])
            if chunk["transient"]:  # the store kept failing: leave the shard incomplete so a rerun retries it
                w.abort()
                res.failed.append(name)
                print(f"ldmscale-encode: {label}rank {rank}: {name}.tar not written: {chunk['error']}", file=sys.stderr)
            else:  # a corrupt or truncated tar stays so: training would read the same samples from it
                w.finish({"source": scrub(chunk["url"]), "dropped": chunk["counts"], "shard_error": chunk["error"]})
                res.written.append(name)
            bar.update(1)
            bar.set_postfix_str(f"{res.samples / (time.perf_counter() - t0):.1f} samples/s")
    finally:
        for w in open_writers.values():
            w.abort()
        bar.close()
    elapsed = time.perf_counter() - t0
    print(f"ldmscale-encode: {label}rank {rank}/{world}: wrote {len(res.written)} shards ({res.samples} samples, "
          f"{res.samples / max(elapsed, 1e-9):.1f} samples/s), skipped {len(res.skipped)} complete, "
          f"failed {len(res.failed)}, dropped {dict(res.dropped) or 'none'} in {elapsed:.1f}s", flush=True)
    res.manifest = write_manifest_if_complete(out, sources, record, so)
    if res.manifest is not None:
        c = res.manifest["counts"]
        print(f"ldmscale-encode: {label}latent set complete: {c['shards']} shards, {c['samples']} samples, dropped "
              f"{c['dropped'] or 'none'}; manifest {scrub(join(out, 'manifest.json'))}", flush=True)
    return res


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = ArgumentParser(prog="ldmscale-encode", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", required=True, help="the training config whose data and VAE to use")
    p.add_argument("--out", required=True, help="output folder or URL (s3://bucket/prefix) for the latent shards: "
                                                "new, or a set this config started")
    p.add_argument("--dtype", default="fp16", choices=["fp16", "bf16", "fp32"], help="storage dtype of the moments")
    p.add_argument("--batch-size", type=at_least(1), default=64, help="images per VAE forward")
    p.add_argument("--text-embeddings", action="store_true", help="also store the text encoder's hidden states")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("overrides", nargs="*", help="section.key=value, e.g. data.shards=[s3://b/{00000..00099}.tar]")
    return p.parse_args(argv)


def source_urls(cfg: Config) -> list[str]:
    """The image shards, local ones as absolute paths: the set's record must not depend on the working folder."""
    urls = expand_shard_urls(cfg.data.shards, cfg.data.storage_options)
    return [os.path.abspath(strip_file(u)) if is_local(u) else u for u in urls]


def check_sources(cfg: Config, urls: list[str]) -> None:
    """The shards must be tar files of images that answer (the first is opened)."""
    not_tar = [u for u in urls if not u.endswith(TAR_SUFFIXES)]
    if not_tar:
        raise ConfigError(f"data.shards names {scrub(not_tar[0])}, which is not a .tar shard ({len(not_tar)} such): "
                          f"give the .tar files only (a glob like DIR/* also matches the .parquet and _stats.json)")
    check_shards_reachable(urls, cfg.data.storage_options)
    if is_local(urls[0]) and not tarfile.is_tarfile(urls[0]):
        raise ConfigError(f"data.shards: {urls[0]} is named like a shard but is not a tar file: give img2dataset-"
                          f"layout .tar shards")
    check_shard_format(cfg, urls)  # latent shards (an ldmscale manifest beside them) are not image shards


def check_out(cfg: Config, out: str, urls: list[str]) -> None:
    """--out must be a folder of its own: not a source folder or inside one listed recursively, not a run."""
    if not is_local(out):
        return
    path = os.path.abspath(strip_file(out))
    problem = output_dir_problem(path)
    if problem:
        raise ConfigError(f"--out {out}: {problem}; give a folder for the latent shards")
    if path in {os.path.dirname(u) for u in urls if is_local(u)}:
        raise ConfigError(f"--out {out} is where the image shards are: give the latent shards their own folder")
    for spec in cfg.data.shards:
        folder = os.path.abspath(strip_file(spec))
        if is_local(spec) and os.path.isdir(folder) and path.startswith(folder.rstrip("/") + "/"):
            raise ConfigError(f"--out {out} is inside {spec}, whose .tar files data.shards lists recursively: the "
                              f"latents would be read as image shards; give a folder outside it")
    if os.path.isdir(os.path.join(path, "checkpoints")):
        raise ConfigError(f"--out {out} is a training run (it holds checkpoints/): give the latents their own folder")


def preflight(cfg: Config, out: str, dtype: str = "fp16", text_embeddings: bool = False) -> None:
    """Bad input ends here with one line and exit code 2, before any model is loaded."""
    if cfg.data.format != "images":
        raise ConfigError("data.format must be images for ldmscale-encode: it reads image shards (data.shards or "
                          "data.sources) and writes latent shards to --out")
    if cfg.data.sources:
        check_out(cfg, out, [])  # the mixture's folder itself (each source's set goes below it)
    for name, _, view in source_views(cfg.data):
        if not cfg.data.sources:
            preflight_set(cfg, out, dtype, text_embeddings)
            continue
        try:
            preflight_set(dataclasses.replace(cfg, data=view), join(out, name), dtype, text_embeddings)
        except InputError as e:
            raise type(e)(f"source {name}: {e}") from None


def preflight_set(cfg: Config, out: str, dtype: str, text_embeddings: bool) -> None:
    """One latent set's checks: its image shards, its --out, and the set already there (if any)."""
    urls = source_urls(cfg)
    check_sources(cfg, urls)
    check_out(cfg, out, urls)
    so = cfg.data.storage_options
    try:
        existing = existing_header(out, so)
    except InputError:
        raise
    except Exception as e:  # the store behind --out refused (endpoint, credentials, bucket)
        raise StorageError(f"--out {scrub(out)}: cannot read it ({scrub(f'{type(e).__name__}: {e}', so)[:200]}) — "
                           f"check the URL, data.storage_options and the AWS credentials") from None
    check_same_set(out, existing, planned_header(cfg, dtype, text_embeddings, urls))


def encode(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
    preflight(cfg, args.out, args.dtype, args.text_embeddings)
    res = main(cfg, args.out, dtype=args.dtype, batch_size=args.batch_size, text_embeddings=args.text_embeddings,
               progress=not args.no_progress)
    if res.failed:
        print(f"ldmscale-encode: {len(res.failed)} shards failed to read after retries "
              f"({', '.join(res.failed[:5])}); run the same command again to encode them", file=sys.stderr)
        return 1
    if res.written and res.samples == 0:
        raise InputError(f"no sample of the {len(res.written)} shards passed (dropped: {dict(res.dropped)}): check "
                         f"that data.shards names img2dataset-layout .tar shards and that data.filters keeps some")
    return 0


def cli(argv: list[str] | None = None) -> None:
    run_cli("ldmscale-encode", lambda: encode(parse_args(argv)))


if __name__ == "__main__":
    cli()
