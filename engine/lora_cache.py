"""LoRA adapters by name, on a bounded LRU disk cache shared by every engine process.

A name is `gs://bucket/path`, a local directory, or a Hugging Face repo id
(`org/name`), each in one canonical spelling; nothing else is fetched. Each
fetched adapter has a directory of its own named by a hash of its name (so no
name can reach outside the root or into another's files). Fetches run in a
child process that is killed at the time cap. An exclusive file lock per
adapter makes concurrent requests (in any process) fetch it once; a shared lock
pins it while it is being handed to an engine; eviction (least recently used
first, down to the byte budget) skips pinned adapters and removes the others
only once every engine has let go of them (`release`: vLLM reads an adapter's
files again whenever it reloads it).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from engine.gcs import DownloadError, TooLarge, download, is_gcs, split_uri

log = logging.getLogger("vgate.lora")

ADAPTER_CONFIG = "adapter_config.json"
COMPLETE = ".vgate-complete"  # written last: the entry is whole; its mtime is the last use
NAME = ".vgate-name"  # the adapter's name, in its entry
ENTRIES = "adapters"
LOCKS = ".locks"
GCS_BUCKET = re.compile(r"^[a-z0-9][a-z0-9._-]{1,220}[a-z0-9]$")
MAX_NAME_CHARS = 256
NAME_CHARS = re.compile(r"[A-Za-z0-9._\-/:+=@~]+")
HF_REPO = re.compile(r"^[A-Za-z0-9][\w.-]{0,95}/[\w.-]{1,96}$")
# What of a Hugging Face repo an adapter needs: never a whole model's weights.
ADAPTER_FILES = ["adapter_config.json", "adapter_model.safetensors", "adapter_model.bin", "*.json"]
DEFAULT_ADAPTER_BYTES = 4 * 1024**3
DEFAULT_FETCH_TIMEOUT_S = 600


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


def check_adapter_name(name: str) -> None:
    """Any adapter name a client sends, a --lora-modules one included, is bounded.

    vLLM keeps a lock for every name it is asked to resolve, for good; HF ids, gs://
    URIs and paths need no more than this.
    """
    if len(name) > MAX_NAME_CHARS:
        raise AdapterError(f"adapter {name[:32]!r}...: at most {MAX_NAME_CHARS} characters")
    if not NAME_CHARS.fullmatch(name):
        raise AdapterError(f"adapter {name!r}: only letters, digits and . _ - / : + = @ ~")


def classify_adapter(name: str) -> AdapterSource:
    """What kind of name this is, without touching the network."""
    check_adapter_name(name)
    if is_gcs(name):
        try:
            bucket, prefix = split_uri(name)
        except DownloadError as e:
            raise AdapterError(str(e)) from None
        if not GCS_BUCKET.match(bucket) or not prefix:
            raise AdapterError(f"adapter {name!r}: not a valid gs://bucket/path URI")
        return AdapterSource("gcs", _canonical(name, f"gs://{bucket}/{prefix}"))
    if name.startswith("/"):
        return AdapterSource("local", _canonical(name, os.path.normpath(name)))
    if HF_REPO.match(name) and not {".", ".."} & set(name.split("/")):
        return AdapterSource("hf", name)
    raise AdapterError(
        f"adapter {name!r}: give gs://bucket/path, an absolute local path, "
        "or a Hugging Face repo id"
    )


def _canonical(name: str, canonical: str) -> str:
    """One spelling per adapter: vLLM keeps adapters by name, and so does the cache."""
    if name != canonical:
        raise AdapterError(f"adapter {name!r}: write it as {canonical!r}")
    return name


class AdapterCache:
    def __init__(
        self,
        root: Path,
        max_bytes: int,
        release: Callable[[str], bool] = lambda name: True,
        max_adapter_bytes: int = DEFAULT_ADAPTER_BYTES,
        fetch_timeout_s: float = DEFAULT_FETCH_TIMEOUT_S,
    ) -> None:
        """`release(name)`: make every engine let go of an adapter before it is evicted;
        False when one may still hold it (then it stays).

        `max_adapter_bytes` (--lora-max-bytes): a larger adapter is refused before
        anything is fetched (from a gs:// listing or the hub's metadata).
        `fetch_timeout_s` (--lora-fetch-timeout): a fetch still running then is stopped.
        """
        self.root = root
        self.max_bytes = max_bytes
        self.max_adapter_bytes = max_adapter_bytes
        self.fetch_timeout_s = fetch_timeout_s
        self._release = release
        (root / LOCKS).mkdir(parents=True, exist_ok=True)
        (root / ENTRIES).mkdir(exist_ok=True)

    def entry(self, source: AdapterSource) -> Path:
        """The adapter's directory in the cache, its own whatever the name."""
        return self.root / ENTRIES / hashlib.sha256(source.name.encode()).hexdigest()[:40]

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
        """Fetch into `entry` in a child process, stopped at the time cap; on any failure
        nothing of it is left (it counts in no budget)."""
        log.info("adapter %s: fetching", source.name)
        argv = [sys.executable, "-m", __name__, source.kind, source.name, str(entry)]
        argv.append(str(self.max_adapter_bytes))
        child = subprocess.Popen(
            argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, process_group=0
        )
        try:
            _, err = child.communicate(timeout=self.fetch_timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(child.pid, signal.SIGKILL)
            child.wait()
            shutil.rmtree(entry, ignore_errors=True)
            raise AdapterError(
                f"adapter {source.name!r}: not fetched within {self.fetch_timeout_s:g} s "
                "(--lora-fetch-timeout)"
            ) from None
        except BaseException:
            os.killpg(child.pid, signal.SIGKILL)
            child.wait()
            shutil.rmtree(entry, ignore_errors=True)
            raise
        if child.returncode != 0:
            shutil.rmtree(entry, ignore_errors=True)
            lines = err.strip().splitlines() or [f"fetch exited with {child.returncode}"]
            raise AdapterError(lines[-1])
        (entry / NAME).write_text(source.name)

    def _lock(self, entry: Path) -> contextlib.AbstractContextManager:
        return (self.root / LOCKS / f"{entry.name}.lock").open("a+")

    def entries(self) -> list[Path]:
        """Complete entries, least recently used first."""
        done = [p.parent for p in (self.root / ENTRIES).glob(f"*/{COMPLETE}")]
        return sorted(done, key=lambda p: (p / COMPLETE).stat().st_mtime)

    def evict(self) -> list[Path]:
        """Remove least recently used adapters until the cache fits; skip those in use."""
        entries = self.entries()
        sizes = {e: _size(e) for e in entries}
        total = sum(sizes.values())
        if total <= self.max_bytes:
            return []
        removed = []
        for entry in entries:
            if total <= self.max_bytes:
                break
            with self._lock(entry) as lock:
                try:
                    fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    continue  # pinned by a request right now
                # Held: a request for it now waits here, then fetches it again.
                if not self._release((entry / NAME).read_text()):
                    continue  # an engine may still read it
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


def fetch_into(source: AdapterSource, entry: Path, limit: int) -> None:
    """The fetch itself, run in the child process."""
    try:
        if source.kind == "gcs":
            download(source.name, entry, required=ADAPTER_CONFIG, workers=8, max_bytes=limit)
        else:
            from huggingface_hub import snapshot_download

            revision = _hub_check_size(source.name, limit)
            snapshot_download(
                source.name, revision=revision, local_dir=entry, allow_patterns=ADAPTER_FILES
            )
    except AdapterError:
        raise
    except TooLarge as e:
        raise AdapterError(f"adapter {e} (--lora-max-bytes)") from None
    except DownloadError as e:
        raise AdapterError(f"adapter {e}") from None
    except Exception as e:  # the hub client's many errors: say which
        if _no_space(e):
            raise AdapterError(
                f"adapter {source.name!r}: no space left on the adapter cache's disk"
            ) from None
        raise AdapterError(f"adapter {source.name!r}: {type(e).__name__}: {e}") from None
    if _size(entry) > limit:  # the hub's metadata said less: not trusted blind
        raise AdapterError(f"adapter {source.name!r}: more than {limit} bytes (--lora-max-bytes)")
    if not (entry / ADAPTER_CONFIG).is_file():
        raise AdapterError(f"adapter {source.name!r}: no {ADAPTER_CONFIG}")


def _hub_check_size(repo_id: str, limit: int) -> str:
    """The commit to fetch, once the hub's metadata says its adapter files fit in `limit`.

    Sized before any byte is fetched (as a gs:// listing is), and fetched at that very
    commit, so a branch moved in between cannot bring other files.
    """
    from huggingface_hub import HfApi
    from huggingface_hub.utils import filter_repo_objects

    info = HfApi().model_info(repo_id, files_metadata=True)
    files = {s.rfilename: s for s in info.siblings or []}
    total = 0
    for name in filter_repo_objects(list(files), allow_patterns=ADAPTER_FILES):
        sibling = files[name]
        size = sibling.lfs.size if sibling.lfs is not None else sibling.size
        if size is None:  # not said: not fetched blind
            raise AdapterError(f"adapter {repo_id!r}: the hub did not give the size of {name}")
        total += size
    if total > limit:
        raise AdapterError(
            f"adapter {repo_id!r}: {total} bytes, more than the {limit} allowed (--lora-max-bytes)"
        )
    if not info.sha:
        raise AdapterError(f"adapter {repo_id!r}: the hub did not give a commit")
    return info.sha


def _no_space(error: BaseException | None) -> bool:
    while error is not None:
        if isinstance(error, OSError) and error.errno == errno.ENOSPC:
            return True
        error = error.__cause__ or error.__context__
    return False


def _size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def cache_from_env(release: Callable[[str], bool]) -> AdapterCache | None:
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
    timeout = float(os.environ.get("VGATE_ENGINE_LORA_FETCH_TIMEOUT", DEFAULT_FETCH_TIMEOUT_S))
    return AdapterCache(Path(root), budget, release, limit, timeout)


def main(argv: list[str]) -> int:
    """The fetch's child process: KIND NAME ENTRY LIMIT; the cause on stderr's last line."""
    kind, name, entry, limit = argv
    try:
        fetch_into(AdapterSource(kind, name), Path(entry), int(limit))
    except AdapterError as e:
        print(str(e).replace("\n", " "), file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
