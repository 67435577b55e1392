"""The monitor's run loop on a full disk: its files cannot be written, and it goes on."""

from __future__ import annotations

import asyncio
import errno
import logging
from pathlib import Path

import pytest

from engine.workers import EngineWorker
from gateway.control import monitor
from gateway.engine_schema import SCHEMA_FILE
from gateway.state import READY, ReplicaState

POLLS = 4


def _full_disk(*args: object, **kwargs: object) -> None:
    raise OSError(errno.ENOSPC, "No space left on device")


def test_a_full_disk_does_not_end_the_monitor(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    worker = EngineWorker(0, 1, "cpu:0", [])
    (tmp_path / SCHEMA_FILE).write_text("{}")  # the engines' schema is known already
    polls = 0
    enough = asyncio.Event()

    async def poll_once(*args: object) -> list[ReplicaState]:
        nonlocal polls
        polls += 1
        if polls > POLLS:
            enough.set()
        return [ReplicaState(0, READY, "cpu:0")]

    async def watch_gateways(*args: object, **kwargs: object) -> None:
        # The loop runs while this does: let it go POLLS times, with a deadline.
        await asyncio.wait_for(enough.wait(), 30)

    monkeypatch.setenv("VGATE_GATEWAY_WORKERS", "1")
    monkeypatch.setattr(monitor.EngineList, "workers", lambda self: [worker])
    monkeypatch.setattr(monitor.EngineList, "refresh", lambda self: False)
    monkeypatch.setattr(monitor, "poll_once", poll_once)
    monkeypatch.setattr(monitor, "watch_gateways", watch_gateways)
    monkeypatch.setattr(monitor, "write_state", _full_disk)
    monkeypatch.setattr(monitor, "write_upstream", _full_disk)
    monkeypatch.setattr(monitor, "POLL_INTERVAL_S", 0.01)
    with caplog.at_level(logging.WARNING, logger="vgate.monitor"):
        asyncio.run(monitor.run(tmp_path))  # ends when the watch does, not with an error
    assert polls > POLLS
    full = [r.getMessage() for r in caplog.records if "No space left" in r.getMessage()]
    # Once per kind, not once per poll.
    assert len(full) == 2, full
    assert any(m.startswith("state file not written") for m in full)
    assert any(m.startswith("nginx upstream file not written") for m in full)
