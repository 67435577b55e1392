"""Faults injected into the real stack under sustained mixed load: it heals itself.

A stack of its own (2 CPU replicas, 2 gateway workers, the demo model). Clients in
threads of this process send OpenAI and predict requests, streamed and not, the whole
time. Each case injects one fault and then watches for a window of at least
WINDOW_S: it counts the requests sent in that window and those that failed, waits
until every replica is ready again, and prints the figures (README's table).
"""

from __future__ import annotations

import http.client
import itertools
import json
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import psutil
import pytest

from engine.demo_model import ensure_demo_model
from engine.workers import VLLM_SERVER_MODULE
from tests.e2e.conftest import Stack, one_replica_stack
from tests.helpers import descendants, wait_for

pytestmark = pytest.mark.e2e

WINDOW_S = 30.0  # the least a fault is watched for
RECOVERY_DEADLINE_S = 180.0  # every replica ready again (an engine restart takes ~40 s here)
REQUEST_TIMEOUT_S = 60  # the stack's deadline; no request may take longer
CLIENTS = 4
MAX_FAILED_SHARE = 0.01


@dataclass
class Outcome:
    sent: float
    ended: float
    ok: bool
    what: str


@dataclass
class Load:
    """Mixed requests from CLIENTS threads until stopped; every outcome recorded."""

    base: str
    outcomes: list[Outcome] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        kinds = itertools.cycle(
            [self._completion, self._chat_stream, self._predict, self._predict_stream]
        )
        lock = threading.Lock()

        def client() -> None:
            while not self._stop.is_set():
                with lock:
                    kind = next(kinds)
                sent = time.monotonic()
                try:
                    ok, what = kind()
                except (OSError, http.client.HTTPException, ValueError) as e:
                    ok, what = False, f"{kind.__name__}: {type(e).__name__}: {e}"
                self.outcomes.append(Outcome(sent, time.monotonic(), ok, what))

        self._threads = [threading.Thread(target=client, daemon=True) for _ in range(CLIENTS)]
        for t in self._threads:
            t.start()

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(REQUEST_TIMEOUT_S + 10)

    def _post(self, path: str, body: dict) -> tuple[int, bytes]:
        url = urlsplit(self.base)
        conn = http.client.HTTPConnection(url.hostname, url.port, timeout=REQUEST_TIMEOUT_S + 5)
        try:
            conn.request("POST", path, json.dumps(body), {"Content-Type": "application/json"})
            resp = conn.getresponse()
            return resp.status, resp.read()
        finally:
            conn.close()

    def _completion(self) -> tuple[bool, str]:
        status, body = self._post("/v1/completions", {"prompt": "hi", "max_tokens": 16})
        return status == 200 and b'"choices"' in body, f"completion {status} {body[:200]!r}"

    def _chat_stream(self) -> tuple[bool, str]:
        message = {"role": "user", "content": "hi"}
        body = {"messages": [message], "max_tokens": 16, "stream": True}
        status, answer = self._post("/v1/chat/completions", body)
        whole = answer.rstrip().endswith(b"data: [DONE]")
        return status == 200 and whole, f"chat stream {status} {answer[-200:]!r}"

    def _predict(self) -> tuple[bool, str]:
        body = {"instances": [{"prompt": "hi"}, {"prompt": "ho"}], "parameters": {"max_tokens": 8}}
        status, answer = self._post("/predict", body)
        return status == 200 and b'"predictions"' in answer, f"predict {status} {answer[:200]!r}"

    def _predict_stream(self) -> tuple[bool, str]:
        body = {"instances": [{"prompt": "hi", "max_tokens": 16, "stream": True}]}
        status, answer = self._post("/predict", body)
        whole = answer.rstrip().endswith(b"data: [DONE]")
        return status == 200 and whole, f"predict stream {status} {answer[-200:]!r}"


@pytest.fixture(scope="module")
def faulty(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    args = [str(ensure_demo_model()), "--max-model-len", "512", "--gateway-workers", "2"]
    args += ["--request-timeout", str(REQUEST_TIMEOUT_S)]
    with one_replica_stack(tmp_path_factory.mktemp("faults"), args, replicas=2) as stack:
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
