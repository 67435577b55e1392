"""The monitor's state file on a real full disk: its heartbeat goes on."""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest

from gateway.state import READY, STARTING, ReplicaState, StateReader, write_state
from tests import helpers


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    with helpers.small_disk(tmp_path, "64k") as disk:
        yield disk


def _fill(disk: Path) -> None:
    """Take every free byte, as an adapter cache or a log that ran away would."""
    fd = os.open(disk / "filler", os.O_WRONLY | os.O_CREAT)
    try:
        with contextlib.suppress(OSError):
            while True:
                os.write(fd, b"\0" * 4096)
    finally:
        os.close(fd)
    with pytest.raises(OSError) as full:
        (disk / "probe").write_bytes(b"x" * 4096)
    assert full.value.errno == errno.ENOSPC


def test_the_state_file_is_still_written_on_a_full_disk(small_disk: Path) -> None:
    path = small_disk / "state.json"
    write_state(path, [ReplicaState(0, STARTING, "cpu:0")], now=1.0)
    _fill(small_disk)
    write_state(path, [ReplicaState(0, READY, "cpu:0"), ReplicaState(1, READY, "cpu:1")])
    body = orjson.loads(path.read_bytes())
    assert body["updated"] > 1.0  # the heartbeat moved on
    assert [r.state for r in StateReader(path, {0: "cpu:0", 1: "cpu:1"}).replicas()] == [
        READY,
        READY,
    ]
