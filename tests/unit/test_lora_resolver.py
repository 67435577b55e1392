"""The LoRA resolver plugin: how often it looks for the adapter vLLM is loading (review
M10), which names it refuses, and how it makes the engines let go of one."""

from __future__ import annotations

import asyncio
import http.server
import itertools
import json
import threading
import time
from pathlib import Path
from typing import ClassVar

import pytest

from engine import lora_resolver
from engine.lora_cache import AdapterPolicy
from engine.lora_resolver import PIN_AFTER_RESOLVE_S, _resolver, poll_delays
from engine.workers import EngineWorker, save_workers
from tests.helpers import free_port, loopback_http


@pytest.mark.parametrize("total", [0.1, 1.0, 7.0, PIN_AFTER_RESOLVE_S])
def test_looks_come_ever_further_apart_within_the_pin(total: float) -> None:
    delays = poll_delays(total)
    assert sum(delays) == pytest.approx(total)
    assert all(d > 0 for d in delays)
    assert all(b == 2 * a for a, b in itertools.pairwise(delays[:-1]))  # the last: the rest
    assert delays[0] == min(0.25, total)  # a quick load is seen at once


def test_an_adapter_that_never_loads_costs_a_few_looks() -> None:
    assert len(poll_delays(PIN_AFTER_RESOLVE_S)) <= 8  # was 120, each on every engine


class _NoFetch:
    """A cache that must not be asked: a refused name fetches nothing."""

    asked: list[str]

    def __init__(self) -> None:
        self.asked = []

    def pinned(self, name: str) -> object:
        self.asked.append(name)
        raise AssertionError(f"fetched {name!r}")


@pytest.mark.parametrize("name", ["gs://bkt/" + "a" * 248, "gs://bkt/a b", "org/x\n"])
def test_the_resolver_refuses_unbounded_names_without_a_fetch(name: str) -> None:
    cache = _NoFetch()
    resolver = _resolver(cache, AdapterPolicy())  # type: ignore[arg-type]
    assert asyncio.run(resolver.resolve_lora("base", name)) is None  # vLLM: 404
    assert cache.asked == []


class _Engine(http.server.BaseHTTPRequestHandler):
    """An engine's unload route answering `status`, or not answering at all (0)."""

    status = 200
    release: ClassVar[threading.Event]
    asked: ClassVar[list[tuple[str, dict]]] = []

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).asked.append((self.path, body))
        if self.status == 0:
            self.release.wait(30)  # past the unload's timeout; let go when the test ends
            return
        self.send_response(self.status)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"{}")

    def log_message(self, *args: object) -> None:
        pass


@pytest.mark.parametrize(
    ("status", "unloaded"),
    [
        (200, True),  # let go of it
        (404, True),  # never had it
        (500, False),  # may still hold it: the files stay
        (0, False),  # no answer in time: the same
    ],
)
def test_unload_everywhere_fails_closed(
    status: int, unloaded: bool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine = type(
        "Engine", (_Engine,), {"status": status, "asked": [], "release": threading.Event()}
    )
    monkeypatch.setattr(lora_resolver, "UNLOAD_TIMEOUT_S", 0.5)
    try:
        with loopback_http(engine) as port:
            save_workers([EngineWorker(0, port, "cpu:0", [])], tmp_path / "engines.json")
            monkeypatch.setenv("VGATE_RUN_DIR", str(tmp_path))
            started = time.monotonic()
            assert lora_resolver.unload_everywhere("gs://bkt/sql") is unloaded
            assert time.monotonic() - started < 5
    finally:
        engine.release.set()
    assert engine.asked == [("/v1/unload_lora_adapter", {"lora_name": "gs://bkt/sql"})]


def test_an_engine_that_is_not_running_holds_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    save_workers([EngineWorker(0, free_port(), "cpu:0", [])], tmp_path / "engines.json")
    monkeypatch.setenv("VGATE_RUN_DIR", str(tmp_path))
    assert lora_resolver.unload_everywhere("gs://bkt/sql") is True  # connection refused
