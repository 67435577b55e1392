"""Faults injected into the real stack under sustained mixed load: it heals itself.

A stack of its own (2 CPU replicas, 2 gateway workers, the demo model). Clients in
threads of this process send OpenAI and predict requests, streamed and not, the whole
time. Each case injects one fault and then watches for a window of at least
WINDOW_S: it counts the requests sent in that window and those that failed, waits
until every replica is ready again, and prints the figures (README's table).
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from urllib.parse import urlsplit

import psutil
import pytest

from engine.workers import VLLM_SERVER_MODULE
from tests.e2e.conftest import Stack, one_replica_stack
from tests.e2e.load import REQUEST_TIMEOUT_S, Load, Outcome, loaded_stack_args
from tests.helpers import descendants, wait_for

pytestmark = pytest.mark.e2e

WINDOW_S = 30.0  # the least a fault is watched for
RECOVERY_DEADLINE_S = 180.0  # every replica ready again (an engine restart takes ~40 s here)
MAX_FAILED_SHARE = 0.01


@pytest.fixture(scope="module")
def faulty(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    work = tmp_path_factory.mktemp("faults")
    with one_replica_stack(work, loaded_stack_args(), replicas=2) as stack:
        yield stack


def _all_ready(stack: Stack) -> bool:
    status, health = stack.request("/health", timeout=5)
    return status == 200 and health["ready_replicas"] == 2


def _under_fault(
    stack: Stack,
    inject: Callable[[], None],
    name: str,
    seen: Callable[[], bool] | None = None,
) -> dict[str, float]:
    """Inject under load; the figures of the window; fails on a request past its deadline.

    `seen`: true once the stack has noticed the fault (then it must recover from it).
    """
    load = Load(stack.base)
    load.run()
    try:
        time.sleep(3)  # the load runs before the fault: not a wait for anything
        start = time.monotonic()
        inject()
        detected = 0.0
        if seen is not None:
            wait_for(seen, RECOVERY_DEADLINE_S, f"{name} to be noticed", every=0.2)
            detected = time.monotonic() - start
        wait_for(lambda: _all_ready(stack), RECOVERY_DEADLINE_S, f"recovery from {name}")
        recovered = time.monotonic() - start
        while time.monotonic() - start < WINDOW_S:
            time.sleep(0.5)  # the rest of the observation window
    finally:
        load.stop()
    during = [o for o in load.outcomes if o.sent >= start]
    failed = [o for o in during if not o.ok]
    figures = {
        "sent": len(during),
        "failed": len(failed),
        "out_of_routing_s": round(detected, 1),
        "ready_again_s": round(recovered, 1),
    }
    print(f"\nfault {name}: {figures}; failures: {[o.what for o in failed[:5]]}")
    slowest = max(o.ended - o.sent for o in load.outcomes)
    assert slowest <= REQUEST_TIMEOUT_S + 10, f"a request took {slowest:.0f} s"
    assert during, "no request was sent during the fault"
    return figures


def _out(stack: Stack, replica: int) -> bool:
    """The replica is out of routing (/health no longer counts it ready)."""
    _, health = stack.request("/health", timeout=5)
    return health["replicas"][replica]["state"] != "ready"


def _engine_server(stack: Stack, replica: int) -> psutil.Process:
    port = str(stack.workers()[replica].port)
    for p in descendants(stack.proc.pid):
        cmdline = p.cmdline()
        if VLLM_SERVER_MODULE in cmdline and port in cmdline:
            return p
    raise AssertionError(f"no engine server for replica {replica}")


def _engine_core(stack: Stack, replica: int) -> psutil.Process:
    for p in _engine_server(stack, replica).children(recursive=True):
        if "EngineCore" in p.name() or "EngineCore" in " ".join(p.cmdline()):
            return p
    raise AssertionError(f"no engine core for replica {replica}")


def _program_pid(stack: Stack, name: str) -> int:
    """A supervisord program's pid, from its process list."""
    for p in descendants(stack.proc.pid):
        if f"gateway.{name}" in " ".join(p.cmdline()):
            return p.pid
    raise AssertionError(f"no {name} process")


@pytest.mark.parametrize(
    ("fault", "find"),
    [("SIGSTOP engine server", _engine_server), ("SIGSTOP engine core", _engine_core)],
)
def test_a_hung_engine_is_taken_out_and_restarted(faulty: Stack, fault: str, find) -> None:
    wait_for(lambda: _all_ready(faulty), RECOVERY_DEADLINE_S, "both replicas")
    target = find(faulty, 0)
    try:
        figures = _under_fault(
            faulty, lambda: target.send_signal(signal.SIGSTOP), fault, lambda: _out(faulty, 0)
        )
        assert not target.is_running() or target.status() == psutil.STATUS_ZOMBIE
    finally:
        if target.is_running():
            target.send_signal(signal.SIGCONT)
    assert figures["failed"] <= MAX_FAILED_SHARE * figures["sent"], figures


@pytest.mark.parametrize(
    ("fault", "find"),
    [("SIGKILL engine server", _engine_server), ("SIGKILL engine core", _engine_core)],
)
def test_a_killed_engine_is_taken_out_and_restarted(faulty: Stack, fault: str, find) -> None:
    wait_for(lambda: _all_ready(faulty), RECOVERY_DEADLINE_S, "both replicas")
    target = find(faulty, 1)
    core = _engine_core(faulty, 1)
    figures = _under_fault(faulty, target.kill, fault, lambda: _out(faulty, 1))
    # Nothing of the old engine is left: its server and core both went.
    for p in (target, core):
        assert not p.is_running() or p.status() == psutil.STATUS_ZOMBIE, p
    assert _engine_server(faulty, 1).pid != target.pid
    assert figures["failed"] <= MAX_FAILED_SHARE * figures["sent"], figures


@pytest.mark.parametrize("program", ["monitor", "worker"])
def test_a_killed_monitor_or_gateway_worker_comes_back_unnoticed(
    faulty: Stack, program: str
) -> None:
    wait_for(lambda: _all_ready(faulty), RECOVERY_DEADLINE_S, "both replicas")
    name = "control.monitor" if program == "monitor" else "worker"
    pid = _program_pid(faulty, name)
    pings: list[int] = []

    def kill() -> None:
        os.kill(pid, signal.SIGKILL)
        for _ in range(20):  # readiness through the restart: never 503 for everyone
            pings.append(faulty.request("/ping", timeout=5)[0])
            time.sleep(0.25)

    figures = _under_fault(faulty, kill, f"SIGKILL {program}")
    assert set(pings) == {200}, pings
    assert _program_pid(faulty, name) != pid
    assert figures["failed"] <= MAX_FAILED_SHARE * figures["sent"], figures


def test_a_killed_nginx_master_comes_back(faulty: Stack) -> None:
    wait_for(lambda: _all_ready(faulty), RECOVERY_DEADLINE_S, "both replicas")
    master = int((faulty.run_dir / "nginx.pid").read_text())
    workers = psutil.Process(master).children()
    figures = _under_fault(faulty, lambda: os.kill(master, signal.SIGKILL), "SIGKILL nginx")
    # The old master's workers went with it; a new master serves.
    assert not any(w.is_running() and w.status() != psutil.STATUS_ZOMBIE for w in workers)
    assert int((faulty.run_dir / "nginx.pid").read_text()) != master
    assert figures["failed"] <= MAX_FAILED_SHARE * figures["sent"], figures


def test_a_hung_gateway_worker_is_restarted(faulty: Stack) -> None:
    wait_for(lambda: _all_ready(faulty), RECOVERY_DEADLINE_S, "both replicas")
    worker = psutil.Process(_program_pid(faulty, "worker"))

    def gone() -> bool:
        return not worker.is_running() or worker.status() == psutil.STATUS_ZOMBIE

    try:
        figures = _under_fault(
            faulty, lambda: worker.send_signal(signal.SIGSTOP), "SIGSTOP gateway worker", gone
        )
    finally:
        if not gone():
            worker.send_signal(signal.SIGCONT)
    workers = [p for p in descendants(faulty.proc.pid) if "gateway.worker" in " ".join(p.cmdline())]
    assert worker.pid not in {p.pid for p in workers} and len(workers) == 2  # replaced
    assert figures["failed"] <= MAX_FAILED_SHARE * figures["sent"], figures


@pytest.mark.parametrize("program", ["monitor", "nginx"])
def test_a_hung_monitor_or_nginx_is_restarted(faulty: Stack, program: str) -> None:
    wait_for(lambda: _all_ready(faulty), RECOVERY_DEADLINE_S, "both replicas")
    if program == "monitor":
        pid = _program_pid(faulty, "control.monitor")
    else:
        pid = int((faulty.run_dir / "nginx.pid").read_text())
    hung = psutil.Process(pid)
    pings: list[int] = []

    def restarted() -> bool:
        if program == "monitor":  # readiness through the hang: never 503 for everyone
            pings.append(faulty.request("/ping", timeout=5)[0])
        return not hung.is_running() or hung.status() == psutil.STATUS_ZOMBIE

    try:
        figures = _under_fault(
            faulty, lambda: os.killpg(pid, signal.SIGSTOP), f"SIGSTOP {program}", restarted
        )
    finally:
        if not restarted():
            os.killpg(pid, signal.SIGCONT)
    assert figures["out_of_routing_s"] <= 60, figures  # found hung and killed
    if program == "monitor":
        assert set(pings) == {200}, pings
        assert figures["failed"] <= MAX_FAILED_SHARE * figures["sent"], figures
    # nginx: nothing can be served while the only front door is stopped; it is back.
    assert int((faulty.run_dir / "nginx.pid").read_text()) != pid or program == "monitor"


def test_serving_does_not_wait_on_supervisord(faulty: Stack) -> None:
    """The access log and vLLM's output go around supervisord's relay: with it stopped,
    more than a pipe holds (64 KiB) is logged and no request waits."""
    wait_for(lambda: _all_ready(faulty), RECOVERY_DEADLINE_S, "both replicas")
    supervisord = next(
        p for p in descendants(faulty.proc.pid) if "supervisor.supervisord" in p.cmdline()
    )
    logged: list[int] = []

    def stop() -> None:
        supervisord.send_signal(signal.SIGSTOP)
        logged.append(faulty.log.stat().st_size)

    try:
        figures = _under_fault(faulty, stop, "SIGSTOP supervisord")
        logged.append(faulty.log.stat().st_size)
    finally:
        supervisord.send_signal(signal.SIGCONT)
    print(f"logged while supervisord was stopped: {(logged[1] - logged[0]) // 1024} KiB")
    assert logged[1] - logged[0] > 64 * 1024
    assert figures["failed"] == 0, figures


def _long_stream(stack: Stack, path: str, body: dict, started: threading.Event) -> Outcome:
    """A stream that outlasts the SIGTERM: `started` is set at its first token."""
    url = urlsplit(stack.base)
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=REQUEST_TIMEOUT_S + 5)
    sent = time.monotonic()
    try:
        conn.request("POST", path, json.dumps(body), {"Content-Type": "application/json"})
        resp = conn.getresponse()
        answer = resp.readline()
        started.set()
        answer += resp.read()
        whole = resp.status == 200 and answer.rstrip().endswith(b"data: [DONE]")
        return Outcome(sent, time.monotonic(), whole, f"{path} {resp.status} {answer[-200:]!r}")
    except (OSError, http.client.HTTPException) as e:
        return Outcome(sent, time.monotonic(), False, f"{path}: {type(e).__name__}: {e}")
    finally:
        started.set()
        conn.close()


def test_sigterm_under_load_loses_nothing_in_flight(faulty: Stack) -> None:
    """Last: it stops the stack."""
    wait_for(lambda: _all_ready(faulty), RECOVERY_DEADLINE_S, "both replicas")
    family = descendants(faulty.proc.pid)
    long = {"max_tokens": 400, "ignore_eos": True, "stream": True}
    streams = [
        ("/v1/completions", {"prompt": "hi", **long}),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], **long}),
        ("/predict", {"instances": [{"prompt": "hi", **long}]}),
    ]
    outcomes: list[Outcome] = []
    load = Load(faulty.base)
    load.run()
    try:
        time.sleep(3)  # the load runs before the SIGTERM: not a wait for anything
        threads = []
        for path, body in streams:
            started = threading.Event()
            t = threading.Thread(
                target=lambda p=path, b=body, s=started: outcomes.append(
                    _long_stream(faulty, p, b, s)
                )
            )
            t.start()
            assert started.wait(30), f"{path} did not start streaming"
            threads.append(t)
        stopped_at = time.monotonic()
        # To the whole group, as Ctrl-C or an init that signals the group would: only
        # `vgate serve` may act on it (supervisord, if reached, stops nginx at once).
        os.killpg(faulty.proc.pid, signal.SIGTERM)
        # Readiness fails at once, new requests get 503, before anything stops.
        wait_for(lambda: faulty.request("/ping", timeout=5)[0] == 503, 5, "/ping to say 503")
        refused_after = time.monotonic() - stopped_at
        status, body = faulty.request("/v1/completions", {"prompt": "hi", "max_tokens": 4})
        assert status == 503 and body["error"]["message"] == "shutting down", (status, body)
        code = faulty.proc.wait(timeout=30 + 20)  # the stop grace, and the stop after it
        took = time.monotonic() - stopped_at
        for t in threads:
            t.join(REQUEST_TIMEOUT_S)
    finally:
        load.stop()
    # Everything in flight at the SIGTERM finished (a request sent in its last second
    # may still have been on its way in: it may be refused, as a later one is).
    in_flight = [o for o in load.outcomes if o.sent < stopped_at - 1 < stopped_at < o.ended]
    lost = [o.what for o in [*outcomes, *in_flight] if not o.ok]
    assert all(o.ended > stopped_at for o in outcomes)  # the long streams were in flight
    print(
        f"\nSIGTERM under load: {len(outcomes) + len(in_flight)} requests in flight, "
        f"{len(lost)} lost; 503 after {refused_after:.1f} s; exit {code} after {took:.1f} s"
    )
    assert not lost, lost
    assert code == 0, faulty.log_tail()
    alive = [p for p in family if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    assert not alive, [p.cmdline() for p in alive]
