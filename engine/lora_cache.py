"""LoRA adapters by name, on a bounded LRU disk cache shared by every engine process.

A name is `gs://bucket/path`, a local directory, or a Hugging Face repo id
(`org/name`); nothing else is fetched. Fetched adapters live under the cache
root at a path made from the name and checked to stay inside it. An exclusive
file lock per adapter makes concurrent requests (in any process) fetch it once;
a shared lock pins it while it is being handed to an engine; eviction (least
recently used first, down to the byte budget) skips pinned adapters and those
an engine still has loaded, because vLLM may read an adapter's files again
whenever it reloads it.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from engine.gcs import DownloadError, TooLarge, download, is_gcs, split_uri

log = logging.getLogger("vgate.lora")

ADAPTER_CONFIG = "adapter_config.json"
COMPLETE = ".vgate-complete"  # written last: the entry is whole; its mtime is the last use
LOCKS = ".locks"
HF_REPO = re.compile(r"^[A-Za-z0-9][\w.-]{0,95}/[\w.-]{1,96}$")
# What of a Hugging Face repo an adapter needs: never a whole model's weights.
ADAPTER_FILES = ["adapter_config.json", "adapter_model.safetensors", "adapter_model.bin", "*.json"]
DEFAULT_ADAPTER_BYTES = 4 * 1024**3


class AdapterError(ValueError):
    """A name that cannot be an adapter, or one that cannot be fetched; says which and why."""


@dataclass(frozen=True)
class AdapterSource:
    kind: str  # "gcs", "local" or "hf"
    name: str


@dataclass(frozen=True)
class AdapterPolicy:
    """Which adapter sources a client may name (`--allowed-lora-sources`).

    `allowed`: prefixes, `gs://bucket/prefix/`, a Hugging Face `org/` or `org/name`,
    a local `/dir/`. None is Google's container's rule: any gs:// URI and any Hugging
    Face id, and no local path (local adapters are the operator's --lora-modules).
    """

    allowed: tuple[str, ...] | None = None

    def check(self, source: AdapterSource) -> None:
        if self.allowed is None:
            ok = source.kind != "local"
        else:
            name = os.path.normpath(source.name) if source.kind == "local" else source.name
            ok = any(_within(name, prefix) for prefix in self.allowed)
        if not ok:
            raise AdapterError(
                f"adapter {source.name!r} is not allowed here (--allowed-lora-sources)"
            )


def _within(name: str, prefix: str) -> bool:
    """`org/name` matches itself only; a prefix ending in / matches what is below it."""
    return name == prefix if not prefix.endswith("/") else name.startswith(prefix)


POLICY_ENV = "VGATE_ENGINE_ALLOWED_LORA_SOURCES"  # for the engines' resolver: JSON, or unset


def policy_from_env() -> AdapterPolicy:
    raw = os.environ.get(POLICY_ENV)
    return AdapterPolicy(None if not raw else tuple(json.loads(raw)))


def classify_adapter(name: str) -> AdapterSource:
    """What kind of name this is, without touching the network."""
    if is_gcs(name):
        try:
            split_uri(name)
        except DownloadError as e:
            raise AdapterError(str(e)) from None
        return AdapterSource("gcs", name)
    if name.startswith("/"):
        return AdapterSource("local", name)
    if HF_REPO.match(name) and ".." not in name:
        return AdapterSource("hf", name)
    raise AdapterError(
        f"adapter {name!r}: give gs://bucket/path, an absolute local path, "
        "or a Hugging Face repo id"
    )


class AdapterCache:
    def __init__(
        self,
        root: Path,
        max_bytes: int,
        loaded: Callable[[], set[str]] = set,
        fetch_gcs: Callable[[str, Path, int], object] | None = None,
        max_adapter_bytes: int = DEFAULT_ADAPTER_BYTES,
    ) -> None:
        """`loaded`: names the engines have loaded now (never evicted).

        `max_adapter_bytes` (--lora-max-bytes): a larger adapter is refused, a gs:// one
        before anything is fetched.
        """
        self.root = root
        self.max_bytes = max_bytes
        self.max_adapter_bytes = max_adapter_bytes
        self._loaded = loaded
        self._fetch_gcs = fetch_gcs or (
            lambda uri, dest, limit: download(
                uri, dest, required=ADAPTER_CONFIG, workers=8, max_bytes=limit
            )
        )
        (root / LOCKS).mkdir(parents=True, exist_ok=True)

    def entry(self, source: AdapterSource) -> Path:
        """The adapter's directory in the cache; never outside the root."""
        if source.kind == "gcs":
            bucket, prefix = split_uri(source.name)
            path = self.root.joinpath("gcs", bucket, *prefix.split("/"))
        else:
            path = self.root.joinpath("hf", *source.name.split("/"))
        root = self.root.resolve()
        if not path.resolve().is_relative_to(root) or path.resolve() == root:
            raise AdapterError(f"adapter {source.name!r}: resolves outside the adapter cache")
        return path

    @contextlib.contextmanager
    def pinned(self, name: str) -> Iterator[Path]:
        """The adapter's local directory, fetched if needed, not evicted while the block runs."""
        source = classify_adapter(name)
        if source.kind == "local":
            path = Path(name).resolve()
            if not (path / ADAPTER_CONFIG).is_file():
                raise AdapterError(f"adapter {name!r}: no {ADAPTER_CONFIG} in that directory")
            yield path
            return
        entry = self.entry(source)
        with self._lock(entry) as lock:
            while True:
                fcntl.flock(lock, fcntl.LOCK_EX)  # one fetch, whichever process asks first
                if not (entry / COMPLETE).exists():
                    self._fetch(source, entry)
                (entry / COMPLETE).touch()  # complete, and its last use is now
                # Others may use it too now, none may evict it. The change to a shared
                # lock is not atomic: an eviction may slip in between; then fetch again.
                fcntl.flock(lock, fcntl.LOCK_SH)
                if (entry / COMPLETE).exists():
                    break
            try:
                yield entry
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)
        self.evict()

    def _fetch(self, source: AdapterSource, entry: Path) -> None:
        """Fetch into `entry`; on any failure nothing of it is left (it counts in no budget)."""
        log.info("adapter %s: fetching into %s", source.name, entry)
        try:
            self._fetch_into(source, entry)
        except BaseException:
            shutil.rmtree(entry, ignore_errors=True)
            raise

    def _fetch_into(self, source: AdapterSource, entry: Path) -> None:
        limit = self.max_adapter_bytes
        try:
            if source.kind == "gcs":
                self._fetch_gcs(source.name, entry, limit)
            else:
                from huggingface_hub import snapshot_download

                snapshot_download(source.name, local_dir=entry, allow_patterns=ADAPTER_FILES)
        except TooLarge as e:
            raise AdapterError(f"adapter {e} (--lora-max-bytes)") from None
        except DownloadError as e:
            raise AdapterError(f"adapter {e}") from None
        except Exception as e:  # the hub client's many errors: say which
            raise AdapterError(f"adapter {source.name!r}: {type(e).__name__}: {e}") from None
        if _size(entry) > limit:  # the hub's files, seen only once here
            raise AdapterError(
                f"adapter {source.name!r}: more than {limit} bytes (--lora-max-bytes)"
            )
        if not (entry / ADAPTER_CONFIG).is_file():
            raise AdapterError(f"adapter {source.name!r}: no {ADAPTER_CONFIG}")

    def _lock(self, entry: Path) -> contextlib.AbstractContextManager:
        key = hashlib.sha256(str(entry.relative_to(self.root)).encode()).hexdigest()[:32]
        return (self.root / LOCKS / f"{key}.lock").open("a+")

    def entries(self) -> list[Path]:
        """Complete entries, least recently used first."""
        done = [p.parent for p in self.root.glob(f"*/**/{COMPLETE}")]
        return sorted(done, key=lambda p: (p / COMPLETE).stat().st_mtime)

    def evict(self) -> list[Path]:
        """Remove least recently used adapters until the cache fits; skip those in use."""
        entries = self.entries()
        sizes = {e: _size(e) for e in entries}
        total = sum(sizes.values())
        if total <= self.max_bytes:
            return []
        loaded = self._loaded()
        removed = []
        for entry in entries:
            if total <= self.max_bytes:
                break
            if self._name_of(entry) in loaded:
                continue
            with self._lock(entry) as lock:
                try:
                    fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    continue  # pinned by a request right now
                (entry / COMPLETE).unlink(missing_ok=True)
                shutil.rmtree(entry, ignore_errors=True)
                fcntl.flock(lock, fcntl.LOCK_UN)
            total -= sizes[entry]
            removed.append(entry)
            log.info("adapter cache: evicted %s", entry)
        if total > self.max_bytes:
            log.warning(
                "adapter cache over budget (%d > %d bytes): all in use", total, self.max_bytes
            )
        return removed

    def _name_of(self, entry: Path) -> str:
        kind, *parts = entry.relative_to(self.root).parts
        return "gs://" + "/".join(parts) if kind == "gcs" else "/".join(parts)


def _size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def cache_from_env(loaded: Callable[[], set[str]] = set) -> AdapterCache | None:
    """The cache `vgate serve` configured for the engines, if any.

    Its own names (VGATE_ENGINE_LORA_CACHE_*), set only in the engines' environment:
    vLLM also loads this plugin in `vgate serve` itself, when its parser reads the
    engine flags, where the user's VGATE_LORA_CACHE_* settings may be set.
    """
    root = os.environ.get("VGATE_ENGINE_LORA_CACHE_DIR")
    if not root:
        return None
    limit = int(os.environ.get("VGATE_ENGINE_LORA_MAX_BYTES", DEFAULT_ADAPTER_BYTES))
    budget = int(os.environ["VGATE_ENGINE_LORA_CACHE_BYTES"])
    return AdapterCache(Path(root), budget, loaded, max_adapter_bytes=limit)
