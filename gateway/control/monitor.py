"""The health monitor: one process that watches every engine replica.

Each second it asks supervisord which engine processes run and each engine's
/health whether it answers, and every few seconds each ready engine's metrics
whether it makes progress; gateway/control/liveness.py turns that into a
verdict (rise and fall, hung, stalled). It writes the verdict for the gateway
workers, keeps nginx's engines upstream to the ready replicas (rewrite and
reload), because a starting vLLM accepts connections long before it can answer
them, and kills a hung or stalled replica's process group (supervisord starts
it again). A replica is reported ready only once nginx routes to it: Vertex and
Kubernetes send traffic as soon as health says 200.

A replica that keeps exiting before it ever got ready is `failed` with its
cause and is not restarted again; when every replica has failed (or the model
download failed for good), the monitor writes the cause to FATAL_FILE and
shuts supervisord down, and `vgate serve` exits with it: Vertex then marks the
deployment failed in minutes, with the reason in its log, instead of waiting
out its 2 h deployment timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import os
import signal
import time
import xmlrpc.client
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import aiohttp
from supervisor.xmlrpc import SupervisorTransport

from engine.failures import StartWatch
from engine.fetch_model import DOWNLOAD_FAILED
from engine.launch import SUPERVISOR_TOKEN_ENV, read_exits
from engine.logs import configure
from engine.workers import EngineList, EngineWorker, find_worker
from gateway.control.engine_programs import program_name, replica_of
from gateway.control.gateway_watch import watch_gateways
from gateway.control.liveness import Progress, ReplicaWatch, read_progress
from gateway.control.nginx_config import write_upstream
from gateway.engine_schema import SCHEMA_FILE, fetch_schema
from gateway.state import (
    DRAINING,
    FAILED,
    READY,
    STALE_AFTER_S,
    STARTING,
    STATE_FILE,
    ReplicaState,
    write_state,
)

log = logging.getLogger("vgate.monitor")

POLL_INTERVAL_S = 1.0
HEALTH_TIMEOUT_S = 1.0
PROGRESS_EVERY_S = 5.0  # between two looks at the engines' metrics
RPC_TIMEOUT_S = 5.0
SLOW_POLL_S = 5.0
RELOAD_DEADLINE_S = 10.0
GENERATION_URL = "http://internal/vgate/upstream-generation"
FATAL_FILE = "fatal.json"  # why the run ended: read by `vgate serve` as it exits


class Supervisor:
    """supervisord's XML-RPC interface, over its unix socket.

    A connection per call: calls come from several threads (the engines' poll, the
    gateways' watchdog, and calls abandoned at their deadline that still run), and
    one xmlrpc connection must not be shared by them.
    """

    def __init__(self, run_dir: Path):
        self._socket = f"unix://{run_dir}/supervisor.sock"

    @property
    def _proxy(self) -> xmlrpc.client.ServerProxy:
        token = os.environ.get(SUPERVISOR_TOKEN_ENV)
        transport = SupervisorTransport("vgate" if token else None, token, self._socket)
        return xmlrpc.client.ServerProxy("http://127.0.0.1", transport=transport)

    def engine_states(self) -> dict[int, tuple[str, int]]:
        """{replica: (supervisord state name, pid)} of the engine programs."""
        infos = self._proxy.supervisor.getAllProcessInfo()
        states = {replica_of(p["group"]): (p["statename"], p["pid"]) for p in infos}
        return {r: state for r, state in states.items() if r is not None}

    def gateway_states(self) -> dict[int, tuple[str, int]]:
        """{worker: (supervisord state name, pid)} of the gateway workers."""
        infos = self._proxy.supervisor.getAllProcessInfo()
        return {
            int(p["name"].rsplit("-", 1)[1]): (p["statename"], p["pid"])
            for p in infos
            if p["group"] == "gateway"
        }

    def program(self, name: str) -> tuple[str, int]:
        """(supervisord state name, pid) of one program."""
        info = self._proxy.supervisor.getProcessInfo(name)
        return info["statename"], info["pid"]

    def reload_nginx(self) -> None:
        self._proxy.supervisor.signalProcess("nginx", "HUP")

    def stop_engine(self, replica: int) -> None:
        name = program_name(replica)
        self._proxy.supervisor.stopProcess(f"{name}:{name}", False)

    def shutdown(self) -> None:
        self._proxy.supervisor.shutdown()

    def reload_config(self) -> None:
        """Read the programs' files again (engines.conf); changes nothing that runs."""
        self._proxy.supervisor.reloadConfig()

    def add_program(self, name: str) -> None:
        """Start a program reload_config found (an engine an update added)."""
        self._proxy.supervisor.addProcessGroup(name)

    def remove_program(self, name: str) -> None:
        """Stop a program (TERM, then KILL after its stopwaitsecs) and forget it."""
        try:
            self._proxy.supervisor.stopProcessGroup(name, True)
        except xmlrpc.client.Fault as e:
            log.warning("%s: not stopped: %s", name, e.faultString)
        self._proxy.supervisor.removeProcessGroup(name)


async def engine_healthy(session: aiohttp.ClientSession, worker: EngineWorker) -> bool:
    try:
        async with session.get(worker.url + "/health") as resp:
            return resp.status == 200
    except (aiohttp.ClientError, TimeoutError):
        return False


async def engine_progress(session: aiohttp.ClientSession, worker: EngineWorker) -> Progress | None:
    try:
        async with session.get(worker.url + "/metrics") as resp:
            return read_progress(await resp.text()) if resp.status == 200 else None
    except (aiohttp.ClientError, TimeoutError, ValueError):
        return None


async def poll_once(
    session: aiohttp.ClientSession,
    supervisor: Supervisor,
    workers: list[EngineWorker],
    watches: dict[int, ReplicaWatch],
    look_at_progress: bool,
    known: dict[int, tuple[str, int]],
) -> list[ReplicaState]:
    """Probe every replica; restart those that hang or stall.

    `known`: the engines' process states as supervisord last gave them.
    """
    try:
        async with asyncio.timeout(RPC_TIMEOUT_S):
            processes = await asyncio.to_thread(supervisor.engine_states)
        known.clear()
        known.update(processes)
    except (OSError, xmlrpc.client.Error, TimeoutError) as e:
        # A busy supervisord says nothing about the engines: keep what it said last.
        log.warning("supervisord did not answer: %r", e)
        processes = dict(known)
    serving = [w for w in workers if not w.draining]
    healthy = await asyncio.gather(*(engine_healthy(session, w) for w in serving))
    now = time.monotonic()
    states = {
        w.replica: ReplicaState(w.replica, DRAINING, w.device, model=w.model)
        for w in workers
        if w.draining
    }
    for w, ok in zip(serving, healthy, strict=True):
        process, pid = processes.get(w.replica, (None, 0))
        state = watches[w.replica].probe(now, process, ok)
        states[w.replica] = ReplicaState(w.replica, state, w.device, model=w.model)
    if look_at_progress:
        routed = [w for w in serving if watches[w.replica].routed]
        seen = await asyncio.gather(*(engine_progress(session, w) for w in routed))
        for w, progress in zip(routed, seen, strict=True):
            watches[w.replica].progress(now, progress)
    for w in serving:
        reason = watches[w.replica].restart_reason(now)
        process, pid = processes.get(w.replica, (None, 0))
        if reason and process == "RUNNING" and pid:
            log.error("replica %d (%s): restarting: %s", w.replica, w.device, reason)
            kill_group(pid)
            watches[w.replica] = ReplicaWatch()
            states[w.replica] = replace(states[w.replica], state=STARTING)
    return [states[w.replica] for w in workers]


def kill_group(pid: int) -> None:
    """The replica's whole process group (launcher, vLLM server, engine core): stopped or
    deadlocked processes take no gentler signal; supervisord starts it again."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGKILL)


def last_verdict(run_dir: Path) -> dict | None:
    """The state a monitor before this one wrote, if it is fresh: this one was restarted."""
    try:
        body = json.loads((run_dir / STATE_FILE).read_text())
        return body if time.time() - body["updated"] <= STALE_AFTER_S else None
    except (OSError, ValueError, KeyError, TypeError):
        return None


def watches_from(last: dict | None, workers: list[EngineWorker]) -> dict[int, ReplicaWatch]:
    """A restarted monitor keeps routing what the last one routed (a fresh verdict), so
    health does not turn 503 for everyone while it probes again."""
    watches = {w.replica: ReplicaWatch() for w in workers}
    now = time.monotonic()
    try:
        for r in last["replicas"] if last else []:
            if r["state"] == READY and r["replica"] in watches:
                watches[r["replica"]] = ReplicaWatch(
                    routed=True, good=2, ready_since_start=True, last_answer=now
                )
    except (KeyError, TypeError):
        pass
    return watches


def _not_ready_unless(replicas: list[ReplicaState], allowed: set[int]) -> list[ReplicaState]:
    """Ready replicas outside `allowed` are reported as still starting."""
    return [
        replace(r, state=STARTING) if r.state == READY and r.replica not in allowed else r
        for r in replicas
    ]


async def _with_schema(
    session: aiohttp.ClientSession,
    workers: list[EngineWorker],
    replicas: list[ReplicaState],
    run_dir: Path,
) -> list[ReplicaState]:
    """Fetch the engines' request schema from a ready one; until then none counts as ready."""
    for r in replicas:
        if r.state == READY:
            try:
                await fetch_schema(session, find_worker(workers, r.replica), run_dir)
                return replicas
            except (aiohttp.ClientError, TimeoutError, ValueError, KeyError) as e:
                log.warning("replica %d: no request schema yet: %r", r.replica, e)
    return _not_ready_unless(replicas, set())


async def _serves(internal: aiohttp.ClientSession, generation: str) -> bool:
    try:
        async with internal.get(GENERATION_URL) as resp:
            return resp.status == 200 and await resp.text() == generation
    except (aiohttp.ClientError, TimeoutError):
        return False


def with_failures(
    run_dir: Path, replicas: list[ReplicaState], watch: StartWatch
) -> list[ReplicaState]:
    """Replicas that cannot start marked failed, with their cause."""
    try:
        download = json.loads((run_dir / DOWNLOAD_FAILED).read_text())["cause"]
    except (OSError, ValueError, KeyError):
        download = None
    out = []
    for r in replicas:
        if r.state == DRAINING:
            out.append(r)
            continue
        failure = watch.update(r.replica, read_exits(run_dir, r.replica), r.state == READY)
        cause = download or (failure.line() if failure else None)
        out.append(replace(r, state=FAILED, cause=cause) if cause else r)
    return out


def fatal_cause(replicas: list[ReplicaState]) -> str | None:
    """Why nothing can serve, once every replica has failed."""
    replicas = [r for r in replicas if r.state != DRAINING]
    if not replicas or any(r.state != FAILED for r in replicas):
        return None
    causes = list(dict.fromkeys(r.cause or "" for r in replicas))
    if len(causes) == 1:
        return f"no engine replica can start: {causes[0]}"
    return "no engine replica can start: " + "; ".join(
        f"replica {r.replica}: {r.cause}" for r in replicas
    )


async def stop_failed(
    supervisor: Supervisor, run_dir: Path, replicas: list[ReplicaState], stopped: set[int]
) -> None:
    """Stop retrying replicas that cannot start; end the run when none can."""
    for r in replicas:
        if r.state == FAILED and r.replica not in stopped:
            log.error("replica %d (%s) cannot start: %s", r.replica, r.device, r.cause)
            stopped.add(r.replica)
            try:
                await asyncio.to_thread(supervisor.stop_engine, r.replica)
            except (OSError, xmlrpc.client.Error) as e:
                log.warning("replica %d: not stopped: %s", r.replica, e)
    cause = fatal_cause(replicas)
    if cause is None:
        return
    if not (run_dir / FATAL_FILE).exists():
        log.critical("%s", cause)
        (run_dir / FATAL_FILE).write_text(json.dumps({"cause": cause}))
    try:  # asked again each poll until it is under way
        await asyncio.to_thread(supervisor.shutdown)
    except (OSError, xmlrpc.client.Error) as e:
        log.debug("supervisord did not take the shutdown (it may be going already): %s", e)


def written(kind: str, write: Callable[[], None], unwritable: set[str]) -> bool:
    """Write one of the files other processes read; False when it could not be.

    A full disk (or any other OSError) must not end the monitor: health is served
    from what it wrote last, and the write is tried again on the next poll. A
    warning once while `kind` stays unwritable (`unwritable` remembers), not per poll.
    """
    try:
        write()
    except OSError as e:
        if kind not in unwritable:
            unwritable.add(kind)
            log.warning("%s not written, the last one stands; retrying each poll: %s", kind, e)
        return False
    if kind in unwritable:
        unwritable.discard(kind)
        log.info("%s written again", kind)
    return True


async def apply_upstream(
    internal: aiohttp.ClientSession,
    supervisor: Supervisor,
    run_dir: Path,
    workers: list[EngineWorker],
    ready: set[int],
    unwritable: set[str] | None = None,
) -> bool:
    """Point nginx at the `ready` engines; True once its workers route by the new list.

    A reload (SIGHUP) returns before nginx has read the file; the file carries a
    generation that nginx's internal listener echoes, so we know when it took.
    `unwritable`: see written().
    """
    generation = str(time.time_ns())
    upstream = functools.partial(write_upstream, run_dir, workers, ready, generation)
    if not written("nginx upstream file", upstream, set() if unwritable is None else unwritable):
        return False  # nginx keeps routing by the last file; tried again next poll
    try:
        async with asyncio.timeout(RPC_TIMEOUT_S):
            await asyncio.to_thread(supervisor.reload_nginx)
    except (OSError, xmlrpc.client.Error, TimeoutError) as e:
        # nginx not running yet: it reads the file when it starts; retry.
        log.info("nginx reload deferred: %s", e)
        return False
    try:
        async with asyncio.timeout(RELOAD_DEADLINE_S):
            while not await _serves(internal, generation):
                await asyncio.sleep(0.05)
    except TimeoutError:
        log.warning("nginx did not load the engines upstream within %g s", RELOAD_DEADLINE_S)
        return False
    return True


def _still_routed(replicas: list[ReplicaState], applied: set[int] | None) -> list[ReplicaState]:
    """A draining replica is `draining` once nginx no longer routes to it (what
    /update_models waits for before it lets it finish); until then it is still ready."""
    routed = applied or set()
    return [
        replace(r, state=READY) if r.state == DRAINING and r.replica in routed else r
        for r in replicas
    ]


def follow(workers: list[EngineWorker], watches: dict[int, ReplicaWatch]) -> None:
    """Watches for engines an update added; none for those it removed."""
    replicas = {w.replica for w in workers}
    for replica in set(watches) - replicas:
        del watches[replica]
    for replica in replicas - set(watches):
        watches[replica] = ReplicaWatch()


async def run(run_dir: Path) -> None:
    engines = EngineList(run_dir / "engines.json")
    workers = engines.workers()
    supervisor = Supervisor(run_dir)
    routed: set[int] = set()  # the ready engines nginx routes to
    applied: set[int] | None = None  # the set nginx's upstream file was last loaded with
    previous: dict[int, str] = {}
    watch = StartWatch()
    last = last_verdict(run_dir)
    watches = watches_from(last, workers)
    known: dict[int, tuple[str, int]] = {}
    stopped: set[int] = set()  # failed replicas, no longer restarted
    unwritable: set[str] = set()  # files a full disk keeps us from writing
    timeout = aiohttp.ClientTimeout(total=HEALTH_TIMEOUT_S)
    # A new connection each time: a kept-alive one may still reach a worker of the old config.
    internal_socket = aiohttp.UnixConnector(path=str(run_dir / "engines.sock"), force_close=True)
    async with (
        aiohttp.ClientSession(timeout=timeout) as session,
        aiohttp.ClientSession(connector=internal_socket, timeout=timeout) as internal,
    ):
        gateways = asyncio.create_task(
            watch_gateways(
                run_dir,
                supervisor.gateway_states,
                int(os.environ["VGATE_GATEWAY_WORKERS"]),
                restarted=last is not None,
            )
        )
        gateways.add_done_callback(
            lambda t: t.cancelled() or log.error("gateway watch ended: %r", t.exception())
        )
        looked = 0.0
        while not gateways.done():  # the watchdog never ends; if it fails, so does this
            started = time.monotonic()
            if engines.refresh():
                workers = engines.workers()
                follow(workers, watches)
                log.info("engines: %s", ", ".join(f"{w.replica}={w.model}" for w in workers))
            look = started - looked >= PROGRESS_EVERY_S
            looked = started if look else looked
            probed = await poll_once(session, supervisor, workers, watches, look, known)
            replicas = with_failures(run_dir, probed, watch)
            if not (run_dir / SCHEMA_FILE).exists():
                replicas = await _with_schema(session, workers, replicas, run_dir)
            ready = {r.replica for r in replicas if r.state == READY}
            routed = routed & ready  # an engine that fails stops counting at once
            if ready != applied and await apply_upstream(
                internal, supervisor, run_dir, workers, ready, unwritable
            ):
                applied, routed = ready, set(ready)
            replicas = _still_routed(_not_ready_unless(replicas, routed), applied)
            state = functools.partial(write_state, run_dir / STATE_FILE, replicas)
            written("state file", state, unwritable)
            await stop_failed(supervisor, run_dir, replicas, stopped)
            for r in replicas:
                if previous.get(r.replica) != r.state:
                    quiet = r.state in (READY, STARTING, DRAINING)
                    level = logging.INFO if quiet else logging.WARNING
                    log.log(level, "replica %d (%s): %s", r.replica, r.device, r.state)
            previous = {r.replica: r.state for r in replicas}
            if (took := time.monotonic() - started) > SLOW_POLL_S:
                log.warning("a poll took %.1f s", took)
            await asyncio.sleep(POLL_INTERVAL_S)
        gateways.result()


def main() -> None:
    configure("monitor")
    asyncio.run(run(Path(os.environ["VGATE_RUN_DIR"])))


if __name__ == "__main__":
    main()
