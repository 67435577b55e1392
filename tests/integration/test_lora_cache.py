"""The LoRA adapter disk cache against a real Cloud Storage API (the emulator)."""

from __future__ import annotations

import http.server
import json
import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import ClassVar

import psutil
import pytest

from engine.lora_cache import (
    ADAPTER_CONFIG,
    NAME,
    AdapterCache,
    AdapterError,
    classify_adapter,
)
from tests import helpers
from tests.gcs_emulator import FaultyFront, client, emulator, upload_dir
from tests.helpers import loopback_http

BUCKET = "adapters"


@pytest.fixture(scope="module")
def storage_url() -> Iterator[str]:
    with emulator() as url:
        yield url


def _adapter(storage_url: str, tmp_path: Path, name: str, size: int = 10_000) -> str:
    source = tmp_path / f"src-{name}"
    source.mkdir()
    (source / ADAPTER_CONFIG).write_text('{"peft_type": "LORA", "r": 8}')
    (source / "adapter_model.safetensors").write_bytes(os.urandom(size))
    upload_dir(client(storage_url), BUCKET, name, source)
    return f"gs://{BUCKET}/{name}"


def _cache(
    root: Path,
    url: str,
    max_bytes: int = 10**9,
    held: set[str] = frozenset(),
    max_adapter_bytes: int = 10**9,
    fetch_timeout_s: float = 120,
) -> AdapterCache:
    """`held`: adapters an engine keeps (release says no); fetches go to `url`."""
    os.environ["STORAGE_EMULATOR_HOST"] = url  # the fetch's child process reads it
    return AdapterCache(
        root,
        max_bytes,
        release=lambda name: name not in held,
        max_adapter_bytes=max_adapter_bytes,
        fetch_timeout_s=fetch_timeout_s,
    )


def test_an_adapter_is_fetched_once_into_the_cache(storage_url: str, tmp_path: Path) -> None:
    uri = _adapter(storage_url, tmp_path, "sql")
    with FaultyFront(storage_url).running() as front:
        cache = _cache(tmp_path / "cache", front.url)
        with cache.pinned(uri) as path:
            assert path == cache.entry(classify_adapter(uri))
            assert (path / ADAPTER_CONFIG).is_file()
        with cache.pinned(uri):
            pass
    assert len(front.downloads) == 2  # its two files, once


def test_concurrent_requests_in_several_processes_fetch_once(
    storage_url: str, tmp_path: Path
) -> None:
    uri = _adapter(storage_url, tmp_path, "shared", size=2_000_000)
    root = tmp_path / "cache"
    code = (
        "import sys; from pathlib import Path; from engine.lora_cache import AdapterCache;"
        "c = AdapterCache(Path(sys.argv[1]), 10**9);"
        "ctx = c.pinned(sys.argv[2]); print(ctx.__enter__()); ctx.__exit__(None, None, None)"
    )
    with FaultyFront(storage_url, latency_s=0.2).running() as front:
        env = {**os.environ, "STORAGE_EMULATOR_HOST": front.url}
        procs = [
            subprocess.Popen(
                [sys.executable, "-c", code, str(root), uri],
                env=env,
                stdout=subprocess.PIPE,
                text=True,
            )
            for _ in range(3)
        ]
        seen_here: list[str] = []

        def in_this_process() -> None:
            with _cache(root, front.url).pinned(uri) as path:
                seen_here.append(str(path))

        here = threading.Thread(target=in_this_process)
        here.start()
        outs = [p.communicate(timeout=120)[0].strip() for p in procs]
        here.join(120)
    assert all(p.returncode == 0 for p in procs)
    entry = AdapterCache(root, 10**9).entry(classify_adapter(uri))
    assert set(outs + seen_here) == {str(entry)} and seen_here
    assert sorted(d.rsplit("/", 1)[-1] for d in front.downloads) == [
        ADAPTER_CONFIG,
        "adapter_model.safetensors",
    ]


def test_least_recently_used_go_first_but_never_one_in_use(
    storage_url: str, tmp_path: Path
) -> None:
    uris = [_adapter(storage_url, tmp_path, f"a{i}", size=100_000) for i in range(4)]
    root = tmp_path / "cache"
    cache = _cache(root, storage_url, max_bytes=250_000, held={uris[1]})

    def cached() -> list[str]:
        return [(p / NAME).read_text().rsplit("/", 1)[-1] for p in cache.entries()]

    for uri in uris[:3]:
        with cache.pinned(uri):
            pass
    # a0 was used first and let go of: evicted; an engine still holds a1.
    assert cached() == ["a1", "a2"]
    with cache.pinned(uris[2]):  # a2 in use by a request while a3 comes and goes
        with cache.pinned(uris[3]):
            assert set(cached()) == {"a1", "a2", "a3"}
        # Over budget: a1 is held, a2 in use, so a3, the only one free, went.
        assert set(cached()) == {"a1", "a2"}
    assert (cache.entry(classify_adapter(uris[2])) / ADAPTER_CONFIG).is_file()


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("gs://adapters/../etc", "not a valid gs://bucket/path URI"),
        ("gs://adapters/p/", "write it as 'gs://adapters/p'"),
        ("gs://adapters//p", "write it as 'gs://adapters/p'"),
        ("gs://Bad_Bucket/p", "not a valid gs://bucket/path URI"),
        ("gs://adapters", "not a valid gs://bucket/path URI"),
        ("/srv/adapters/../x", "write it as '/srv/x'"),
        ("/srv//x/", "write it as '/srv/x'"),
        ("org/.", "give gs://bucket/path"),
        ("http://x/y", "give gs://bucket/path, an absolute local path, or a Hugging Face repo id"),
        ("org/..", "give gs://bucket/path"),
        ("../../etc/passwd", "give gs://bucket/path"),
    ],
)
def test_names_are_validated(name: str, message: str) -> None:
    with pytest.raises(AdapterError, match=re.escape(message)):
        classify_adapter(name)


def test_missing_and_broken_adapters_say_which(storage_url: str, tmp_path: Path) -> None:
    cache = _cache(tmp_path / "cache", storage_url)
    with pytest.raises(AdapterError, match=f"gs://{BUCKET}/none: no objects under this prefix"):
        cache.pinned(f"gs://{BUCKET}/none").__enter__()
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "weights.bin").write_bytes(b"x")
    upload_dir(client(storage_url), BUCKET, "broken", tmp_path / "src")
    with pytest.raises(AdapterError, match=f"no {ADAPTER_CONFIG} under this prefix"):
        cache.pinned(f"gs://{BUCKET}/broken").__enter__()
    with pytest.raises(AdapterError, match=f"no {ADAPTER_CONFIG} in that directory"):
        cache.pinned(str(tmp_path / "src")).__enter__()
    assert not cache.entries()


def test_a_local_adapter_is_used_where_it_is(tmp_path: Path) -> None:
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / ADAPTER_CONFIG).write_text("{}")
    with AdapterCache(tmp_path / "cache", 10).pinned(str(tmp_path / "mine")) as path:
        assert path == tmp_path / "mine"


def test_an_adapter_over_the_size_cap_is_refused_before_any_fetch(
    storage_url: str, tmp_path: Path
) -> None:
    uri = _adapter(storage_url, tmp_path, "huge", size=50_000)
    with FaultyFront(storage_url).running() as front:
        cache = _cache(tmp_path / "cache", front.url, max_adapter_bytes=20_000)
        too_large = r"more than the 20000 allowed \(--lora-max-bytes\)"
        with pytest.raises(AdapterError, match=too_large), cache.pinned(uri):
            pass
    assert not any(p.endswith(".safetensors") for p in front.downloads)  # listed, not fetched
    assert not cache.entry(classify_adapter(uri)).exists()


def test_a_failed_fetch_leaves_nothing_behind(storage_url: str, tmp_path: Path) -> None:
    uri = _adapter(storage_url, tmp_path, "broken")
    name = "broken/adapter_model.safetensors"
    with FaultyFront(storage_url, corrupt_objects={name}).running() as front:
        cache = _cache(tmp_path / "cache", front.url)
        with pytest.raises(AdapterError, match="checksum mismatch"), cache.pinned(uri):
            pass
    assert not cache.entry(classify_adapter(uri)).exists()


def test_a_fetch_past_its_time_cap_is_stopped(storage_url: str, tmp_path: Path) -> None:
    uri = _adapter(storage_url, tmp_path, "slow")
    # Every request to the front waits a minute: no fetch ends within 2 s at any speed.
    with FaultyFront(storage_url, latency_s=60).running() as front:
        cache = _cache(tmp_path / "cache", front.url, fetch_timeout_s=2)
        started = time.monotonic()
        stopped = r"not fetched within 2 s \(--lora-fetch-timeout\)"
        with pytest.raises(AdapterError, match=stopped), cache.pinned(uri):
            pass
        assert time.monotonic() - started < 30
    fetches = [
        p for p in psutil.Process().children(recursive=True) if "engine.lora_cache" in p.cmdline()
    ]
    assert not fetches  # the fetch's process is gone
    assert not cache.entry(classify_adapter(uri)).exists()


def test_a_full_disk_is_that_requests_error(
    storage_url: str, tmp_path: Path, small_disk: Path
) -> None:
    uri = _adapter(storage_url, tmp_path, "big", size=400_000)
    cache = _cache(small_disk, storage_url)  # 256 KiB of disk, a budget of a gigabyte
    with pytest.raises(AdapterError, match="no space left on the adapter cache's disk"):
        cache.pinned(uri).__enter__()
    assert not cache.entry(classify_adapter(uri)).exists()
    small = _adapter(storage_url, tmp_path, "small", size=10_000)
    with cache.pinned(small) as path:  # the space the failed fetch took is free again
        assert (path / ADAPTER_CONFIG).is_file()


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    with helpers.small_disk(tmp_path, "256k") as disk:
        yield disk


class _Hub(http.server.BaseHTTPRequestHandler):
    """A Hugging Face hub stand-in: the API's metadata of one repo whose adapter weights
    are larger than the cap; requests for a file (outside /api/) are counted."""

    file_requests: ClassVar[list[str]] = []
    weights_bytes = 50_000

    def _answer(self) -> None:
        path = self.path.split("?")[0]
        files = [  # (name, size, LFS): the README is large but no adapter file
            (ADAPTER_CONFIG, 30, False),
            ("adapter_model.safetensors", self.weights_bytes, True),
            ("README.md", 10**12, False),
        ]
        if path.startswith("/api/models/org/big-adapter/tree/"):  # list_repo_tree
            body: object = [
                {"type": "file", "path": name, "size": size, "oid": "b" * 40}
                | ({"lfs": {"oid": "d" * 64, "size": size, "pointerSize": 134}} if lfs else {})
                for name, size, lfs in files
            ]
        elif path.startswith("/api/models/org/big-adapter"):  # model_info / repo_info
            siblings = [
                {"rfilename": name, "size": size, "blobId": "b" * 40}
                | ({"lfs": {"sha256": "d" * 64, "size": size, "pointerSize": 134}} if lfs else {})
                for name, size, lfs in files
            ]
            body = {"id": "org/big-adapter", "sha": "a" * 40, "siblings": siblings}
        else:
            body = None
            if not path.startswith("/api/"):  # the hub's other API calls are no file
                type(self).file_requests.append(self.path)
        if body is not None:
            raw = json.dumps(body).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
        else:
            raw = b"x"
            self.send_response(200)
        self.send_header("Content-Length", str(len(raw)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(raw)

    do_GET = do_HEAD = _answer

    def log_message(self, *args: object) -> None:
        pass


def test_a_hugging_face_adapter_over_the_cap_is_refused_from_the_hub_metadata(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    hub = type("Hub", (_Hub,), {"file_requests": []})
    with loopback_http(hub) as port:
        monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")  # the fetch's child reads it
        monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        cache = AdapterCache(tmp_path / "cache", 10**9, max_adapter_bytes=20_000)
        # The config and the weights; the README is large too, but no adapter file.
        too_large = r"^adapter 'org/big-adapter': 50030 bytes, more than the 20000 allowed"
        with pytest.raises(AdapterError, match=too_large + r" \(--lora-max-bytes\)$"):
            cache.pinned("org/big-adapter").__enter__()
    assert hub.file_requests == []  # sized from the metadata: no file was asked for
    assert not cache.entry(classify_adapter("org/big-adapter")).exists()
