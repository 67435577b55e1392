"""A verified, resumable, parallel local mirror of a Cloud Storage prefix.

Used for models (`--model gs://...`, `AIP_STORAGE_URI`) and LoRA adapters.
Every file lands under a temporary name and is moved into place only once its
CRC32C (or MD5) matches the object's, so a file in place is a verified file and
a restart after a crash fetches only what is missing or wrong. Files download in
parallel; large ones also in parallel byte ranges (google-cloud-storage's
transfer manager).
"""

from __future__ import annotations

import base64
import hashlib
import logging
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import google_crc32c
from google.api_core import exceptions as gexc
from google.auth.exceptions import DefaultCredentialsError
from google.cloud import storage
from google.cloud.storage import transfer_manager

log = logging.getLogger("vgate.download")

SCHEME = "gs://"
PART_SUFFIX = ".vgate-part"
# Objects at least this large download in parallel byte ranges of CHUNK_BYTES.
CHUNKED_MIN_BYTES = 64 * 1024 * 1024
CHUNK_BYTES = 32 * 1024 * 1024
ATTEMPTS = 3
DEFAULT_WORKERS = 16
MODEL_CONFIG = "config.json"  # a prefix without it is not a model


class DownloadError(RuntimeError):
    """Why a prefix cannot be mirrored, naming the URI: one line for the user."""


class TooLarge(DownloadError):
    """The prefix holds more than the caller allows: nothing was fetched."""


def is_gcs(uri: object) -> bool:
    return isinstance(uri, str) and uri.startswith(SCHEME)


def split_uri(uri: str) -> tuple[str, str]:
    """(bucket, prefix without slashes at either end)."""
    if not is_gcs(uri):
        raise DownloadError(f"{uri}: not a gs:// URI")
    bucket, _, prefix = uri[len(SCHEME) :].partition("/")
    prefix = prefix.strip("/")
    if not bucket or any(part in ("", ".", "..") for part in prefix.split("/") if prefix):
        raise DownloadError(f"{uri}: not a valid gs://bucket/path URI")
    return bucket, prefix


def mirror_dir(root: Path, uri: str) -> Path:
    """Google's layout: <root>/<bucket>/<prefix>."""
    bucket, prefix = split_uri(uri)
    return root.joinpath(bucket, *prefix.split("/")) if prefix else root / bucket


def make_client() -> storage.Client:
    """Application default credentials as on Vertex and GKE; the emulator when one is named.

    With no credentials at all, an anonymous client still reads public buckets.
    """
    if os.environ.get("STORAGE_EMULATOR_HOST"):
        return storage.Client.create_anonymous_client()
    try:
        return storage.Client()
    except DefaultCredentialsError:
        log.warning("no Google credentials found; reading Cloud Storage anonymously")
        return storage.Client.create_anonymous_client()


@dataclass
class Progress:
    """What a download has done so far; figures for logs and /health."""

    files_total: int = 0
    bytes_total: int = 0
    files_done: int = 0
    bytes_done: int = 0  # verified files, plus what in-flight files have so far
    files_reused: int = 0  # already present and verified
    started: float = field(default_factory=time.monotonic)

    def as_dict(self) -> dict[str, Any]:
        elapsed = max(time.monotonic() - self.started, 1e-6)
        rate = self.bytes_done / elapsed
        left = self.bytes_total - self.bytes_done
        return {
            "files_done": self.files_done,
            "files_total": self.files_total,
            "files_reused": self.files_reused,
            "bytes_done": self.bytes_done,
            "bytes_total": self.bytes_total,
            "bytes_per_s": round(rate),
            "eta_s": round(left / rate) if rate > 0 and left > 0 else None,
        }

    def line(self) -> str:
        d = self.as_dict()
        eta = "-" if d["eta_s"] is None else f"{d['eta_s']} s"
        return (
            f"{d['bytes_done'] / 1e6:.1f}/{d['bytes_total'] / 1e6:.1f} MB, "
            f"{d['files_done']}/{d['files_total']} files, {d['bytes_per_s'] / 1e6:.1f} MB/s, "
            f"eta {eta}"
        )


def list_objects(client: storage.Client, uri: str, required: str | None) -> list[storage.Blob]:
    """The objects under the prefix, or a DownloadError that says why there are none."""
    bucket_name, prefix = split_uri(uri)
    try:
        blobs = [
            b
            for b in client.list_blobs(bucket_name, prefix=f"{prefix}/" if prefix else None)
            if not b.name.endswith("/")
        ]
    except gexc.NotFound:
        raise DownloadError(f"{uri}: bucket {bucket_name!r} does not exist") from None
    except (gexc.Forbidden, gexc.Unauthorized) as e:
        raise DownloadError(f"{uri}: no permission to list it ({e.message})") from None
    except gexc.GoogleAPIError as e:
        raise DownloadError(f"{uri}: Cloud Storage error: {e}") from None
    if not blobs:
        raise DownloadError(f"{uri}: no objects under this prefix")
    names = {relative_name(b.name, prefix) for b in blobs}
    if required and required not in names:
        raise DownloadError(f"{uri}: no {required} under this prefix")
    return blobs


def relative_name(name: str, prefix: str) -> str:
    return name[len(prefix) + 1 :] if prefix else name


def _local_path(dest: Path, relative: str) -> Path:
    """Where an object goes; an object name that would leave `dest` is refused."""
    parts = relative.split("/")
    if any(p in ("..", ".", "") for p in parts):
        raise DownloadError(f"object name {relative!r} would leave the download directory")
    return dest.joinpath(*parts)


def _digest(path: Path, hasher: Any) -> str:
    """The file's digest as Cloud Storage gives it: base64."""
    with path.open("rb") as f:
        while block := f.read(1 << 20):
            hasher.update(block)
    return base64.b64encode(hasher.digest()).decode()


def matches(path: Path, blob: storage.Blob) -> bool:
    """Whether the local file is the object: same size and checksum."""
    try:
        if path.stat().st_size != blob.size:
            return False
    except FileNotFoundError:
        return False
    if blob.crc32c:
        return _digest(path, google_crc32c.Checksum()) == blob.crc32c
    if blob.md5_hash:
        return _digest(path, hashlib.md5(usedforsecurity=False)) == blob.md5_hash
    return True  # the object has no checksum: the size is all there is


def _fetch(
    blob: storage.Blob, target: Path, workers: int, chunked_min_bytes: int, chunk_bytes: int
) -> None:
    """Download one object to its place through a temporary name, verified; retried."""
    target.parent.mkdir(parents=True, exist_ok=True)
    part = target.with_name(target.name + PART_SUFFIX)
    for attempt in range(1, ATTEMPTS + 1):
        part.unlink(missing_ok=True)
        if blob.size >= chunked_min_bytes:
            transfer_manager.download_chunks_concurrently(
                blob,
                str(part),
                chunk_size=chunk_bytes,
                worker_type=transfer_manager.THREAD,
                max_workers=workers,
                crc32c_checksum=False,  # verified below, the same way for every file
            )
        else:
            blob.download_to_filename(str(part), checksum=None)
        if matches(part, blob):
            os.replace(part, target)
            return
        log.warning("%s: checksum mismatch (attempt %d of %d)", blob.name, attempt, ATTEMPTS)
    part.unlink(missing_ok=True)
    raise DownloadError(f"gs://{blob.bucket.name}/{blob.name}: checksum mismatch {ATTEMPTS} times")


def download(
    uri: str,
    dest: Path,
    *,
    workers: int = DEFAULT_WORKERS,
    required: str | None = MODEL_CONFIG,
    client: storage.Client | None = None,
    on_progress: Callable[[Progress], None] | None = None,
    every_s: float = 2.0,
    chunked_min_bytes: int = CHUNKED_MIN_BYTES,
    chunk_bytes: int = CHUNK_BYTES,
    max_bytes: int | None = None,
) -> Progress:
    """Mirror `uri` into `dest`: fetch what is missing or does not match, verify everything.

    `max_bytes`: refuse, before fetching anything, a prefix that holds more.
    """
    client = client or make_client()
    blobs = list_objects(client, uri, required)
    total = sum(b.size for b in blobs)
    if max_bytes is not None and total > max_bytes:
        raise TooLarge(f"{uri}: {total} bytes, more than the {max_bytes} allowed")
    _, prefix = split_uri(uri)
    progress = Progress(files_total=len(blobs), bytes_total=sum(b.size for b in blobs))
    for leftover in dest.rglob("*" + PART_SUFFIX) if dest.is_dir() else []:
        leftover.unlink()  # an interrupted run's: never trusted, always fetched anew
    todo: list[tuple[storage.Blob, Path]] = []
    for blob in blobs:
        target = _local_path(dest, relative_name(blob.name, prefix))
        if matches(target, blob):
            progress.files_done += 1
            progress.files_reused += 1
            progress.bytes_done += blob.size
        else:
            todo.append((blob, target))
    finished = threading.Event()
    lock = threading.Lock()
    done_bytes = progress.bytes_done

    def report() -> None:
        while not finished.wait(every_s):
            with lock:
                in_flight = sum(_size(t.with_name(t.name + PART_SUFFIX)) for _, t in todo)
                progress.bytes_done = min(done_bytes + in_flight, progress.bytes_total)
            if on_progress:
                on_progress(progress)

    def one(blob: storage.Blob, target: Path) -> None:
        nonlocal done_bytes
        _fetch(blob, target, workers, chunked_min_bytes, chunk_bytes)
        with lock:
            done_bytes += blob.size
            progress.files_done += 1

    reporter = threading.Thread(target=report, daemon=True)
    reporter.start()
    pool = ThreadPoolExecutor(max_workers=workers)
    try:
        for future in [pool.submit(one, b, t) for b, t in todo]:
            future.result()
    except gexc.GoogleAPIError as e:
        raise DownloadError(f"{uri}: Cloud Storage error: {e}") from None
    finally:
        pool.shutdown(cancel_futures=True)  # one failure: the files not begun are not begun
        finished.set()
        reporter.join()
    progress.bytes_done = done_bytes
    if on_progress:
        on_progress(progress)
    return progress


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0
