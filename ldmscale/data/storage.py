"""Object-storage access for the data pipeline: shard URL expansion, fsspec-backed webdataset openers
with retry + resume, credential handling that never leaks secrets, and a fast startup reachability check.

Options come from the config (``data.storage_options``: endpoint_url, key, secret, anon, client_kwargs,
config_kwargs, ...), merged with the standard AWS environment (s3fs reads AWS_* variables and profiles
itself; we only add AWS_ENDPOINT_URL[_S3]). A sub-dict under a protocol name (``{"gs": {...}}``) applies to
that protocol only. Keys ``read_block_size``, ``read_retries`` and ``read_retry_max_delay`` tune ldmscale's
reader and never reach the filesystem.
"""

from __future__ import annotations

import errno
import io
import json
import logging
import os
import random
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, BinaryIO

import fsspec

# `import webdataset.gopen` would give the gopen function (the package re-exports it), not the module.
from webdataset.gopen import gopen_schemes

from ldmscale.runtime.errors import InputError
from ldmscale.runtime.redact import redact, scrub  # noqa: F401  (re-exported: storage.redact, storage.scrub)

log = logging.getLogger(__name__)

# JSON dict of storage options registered when this module is imported (e.g. in a spawned worker).
# Meant for non-secret options: secrets belong in AWS_* variables or the config, never in more env vars.
OPTIONS_ENV = "LDMSCALE_STORAGE_OPTIONS"
S3_PROTOCOLS = ("s3", "s3a")
# webdataset opens local paths itself; these fsspec protocols must not be rerouted.
LOCAL_PROTOCOLS = ("file", "local")
_READER_KEYS = ("read_block_size", "read_retries", "read_retry_max_delay")
# Sequential tar streaming: each GET fetches this much ahead, so a shard costs size/8 MiB requests.
DEFAULT_BLOCK_SIZE = 8 * 1024 * 1024
# botocore retries a little by itself (max_attempts counts retries, not tries); the reader's own
# backoff, which can resume mid-shard, does the rest.
_S3_CONFIG = {"connect_timeout": 5, "read_timeout": 60, "retries": {"max_attempts": 2, "mode": "standard"}}
# The startup check must answer in seconds, so it neither waits long nor retries much.
S3_FAST_CONFIG = {
    "connect_timeout": 2, "read_timeout": 5, "retries": {"total_max_attempts": 1, "mode": "standard"},
}
_TRANSIENT_ERRNOS = {
    errno.ECONNRESET, errno.ECONNREFUSED, errno.ECONNABORTED, errno.ETIMEDOUT, errno.EPIPE,
    errno.EHOSTUNREACH, errno.ENETUNREACH, errno.EBUSY, errno.EAGAIN, getattr(errno, "EREMOTEIO", 121),
}
_TRANSIENT_CODES = {"SlowDown", "ServiceUnavailable", "InternalError", "RequestTimeout", "Throttling"}
# Names of exception classes (botocore, aiohttp, urllib3) that mean "the connection broke", matched by
# name so this module does not import every client library.
_TRANSIENT_NAMES = {
    "EndpointConnectionError", "ConnectionClosedError", "ConnectTimeoutError", "ReadTimeoutError",
    "ResponseStreamingError", "IncompleteReadError", "IncompleteRead", "ProtocolError", "HTTPClientError",
    "ClientPayloadError", "ServerDisconnectedError", "ClientConnectorError", "ClientOSError",
    "ServerTimeoutError", "FSTimeoutError",
}


class StorageError(InputError, RuntimeError):
    """Object storage is misconfigured or unreachable; the message says what failed and how to fix it."""

    kind = "data error"

    transient: bool = False  # worth retrying (throttling, a reset connection), as opposed to a wrong setting
    missing: bool = False  # the object does not exist (a shard absent from its brace pattern, a wrong name)


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff for transient read errors: delays base, 2*base, ... capped at max_delay."""

    attempts: int = 8
    base_delay: float = 0.5
    max_delay: float = 10.0

    def delay(self, attempt: int) -> float:
        # Jitter: after an outage, thousands of loader workers should not all come back in the same instant.
        return min(self.base_delay * 2**attempt, self.max_delay) * random.uniform(0.5, 1.0)


# ---------------------------------------------------------------- options and secrets


def protocol_of(url: str) -> str:
    proto, _ = fsspec.core.split_protocol(url)
    return proto or "file"


def storage_options_for(url: str, options: dict | None) -> dict:
    """The fsspec filesystem kwargs for url: config options merged with the AWS environment.

    Credentials are not copied from the environment: s3fs/botocore find AWS_ACCESS_KEY_ID etc. and
    profiles themselves. Only the endpoint is taken from AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL.
    """
    protocol = protocol_of(url)
    if protocol in LOCAL_PROTOCOLS:
        return {}
    flat = {k: v for k, v in (options or {}).items() if k not in _READER_KEYS}
    known = set(fsspec.available_protocols())
    per_protocol = {k: flat.pop(k) for k in list(flat) if k in known and isinstance(flat[k], dict)}
    opts = {**flat, **per_protocol.get(protocol, {})}
    if protocol in ("http", "https"):
        # Flat options hold object-store credentials: never send them to an arbitrary web server.
        opts = dict(per_protocol.get(protocol, {}))
    if protocol in S3_PROTOCOLS:
        if protocol == "s3a":
            opts = {**per_protocol.get("s3", {}), **opts}
        has_endpoint = opts.get("endpoint_url") or (opts.get("client_kwargs") or {}).get("endpoint_url")
        env_endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        if not has_endpoint and env_endpoint:
            opts["endpoint_url"] = env_endpoint
        user_config = opts.get("config_kwargs") or {}
        opts["config_kwargs"] = {**_S3_CONFIG, **user_config}
    return opts


def _retry_policy(options: dict | None) -> RetryPolicy:
    o = options or {}
    return RetryPolicy(
        attempts=int(o.get("read_retries", RetryPolicy.attempts)),
        max_delay=float(o.get("read_retry_max_delay", RetryPolicy.max_delay)),
    )


# ---------------------------------------------------------------- error classification


def exception_chain(exc: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        yield cur
        cur = cur.__cause__ or cur.__context__


def is_transient(exc: BaseException) -> bool:
    """True for errors worth retrying (connection reset/refused, timeouts, 5xx, throttling); False for
    permanent ones (missing object, access denied, bad request) anywhere in the exception chain."""
    permanent = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError, ValueError)
    links = list(exception_chain(exc))
    if isinstance(links[0], permanent):
        return False
    for e in links:
        response = getattr(e, "response", None)
        if isinstance(response, dict) and "Error" in response:  # botocore ClientError
            status = int(response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
            return status >= 500 or status == 429 or response["Error"].get("Code") in _TRANSIENT_CODES
        if isinstance(e, (ConnectionError, TimeoutError, socket.timeout)):
            return True
        if any(cls.__name__ in _TRANSIENT_NAMES for cls in type(e).__mro__):
            return True
        if isinstance(e, OSError) and e.errno in _TRANSIENT_ERRNOS:
            return True
    return False


_BUSY_STATUS = {429, 500, 502, 503, 504}


def is_throttling(exc: BaseException) -> bool:
    """A busy store's answer (503 SlowDown, 429, 5xx, a read timeout, a reset connection): worth retrying
    at start-up, unlike a refused connection or a wrong setting, which must fail in seconds."""
    for e in exception_chain(exc):
        response = getattr(e, "response", None)
        if isinstance(response, dict) and "Error" in response:  # botocore ClientError
            status = int(response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
            return status in _BUSY_STATUS or response["Error"].get("Code") in _TRANSIENT_CODES
        if isinstance(e, ConnectionResetError) or any(c.__name__ == "ReadTimeoutError" for c in type(e).__mro__):
            return True
    return False


# ---------------------------------------------------------------- reading with retry and resume


def _identity(info: dict) -> tuple:
    """What must not change between reopenings of one object, or resumed bytes would be garbage."""
    return info.get("size"), info.get("ETag") or info.get("etag")


class ResumingReader(io.RawIOBase):
    """A read-only stream over one object that survives transient errors: it reopens the object
    and seeks to the byte offset already delivered, so a tar stream continues without a gap or repeat."""

    def __init__(self, url: str, options: dict | None = None):
        super().__init__()
        self.url = url
        self._options = options or {}
        self._policy = _retry_policy(options)
        self._block_size = int(self._options.get("read_block_size", DEFAULT_BLOCK_SIZE))
        self._fs, self._path = fsspec.core.url_to_fs(url, **storage_options_for(url, options))
        self._pos = 0
        self._file: Any = None
        self._ident: tuple | None = None
        self.retries = 0  # how many transient errors this stream absorbed
        self._with_retry(self._ensure_open)

    def _ensure_open(self) -> None:
        if self._file is not None:
            return
        f = self._fs.open(self._path, "rb", block_size=self._block_size, cache_type="readahead")
        # fsspec's buffered files already did a HEAD/stat for the size; reuse it rather than ask again.
        details = getattr(f, "details", None)
        ident = _identity(details if isinstance(details, dict) else self._fs.info(self._path))
        if self._ident is not None and ident != self._ident:
            f.close()
            raise StorageError(f"{scrub(self.url)} changed while being read; cannot resume at {self._pos}")
        self._ident = ident
        if self._pos:
            f.seek(self._pos)
        self._file = f

    def _drop(self) -> None:
        f, self._file = self._file, None
        if f is not None:
            try:
                f.close()
            except Exception:  # the connection is already broken; closing is best effort
                pass

    def _with_retry(self, fn: Callable[[], Any]) -> Any:
        for attempt in range(self._policy.attempts + 1):
            try:
                return fn()
            except Exception as e:
                if attempt >= self._policy.attempts or not is_transient(e):
                    raise
                self._drop()
                self.retries += 1
                delay = self._policy.delay(attempt)
                log.warning(
                    "%s: transient %s at byte %d (%s); retry %d/%d in %.1fs",
                    scrub(self.url), type(e).__name__, self._pos, scrub(str(e), self._options)[:200],
                    attempt + 1, self._policy.attempts, delay,
                )
                time.sleep(delay)

    def _read_once(self, n: int) -> bytes:
        self._ensure_open()
        data = self._file.read(n)
        self._pos += len(data)
        return data

    def read(self, size: int | None = -1) -> bytes:
        if size is None or size < 0:
            chunks = []
            while chunk := self.read(self._block_size):
                chunks.append(chunk)
            return b"".join(chunks)
        return self._with_retry(lambda: self._read_once(size))

    def readall(self) -> bytes:
        # RawIOBase.readall would loop in 8 KiB steps; whole blocks are much cheaper.
        return self.read(-1)

    def readinto(self, buffer: Any) -> int:
        data = self.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)

    def readable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def close(self) -> None:
        self._drop()
        super().close()


def open_url(url: str, storage_options: dict | None = None, mode: str = "rb") -> BinaryIO:
    """Open url for reading with retry/resume (mode 'rb'), or for writing without retries ('wb')."""
    if mode == "rb":
        return io.BufferedReader(ResumingReader(url, storage_options), buffer_size=64 * 1024)
    if mode == "wb":
        fs, path = fsspec.core.url_to_fs(url, **storage_options_for(url, storage_options))
        return fs.open(path, "wb")
    raise ValueError(f"{mode}: unsupported mode for {scrub(url)}")


# ---------------------------------------------------------------- webdataset registration


class FsspecGopen:
    """A webdataset gopen handler bound to storage options; picklable, so it can travel to workers."""

    def __init__(self, storage_options: dict | None = None):
        self.storage_options = dict(storage_options or {})

    def __call__(self, url: str, mode: str = "rb", bufsize: int = 8192, **kw: Any) -> BinaryIO:
        return open_url(url, self.storage_options, mode)

    def __repr__(self) -> str:
        return f"FsspecGopen({redact(self.storage_options)})"


def open_shard(url: str, storage_options: dict | None) -> BinaryIO:
    """A shard for reading with these storage options (a mixture's sources may sit in other buckets or behind other
    endpoints) where the protocol goes through fsspec; anything else (local files, schemes registered by hand)
    through webdataset's gopen."""
    from webdataset.gopen import gopen

    scheme = url.split("://", 1)[0] if "://" in url else ""
    if isinstance(gopen_schemes.get(scheme), FsspecGopen):
        return open_url(url, storage_options)
    return gopen(url)


def register_gopen_schemes(storage_options: dict | None = None) -> None:
    """Route webdataset's s3://, gs://, gcs://, http(s):// and every other fsspec protocol through
    fsspec with retry/resume. Fork workers inherit this; spawn workers call it themselves (the loader's
    dataset does, in __iter__), or set LDMSCALE_STORAGE_OPTIONS, which is read when this module is imported."""
    opener = FsspecGopen(storage_options)
    protocols = set(fsspec.available_protocols()) | {"s3", "s3a", "gs", "gcs", "http", "https"}
    for proto in protocols - set(LOCAL_PROTOCOLS):
        gopen_schemes[proto] = opener


def _options_from_env() -> dict:
    raw = os.environ.get(OPTIONS_ENV, "").strip()
    if not raw:
        return {}
    try:
        opts = json.loads(raw)
    except json.JSONDecodeError as e:
        raise StorageError(f"{OPTIONS_ENV} is not valid JSON ({e.msg} at {e.pos})") from None
    if not isinstance(opts, dict):
        raise StorageError(f"{OPTIONS_ENV} must be a JSON object")
    return opts


register_gopen_schemes(_options_from_env())
