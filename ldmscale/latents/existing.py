"""An --out that already holds latent shards: what made them, and a refusal when this config would make them
another way.

A latent set is written by one config. ldmscale-encode skips every complete shard, so encoding into a set made by
another VAE, resolution, crop, dtype, filter, caption key or source list would keep the old shards and label the
whole set with the new config: training would then pass every check and learn from the wrong latents.
`encoding.json`, written before the first shard, records what the set is being made with (manifest.json repeats it
once the set is whole); a rerun must agree with it, or choose another --out.
"""

from __future__ import annotations

import json
import os
from typing import Any

from ldmscale.config import Config, ConfigError
from ldmscale.data.shardlist import is_local
from ldmscale.data.storage import scrub
from ldmscale.latents.manifest import FORMAT, MANIFEST, buckets_entry, listed_names, load_vae_config, vae_entry
from ldmscale.latents.writer import join, read_json, write_bytes_atomic

ENCODING = "encoding.json"
# what decides the latents' values (and which samples they hold); hashes are compared where both sides have one
SAME_KEYS = ("resolution", "center_crop", "buckets", "dtype", "text_embeddings", "tokenizer_max_length", "filters",
             "caption_key", "max_member_bytes")
SAME_VAE_KEYS = ("config_hash", "scaling_factor", "shift_factor", "latent_channels", "encoder_hash")


def planned_header(cfg: Config, dtype: str, text_embeddings: bool, sources: list[str]) -> dict[str, Any]:
    """What this run would write, as far as it is known without loading any weights."""
    return {
        "format": FORMAT, "resolution": cfg.data.resolution, "center_crop": cfg.data.center_crop,
        "buckets": buckets_entry(cfg), "dtype": dtype,
        "vae": vae_entry(cfg.model, load_vae_config(cfg.model), ""), "text_embeddings": text_embeddings,
        "filters": json.loads(json.dumps(cfg.data.filters.__dict__)), "caption_key": cfg.data.caption_key,
        "max_member_bytes": cfg.data.max_member_bytes, "source_shards": [scrub(u) for u in sources],
    }


def existing_header(out: str, storage_options: dict | None) -> dict[str, Any] | None:
    """The record of the set already in `out` (encoding.json, else manifest.json); None for an empty --out.
    Shards without either record are of unknown origin: refused."""
    for name in (ENCODING, MANIFEST):
        found = read_json(join(out, name), storage_options)
        if found is not None:
            if found.get("format") != FORMAT:
                raise ConfigError(f"--out {scrub(out)}: {name} there is not an ldmscale latent record; give another "
                                  f"--out")
            return found
    if listed_names(out, storage_options):
        raise ConfigError(f"--out {scrub(out)} holds latent shards but no {ENCODING} or {MANIFEST} saying how they "
                          f"were made: give another --out, or delete it to encode anew")
    return None


def differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """'key: old -> new' for what differs; a key missing on either side is not compared."""
    diff = [f"{k}: {old[k]!r} -> {new[k]!r}" for k in SAME_KEYS if k in old and k in new and old[k] != new[k]]
    ov, nv = old.get("vae", {}), new.get("vae", {})
    diff += [f"vae.{k}: {ov[k]!r} -> {nv[k]!r}" for k in SAME_VAE_KEYS
             if ov.get(k) not in (None, "") and nv.get(k) not in (None, "") and ov[k] != nv[k]]
    ot, nt = old.get("text_encoder") or {}, new.get("text_encoder") or {}
    if ot.get("hash") and nt.get("hash") and ot["hash"] != nt["hash"]:
        diff.append(f"text_encoder: {ot.get('ref')} -> {nt.get('ref')} (other weights)")
    was, now = _absolute(old.get("source_shards")), _absolute(new.get("source_shards"))
    if was is not None and now is not None and now[: len(was)] != was:  # appending shards to the list is fine
        first = next((i for i, (a, b) in enumerate(zip(was, now)) if a != b), min(len(was), len(now)))
        diff.append(f"source_shards differ from shard {first} on ({len(was)} before, {len(now)} now)")
    return diff


def _absolute(urls: list[str] | None) -> list[str] | None:
    """Local paths made absolute (sets recorded before paths were stored absolute named them as given)."""
    return None if urls is None else [os.path.abspath(u) if is_local(u) else u for u in urls]


def check_same_set(out: str, old: dict[str, Any] | None, new: dict[str, Any]) -> None:
    """Refuse to add to a set that was made another way (the ConfigError lists what differs)."""
    if old is None:
        return
    diff = differences(old, new)
    if diff:
        raise ConfigError(f"--out {scrub(out)} holds latents made another way ({'; '.join(diff[:4])}): give another "
                          f"--out, or delete it to encode anew")


def record_header(out: str, header: dict[str, Any], storage_options: dict | None) -> None:
    """encoding.json, before the first shard (every rank writes the same bytes; the rename makes it whole)."""
    write_bytes_atomic(join(out, ENCODING), json.dumps(header, indent=1).encode(), storage_options)
