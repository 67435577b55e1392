"""Replica health as the monitor saw it last, shared with every gateway worker by a file.

One process (the monitor) polls the engines; K gateway workers read its verdict,
so /ping and /health answer at once, never by waiting on an engine.
"""

from __future__ import annotations

import errno
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import orjson

from engine.files import write_atomic

STATE_FILE = "state.json"
# The monitor writes every second; older than this, it is not reporting. Generous: a
# monitor slowed by a busy machine is not a reason for every caller to get 503, and
# the watchdog restarts a hung monitor sooner (gateway/control/watchdog.py).
STALE_AFTER_S = 45.0

STARTING, READY, DOWN, FAILED = "starting", "ready", "down", "failed"


@dataclass(frozen=True)
class ReplicaState:
    replica: int
    state: str
    device: str
    cause: str | None = None  # why a failed replica cannot start

    def public(self) -> dict[str, object]:
        """As /health shows it: the cause only when there is one."""
        return {k: v for k, v in asdict(self).items() if v is not None}


def write_state(path: Path, replicas: list[ReplicaState], now: float | None = None) -> None:
    """Replace the file whole; on a full disk, overwrite it where it is.

    Its freshness is the monitor's heartbeat (the watchdog and the gateways read
    `updated`), so a disk filled by something else must not stop it: a file of a few
    hundred bytes keeps its block, while the atomic way needs a new file. A reader
    that catches the overwrite half done fails to parse it and keeps its last reading.
    """
    body = {"updated": time.time() if now is None else now}
    body["replicas"] = [r.public() for r in replicas]
    data = orjson.dumps(body)
    try:
        write_atomic(path, data)
    except OSError as e:
        if e.errno != errno.ENOSPC or not path.exists():
            raise
        path.with_name(path.name + ".tmp").unlink(missing_ok=True)  # its blocks back
        with path.open("r+b") as f:
            f.write(data)
            f.truncate()


class StateReader:
    """Re-reads the state file only when it changed; cheap enough for every request."""

    def __init__(self, path: Path, devices: dict[int, str]):
        self._path = path
        self._devices = devices
        self._mtime_ns = -1
        self._updated = 0.0
        self._replicas: list[ReplicaState] = []

    def replicas(self, now: float | None = None) -> list[ReplicaState]:
        try:
            mtime = self._path.stat().st_mtime_ns
            if mtime != self._mtime_ns:
                body = orjson.loads(self._path.read_bytes())
                self._replicas = [ReplicaState(**r) for r in body["replicas"]]
                self._updated = body["updated"]
                self._mtime_ns = mtime
        except (OSError, ValueError, KeyError, TypeError):
            pass
        if (time.time() if now is None else now) - self._updated > STALE_AFTER_S:
            # No fresh verdict: say so rather than repeat an old "ready".
            return [ReplicaState(i, STARTING, d) for i, d in sorted(self._devices.items())]
        return self._replicas
