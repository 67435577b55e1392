"""The gateway workers' watchdog, beside the engines' in the monitor.

supervisord restarts a gateway worker that exits, not one that stops answering
(stopped, deadlocked, its event loop stuck): nginx would keep sending it
requests that hang. Each second every worker's /ping is asked over its own
unix socket; any answer, 503 included, means its loop runs. One that answered
since it started and then has not for HUNG_AFTER_S is killed (its process
group), and supervisord starts it again; nginx meanwhile sends new requests to
the others once the dead socket refuses them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import time
import xmlrpc.client
from pathlib import Path

import aiohttp

from gateway.config import gateway_socket
from gateway.control.liveness import ReplicaWatch

log = logging.getLogger("vgate.monitor")

PROBE_TIMEOUT_S = 1.0
POLL_INTERVAL_S = 1.0
RPC_TIMEOUT_S = 5.0


async def answers(socket_path: Path) -> bool:
    try:
        connector = aiohttp.UnixConnector(path=str(socket_path), force_close=True)
        timeout = aiohttp.ClientTimeout(total=PROBE_TIMEOUT_S)
        async with (
            aiohttp.ClientSession(connector=connector, timeout=timeout) as session,
            session.get("http://gateway/ping") as resp,
        ):
            return resp.status in (200, 503)
    except (aiohttp.ClientError, TimeoutError, OSError):
        return False


def first_watches(count: int, restarted: bool, now: float) -> dict[int, ReplicaWatch]:
    """A restarted monitor takes every worker to have answered just now, so that one
    already hung (the reason the monitor was restarted, perhaps) is killed too, HUNG_AFTER_S
    on. At the container's start a worker must answer once first: it may take a while."""
    return {k: ReplicaWatch(ready_since_start=restarted, last_answer=now) for k in range(count)}


async def watch_gateways(run_dir: Path, processes: object, count: int, restarted: bool) -> None:
    """Forever: probe each gateway worker; kill the hung ones.

    `processes()`: {worker: (supervisord state, pid)} of the gateway programs.
    """
    watches = first_watches(count, restarted, time.monotonic())
    while True:
        try:
            async with asyncio.timeout(RPC_TIMEOUT_S):
                states = await asyncio.to_thread(processes)  # type: ignore[arg-type]
        except (OSError, xmlrpc.client.Error, TimeoutError):
            states = None
        if states is not None:
            probes = await asyncio.gather(
                *(answers(gateway_socket(run_dir, k)) for k in range(count))
            )
            now = time.monotonic()
            for k, ok in enumerate(probes):
                state, pid = states.get(k, (None, 0))
                watches[k].probe(now, state, ok)
                reason = watches[k].restart_reason(now)
                if reason and state == "RUNNING" and pid:
                    log.error(
                        "gateway worker %d: restarting: %s", k, reason.replace("/health", "/ping")
                    )
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(pid, signal.SIGKILL)
                    watches[k] = ReplicaWatch()
        await asyncio.sleep(POLL_INTERVAL_S)
