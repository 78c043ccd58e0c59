"""The latent set's manifest (`manifest.json` beside the shards) and its check against a training config.

The manifest says what made the latents: the source shards, the VAE (its reference, a hash of its config and of
its encoder's weights), resolution and crop, scaling and shift factors, the storage dtype, and the counts summed
from the shards' img2dataset-style `NNNNN_stats.json`. It is written only once every shard is complete, so its
presence means the set is whole. Training from latents refuses a set whose manifest disagrees with its config.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections import Counter
from typing import Any

import fsspec

from ldmscale.config import Config, ConfigError, ModelConfig
from ldmscale.data.preflight import rank0_shared, with_retries
from ldmscale.data.storage import StorageError, scrub, storage_options_for
from ldmscale.latents.writer import join, read_json, shard_name, write_bytes_atomic

MANIFEST = "manifest.json"
FORMAT = "ldmscale-latents/1"
# config keys that do not change what the encoder computes
_CONFIG_NOISE = ("_name_or_path", "_diffusers_version", "_class_name", "_use_default_values")


def vae_config_hash(vae_config: dict[str, Any]) -> str:
    cleaned = {k: v for k, v in dict(vae_config).items() if k not in _CONFIG_NOISE}
    return hashlib.sha256(json.dumps(cleaned, sort_keys=True, default=str).encode()).hexdigest()


def load_vae_config(model: ModelConfig) -> dict[str, Any]:
    """The VAE's config.json (no weights): enough for the pre-flight check, before any process group."""
    from diffusers import AutoencoderKL

    from ldmscale.models.encoders import _part

    ref, sub = _part(model, "vae")
    return dict(AutoencoderKL.load_config(ref, subfolder=sub) if sub else AutoencoderKL.load_config(ref))


def vae_entry(model: ModelConfig, vae_config: dict[str, Any], encoder_hash: str) -> dict[str, Any]:
    return {
        "ref": model.vae or f"{model.pretrained}/vae",
        "config_hash": vae_config_hash(vae_config),
        "encoder_hash": encoder_hash,
        "scaling_factor": float(vae_config.get("scaling_factor") or 1.0),
        "shift_factor": float(vae_config.get("shift_factor") or 0.0),
        "latent_channels": int(vae_config["latent_channels"]),
    }


def buckets_entry(cfg: Config) -> dict[str, Any] | None:
    """What the manifest records of data.buckets: the canvases' rule and, with random crops, the seed they are
    drawn from (train.seed); None without buckets (and in manifests written before buckets existed)."""
    b, d = cfg.data.buckets, cfg.data
    if not b.enabled:
        return None
    return {"step": b.step, "max_aspect": b.max_aspect, "crop_seed": None if d.center_crop else cfg.train.seed}


def shards_dir(url: str) -> str:
    return url.rsplit("/", 1)[0] if "/" in url else "."


def listed_names(out: str, storage_options: dict | None) -> set[str]:
    """Names of the complete shards under `out`: one listing, not one request per shard."""
    fs, path = fsspec.core.url_to_fs(out, **storage_options_for(out, storage_options))
    fs.invalidate_cache(path)
    try:
        entries = fs.ls(path, detail=False)
    except FileNotFoundError:
        return set()
    return {os.path.basename(e)[: -len("_stats.json")] for e in entries if str(e).endswith("_stats.json")}


def write_manifest_if_complete(out: str, sources: list[str], header: dict[str, Any],
                               storage_options: dict | None) -> dict[str, Any] | None:
    """When every output shard is complete, sum their stats and write the manifest (any rank may: the content is
    a function of the stats files and the header alone, so ranks finishing together write the same bytes)."""
    names = [shard_name(i, len(sources)) for i in range(len(sources))]
    if not set(names) <= listed_names(out, storage_options):
        return None
    fs, _ = fsspec.core.url_to_fs(out, **storage_options_for(out, storage_options))
    stat_urls = [fs._strip_protocol(join(out, f"{n}_stats.json")) for n in names]
    bodies = fs.cat(stat_urls)  # concurrent GETs on object stores
    dropped: Counter[str] = Counter()
    samples = 0
    shard_errors = []
    for name, url in zip(names, stat_urls):
        stats = json.loads(bodies[url])
        samples += int(stats["successes"])
        dropped.update(stats.get("dropped", {}))
        if stats.get("shard_error"):
            shard_errors.append(name)
    manifest = {
        "format": FORMAT,
        **header,
        "shards": [f"{n}.tar" for n in names],
        "source_shards": [scrub(u) for u in sources],
        "counts": {"shards": len(names), "samples": samples, "dropped": dict(sorted(dropped.items())),
                   "shards_with_read_errors": shard_errors},
    }
    write_bytes_atomic(join(out, MANIFEST), json.dumps(manifest, indent=1).encode(), storage_options)
    return manifest


def read_manifest(urls: list[str], storage_options: dict | None) -> dict[str, Any]:
    """The manifest beside the first latent shard; ConfigError if there is none."""
    where = join(shards_dir(urls[0]), MANIFEST)
    manifest = read_json(where, storage_options)
    if manifest is None or manifest.get("format") != FORMAT:
        raise ConfigError(
            f"data.format=latents but {scrub(where)} is missing or not an ldmscale latent manifest: write the "
            f"latent shards with `ldmscale-encode --config C --out DIR` and let it finish (the manifest is written "
            f"last), or set data.format=images"
        )
    return manifest


def check_manifest(cfg: Config, manifest: dict[str, Any], urls: list[str]) -> None:
    """Before any process group: the latents must have been made at this resolution and crop, by this VAE
    (config), with this scaling factor; and every shard in data.shards must belong to the set."""
    d, vae = cfg.data, manifest["vae"]
    fix = "re-encode with ldmscale-encode using this config, or point data.shards at latents made for it"
    if manifest["resolution"] != d.resolution or manifest["center_crop"] != d.center_crop:
        raise ConfigError(
            f"latent shards were encoded at data.resolution={manifest['resolution']} "
            f"center_crop={manifest['center_crop']}, the config says {d.resolution} / {d.center_crop}: {fix}"
        )
    if manifest.get("buckets") != buckets_entry(cfg):
        raise ConfigError(f"latent shards were encoded with aspect buckets {manifest.get('buckets')}, the config asks "
                          f"for {buckets_entry(cfg)} (data.buckets step, max_aspect; train.seed draws random crops): "
                          f"{fix}")
    vae_config = load_vae_config(cfg.model)
    mine = vae_entry(cfg.model, vae_config, "")
    for key in ("scaling_factor", "shift_factor"):
        if abs(mine[key] - vae[key]) > 1e-9:
            raise ConfigError(f"latent shards were encoded with VAE {key}={vae[key]}, the configured VAE "
                              f"({mine['ref']}) has {mine[key]}: {fix}")
    if mine["config_hash"] != vae["config_hash"]:
        raise ConfigError(f"latent shards were encoded by VAE {vae['ref']}, whose config differs from the configured "
                          f"{mine['ref']}: {fix}")
    known = set(manifest["shards"])
    stray = [u for u in urls if u.rsplit("/", 1)[-1] not in known]
    if stray:
        raise ConfigError(f"{scrub(stray[0])} is not a shard of the latent set in {scrub(shards_dir(urls[0]))} "
                          f"(its manifest lists {len(known)}); data.shards must name ldmscale-encode's output only")


def check_encoders(manifest: dict[str, Any], vae_encoder_hash: str, text_encoder_hash: str) -> None:
    """Once the weights are loaded: the VAE encoder (and, if the set holds text embeddings, the text encoder)
    must be the ones that made the latents."""
    if manifest["vae"]["encoder_hash"] != vae_encoder_hash:
        raise ConfigError(f"the configured VAE's encoder weights differ from those of {manifest['vae']['ref']}, "
                          f"which encoded these latent shards: re-encode with ldmscale-encode or use that VAE")
    te = manifest.get("text_encoder")
    if te and te["hash"] != text_encoder_hash:
        raise ConfigError(f"the latent shards hold text embeddings of text encoder {te['ref']}, and the configured "
                          f"one differs: re-encode (without --text-embeddings to keep it flexible) or use that one")


def shard_manifest(cfg: Config, urls: list[str]) -> dict[str, Any] | None:
    """The manifest.json beside the shards, or None where there is none; read with retries. A store that refuses
    is a StorageError for latent shards, and None for image shards (the data plan reports it with its fix)."""
    where = join(shards_dir(urls[0]), MANIFEST)
    try:
        return with_retries(lambda: read_json(where, cfg.data.storage_options), scrub(where))
    except Exception as e:
        if cfg.data.format != "latents":
            return None
        detail = scrub(f"{type(e).__name__}: {e}")[:200]
        raise StorageError(f"{scrub(where)}: cannot read the latent manifest ({detail}) — check data.shards, "
                           f"data.storage_options and the AWS credentials") from None


def shared_source_manifests(cfg: Config, sources: list[Any]) -> dict[str, Any] | None:
    """Collective: each source's manifest (rank 0 reads, every rank gets it or its error), checked against the
    config's view of that source (check_shard_format). A mixture of latent sets must come from the same encoders
    (a ConfigError otherwise). Returns the first source's manifest (the encoders' hashes the stage checks)."""
    manifests = []
    for source in sources:  # MixSource: name, cfg (the source's view of data), urls
        view = dataclasses.replace(cfg, data=source.cfg)
        manifest = shared_manifest(view, source.urls)
        check_shard_format(view, source.urls, manifest)
        manifests.append(manifest)
    first = manifests[0]
    if cfg.data.format == "latents":
        for source, m in zip(sources[1:], manifests[1:]):
            assert m is not None and first is not None
            if (m["vae"]["encoder_hash"], m.get("text_encoder")) != (first["vae"]["encoder_hash"],
                                                                      first.get("text_encoder")):
                raise ConfigError(f"source {source.name}'s latents were encoded by other encoders than source "
                                  f"{sources[0].name}'s: encode every source with the same VAE (and text encoder)")
    return first


def shared_manifest(cfg: Config, urls: list[str]) -> dict[str, Any] | None:
    """Collective: rank 0 reads the manifest (shard_manifest), every rank gets it or its error."""
    return rank0_shared(lambda: shard_manifest(cfg, urls), "reading the shards' manifest.json")


_READ_IT = object()


def check_shard_format(cfg: Config, urls: list[str], manifest: Any = _READ_IT) -> None:
    """The pre-flight for data.format: latent shards need a matching manifest; image shards must not be latents.
    `manifest`: as shard_manifest gave it (rank 0 reads it once for the job); read here when not given."""
    if manifest is _READ_IT:
        manifest = shard_manifest(cfg, urls)
    where = f"{scrub(shards_dir(urls[0]))}/{MANIFEST}"
    if cfg.data.format == "latents":
        if manifest is None or manifest.get("format") != FORMAT:
            raise ConfigError(
                f"data.format=latents but {where} is missing or not an ldmscale latent manifest: write the latent "
                f"shards with `ldmscale-encode --config C --out DIR` and let it finish (the manifest is written last), "
                f"or set data.format=images"
            )
        check_manifest(cfg, manifest, urls)
        return
    if manifest is not None and manifest.get("format") == FORMAT:
        raise ConfigError(f"data.shards names latent shards (written by ldmscale-encode; {where}) but "
                          f"data.format=images: set data.format=latents")
