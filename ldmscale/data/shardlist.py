"""Shard lists: what `data.shards` names, expanded once per start, and a fast check that the store answers.

Specs are brace patterns, lists, local globs or directories, or object-store prefixes ending in "/". The
startup check opens the first shard's metadata with short timeouts so a wrong endpoint or bad credentials
end a 1,000-rank job in seconds with one line that says what to fix.
"""

from __future__ import annotations

import glob
import os
import re

import braceexpand
import fsspec

from ldmscale.data.storage import (
    LOCAL_PROTOCOLS,
    S3_FAST_CONFIG,
    S3_PROTOCOLS,
    StorageError,
    exception_chain,
    is_throttling,
    is_transient,
    protocol_of,
    scrub,
    storage_options_for,
)

# ---------------------------------------------------------------- shard lists


class ShardListError(StorageError, ValueError):
    """data.shards names no shard."""



def is_local(url: str) -> bool:
    return protocol_of(url) in LOCAL_PROTOCOLS


def strip_file(url: str) -> str:
    return re.sub(r"^file://", "", url)


def _expand_one(spec: str, storage_options: dict | None) -> tuple[list[str], str]:
    """Expand one spec; returns (urls, what was looked for) for the error message."""
    spec = spec.strip()
    if is_local(spec):
        path = strip_file(spec)
        if os.path.isdir(path):
            found = glob.glob(os.path.join(path, "**", "*.tar"), recursive=True)
            return sorted(found), f".tar files under directory {path}"
        if "{" in path:
            return list(braceexpand.braceexpand(path)), "brace expansion"
        if glob.has_magic(path):
            return sorted(glob.glob(path)), f"files matching {path}"
        return ([path] if os.path.exists(path) else []), f"file {path}"
    try:
        return _expand_remote(spec, storage_options)
    except Exception as e:  # a wrong endpoint, credentials or bucket: one line with the fix, not botocore's traceback
        opts = storage_options_for(spec, storage_options)
        endpoint = opts.get("endpoint_url") or (opts.get("client_kwargs") or {}).get("endpoint_url")
        detail = scrub(f"{type(e).__name__}: {e}", storage_options)[:300]
        err = StorageError(f"{scrub(spec)}: cannot list the shards: {_fix_hint(spec, e, endpoint)} ({detail})")
        err.transient = is_throttling(e)
        raise err from None


def _expand_remote(spec: str, storage_options: dict | None) -> tuple[list[str], str]:
    fs, path = fsspec.core.url_to_fs(spec, **storage_options_for(spec, storage_options))
    if spec.endswith("/"):
        # Listings are cached per filesystem instance; shards may have been written since.
        fs.invalidate_cache(path)
        keys = [k for k in fs.find(path) if k.endswith(".tar")]
        return sorted(fs.unstrip_protocol(k) for k in keys), f".tar objects under prefix {spec}"
    if "{" in spec:
        # No existence checks: 41k HEADs would take minutes; check_shards_reachable tests the first.
        return list(braceexpand.braceexpand(spec)), "brace expansion"
    if glob.has_magic(path):
        return sorted(fs.unstrip_protocol(k) for k in fs.glob(path)), f"objects matching {spec}"
    return [spec], spec


def expand_shard_urls(spec: str | list[str], storage_options: dict | None = None) -> list[str]:
    """Shard URLs from a brace pattern, a list, a local glob or directory, or an object-store prefix
    ending in '/' (its .tar objects, sorted). Raises ShardListError (a ValueError) when nothing is found."""
    specs = [spec] if isinstance(spec, str) else list(spec)
    urls: list[str] = []
    looked: list[str] = []
    for s in specs:
        found, what = _expand_one(s, storage_options)
        urls.extend(found)
        looked.append(what)
    if not urls:
        raise ShardListError(f"no shards found for {spec!r}: looked for {'; '.join(looked) or 'nothing'}")
    return urls


def expand_without_listing(spec: str | list[str]) -> list[str] | None:
    """The shard URLs when no object store must be asked (local paths, brace patterns), else None: lets
    every rank check the split before any process group without a request to the store."""
    specs = [spec] if isinstance(spec, str) else list(spec)
    if not all(is_local(s) or ("{" in s and not s.endswith("/")) for s in specs):
        return None
    try:
        return expand_shard_urls(specs)
    except ValueError:
        return None  # nothing found: the preflight says so with its own message


def check_split(n_urls: int, world: int, workers: int, source: str = "") -> None:
    """Every loader worker of every rank needs a shard of its own, of every source (a StorageError: the CLIs exit 2
    on it). `source`: the name of a mixture's source, for the message."""
    workers = max(1, workers)
    if n_urls < world * workers:
        where = f"source {source}: " if source else ""
        raise StorageError(
            f"{where}{n_urls} shards cannot feed {world} ranks x {workers} loader workers (data.num_workers): every "
            f"worker needs a shard of its own; set data.num_workers <= {max(1, n_urls // world)} or split the "
            f"data into more shards"
        )


# ---------------------------------------------------------------- startup check


def _fix_hint(url: str, exc: BaseException, endpoint: str | None) -> str:
    names = {type(e).__name__ for e in exception_chain(exc)}
    if isinstance(exc, FileNotFoundError):
        return "not found — check data.shards (bucket, prefix, shard numbers) and that the shards exist"
    if isinstance(exc, PermissionError):
        return ("access denied — check AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or data.storage_options.key/"
                "secret, and that this key may read the bucket")
    if "NoCredentialsError" in names:
        return ("no credentials found — set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY (or AWS_PROFILE), "
                "data.storage_options.key/secret, or data.storage_options.anon=true for a public bucket")
    if is_transient(exc):
        where = endpoint or "the default AWS endpoint"
        return (f"cannot reach {where} — check AWS_ENDPOINT_URL or data.storage_options.endpoint_url "
                "and that the server is up and reachable from this node")
    return "unexpected storage error — check data.storage_options"


def check_shards_reachable(urls: list[str], storage_options: dict | None) -> None:
    """Fail fast at startup (rank 0): open the first shard's metadata with short timeouts and no
    long retries, and raise StorageError saying what failed and how to fix it."""
    if not urls:
        raise StorageError("no shard URLs to check — data.shards expanded to an empty list")
    url = urls[0]
    if is_local(url):
        path = strip_file(url)
        if not os.path.isfile(path):
            err = StorageError(f"{path}: no such shard file — check data.shards")
            err.missing = True
            raise err
        return
    opts = storage_options_for(url, storage_options)
    if protocol_of(url) in S3_PROTOCOLS:
        opts["config_kwargs"] = {**opts["config_kwargs"], **S3_FAST_CONFIG}
    endpoint = opts.get("endpoint_url") or (opts.get("client_kwargs") or {}).get("endpoint_url")
    try:
        fs, path = fsspec.core.url_to_fs(url, skip_instance_cache=True, **opts)
        if hasattr(fs, "retries"):
            fs.retries = 1  # s3fs's own retry loop (a class attribute, not a constructor argument)
        info = fs.info(path)
    except Exception as e:
        detail = scrub(f"{type(e).__name__}: {e}", storage_options)[:300]
        hint = _fix_hint(url, e, endpoint)
        err = StorageError(f"{scrub(url)}: {hint} ({detail})")
        err.transient = is_throttling(e)  # the preflight retries these (a busy store), not a wrong setting
        err.missing = isinstance(e, FileNotFoundError)
        raise err from None
    if info.get("type") == "directory":
        raise StorageError(f"{scrub(url)}: is a prefix, not a shard — end it with '/' to list its .tar files")
