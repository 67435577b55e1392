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
from engine.workers import EngineList, EngineWorker

STATE_FILE = "state.json"
# The monitor writes every second; older than this, it is not reporting. Generous: a
# monitor slowed by a busy machine is not a reason for every caller to get 503, and
# the watchdog restarts a hung monitor sooner (gateway/control/watchdog.py).
STALE_AFTER_S = 45.0

STARTING, READY, DOWN, FAILED = "starting", "ready", "down", "failed"
# Removed by /update_models: nginx no longer routes to it; it finishes what it has, then stops.
DRAINING = "draining"


@dataclass(frozen=True)
class ReplicaState:
    replica: int
    state: str
    device: str
    cause: str | None = None  # why a failed replica cannot start
    model: str = ""  # the name it serves (its --served-model-name)

    def public(self) -> dict[str, object]:
        """As /health shows it: the cause (and the model) only when there is one."""
        return {k: v for k, v in asdict(self).items() if v is not None and v != ""}


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

    def __init__(self, path: Path, devices: dict[int, str], models: dict[int, str] | None = None):
        self._path = path
        self.set_engines(devices, models or {})
        self._mtime_ns = -1
        self._updated = 0.0
        self._replicas: list[ReplicaState] = []

    def set_engines(self, devices: dict[int, str], models: dict[int, str]) -> None:
        """The engines as engines.json lists them (an update may change them)."""
        self._devices = devices
        self._models = models

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
            return [
                ReplicaState(i, STARTING, device, model=self._models.get(i, ""))
                for i, device in sorted(self._devices.items())
            ]
        return self._replicas


class EngineStates:
    """The monitor's verdict on the engines engines.json lists now."""

    def __init__(self, engines: EngineList, path: Path):
        self._engines = engines
        self._reader = StateReader(path, {})
        self._seen: list[EngineWorker] | None = None

    def replicas(self, now: float | None = None) -> list[ReplicaState]:
        workers = self._engines.workers()
        if workers is not self._seen:
            self._seen = workers
            devices = {w.replica: w.device for w in workers}
            self._reader.set_engines(devices, {w.replica: w.model for w in workers})
        return self._reader.replicas(now)
