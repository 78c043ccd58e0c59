"""Latent shards written to any fsspec URL (local folder, s3://, gs://...) so that a reader never sees half a shard
and a killed or requeued encoder resumes where it stopped.

An output shard `NNNNN.tar` is complete when its `NNNNN_stats.json` exists (img2dataset's convention): the stats
file is written only after the tar was committed. Local files go to a hidden temporary name in the same folder,
are fsynced and renamed; object stores write the final key directly, since an object appears only when its upload
completes (a multipart upload is aborted on error, and one cut by kill -9 never completes).
"""

from __future__ import annotations

import io
import json
import os
import tarfile
from typing import IO, Any

import fsspec

from ldmscale.data.shardlist import is_local, strip_file
from ldmscale.data.storage import storage_options_for


def join(base: str, name: str) -> str:
    return base.rstrip("/") + "/" + name


def shard_name(index: int, total: int) -> str:
    """Output shard i of `total`: zero-padded so that sorted names keep the source list's order (a folder listing
    of the latent set then yields the shards in the order the image shards were given)."""
    return f"{index:0{max(5, len(str(total - 1)))}d}"


class AtomicFile:
    """A binary file at `url` that becomes visible under its name only at commit()."""

    def __init__(self, url: str, storage_options: dict | None = None) -> None:
        self.url = url
        if is_local(url):
            self.path = strip_file(url)
            os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
            self.tmp = os.path.join(os.path.dirname(self.path), f".{os.path.basename(self.path)}.tmp{os.getpid()}")
            self.file: IO[bytes] = open(self.tmp, "wb")
        else:
            fs, path = fsspec.core.url_to_fs(url, **storage_options_for(url, storage_options))
            self.tmp = ""
            self.file = fs.open(path, "wb")

    def commit(self) -> None:
        if self.tmp:
            self.file.flush()
            os.fsync(self.file.fileno())
            self.file.close()
            os.replace(self.tmp, self.path)
            dir_fd = os.open(os.path.dirname(self.path) or ".", os.O_RDONLY)
            try:
                os.fsync(dir_fd)  # the rename itself survives a power loss
            finally:
                os.close(dir_fd)
        else:
            self.file.close()  # completes the upload

    def discard(self) -> None:
        if self.tmp:
            self.file.close()
            if os.path.exists(self.tmp):
                os.unlink(self.tmp)
        elif hasattr(self.file, "discard"):
            self.file.discard()  # aborts the multipart upload: nothing appears
            self.file.closed = True  # type: ignore[misc]  # fsspec would otherwise flush the dropped buffer


def write_bytes_atomic(url: str, data: bytes, storage_options: dict | None = None) -> None:
    f = AtomicFile(url, storage_options)
    try:
        f.file.write(data)
    except BaseException:
        f.discard()
        raise
    f.commit()


def read_json(url: str, storage_options: dict | None = None) -> dict[str, Any] | None:
    """A small JSON object at url, or None when it does not exist."""
    fs, path = fsspec.core.url_to_fs(url, **storage_options_for(url, storage_options))
    try:
        with fs.open(path, "rb") as f:
            return json.loads(f.read())
    except FileNotFoundError:
        return None


def is_complete(out: str, name: str, storage_options: dict | None = None) -> bool:
    fs, path = fsspec.core.url_to_fs(join(out, f"{name}_stats.json"), **storage_options_for(out, storage_options))
    return bool(fs.exists(path))


class LatentShardWriter:
    """Streams one output shard's samples into a tar; finish() commits it and then writes its _stats.json."""

    def __init__(self, out: str, name: str, storage_options: dict | None = None) -> None:
        self.out, self.name, self.storage_options = out, name, storage_options
        self.file = AtomicFile(join(out, f"{name}.tar"), storage_options)
        self.tar = tarfile.open(fileobj=self.file.file, mode="w|")  # stream mode: no seeks (object stores)
        self.count = 0

    def add(self, key: str, members: dict[str, bytes]) -> None:
        for ext, data in members.items():
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size, info.mode, info.mtime = len(data), 0o644, 0  # mtime 0: equal inputs give equal bytes
            self.tar.addfile(info, io.BytesIO(data))
        self.count += 1

    def finish(self, stats: dict[str, Any]) -> None:
        self.tar.close()
        self.file.commit()
        body = json.dumps({"count": self.count, "successes": self.count, **stats}, indent=2).encode()
        write_bytes_atomic(join(self.out, f"{self.name}_stats.json"), body, self.storage_options)

    def abort(self) -> None:
        self.file.discard()
