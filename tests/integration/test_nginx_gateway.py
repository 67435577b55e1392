"""The real nginx on a rendered config, in front of a real gateway worker, no engine yet.

What must hold before any engine is ready: JSON answers for every error, the
limits, request ids, and an internal listener that is not on the network.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import psutil
import pytest
from prometheus_client.parser import text_string_to_metric_families

from engine.workers import load_workers
from gateway.config import resolve
from gateway.control import monitor
from gateway.control.drain import drain
from gateway.control.monitor import apply_upstream
from gateway.control.nginx_config import UPSTREAM_FILE
from gateway.control.serve import prepare
from tests.helpers import free_port, http_json, stop_tree, wait_for


@pytest.fixture(scope="module")
def front(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path, list]]:
    run_dir = tmp_path_factory.mktemp("run")
    port = free_port()
    config = resolve(
        [
            "--port",
            str(port),
            "--host",
            "127.0.0.1",
            "--run-dir",
            str(run_dir),
            "--max-request-bytes",
            "100000",
            "--max-inflight-per-client",
            "2",
            "--log-project",
            "my-project",
            # Two engines (the CPU default is one per NUMA node).
            "--replicas",
            "2",
        ],
        {},
    )
    _, env = prepare(config, dict(os.environ), str(run_dir / "access.log"))
    procs = [
        subprocess.Popen(
            [env["VGATE_NGINX"], "-c", str(run_dir / "nginx.conf")], env=env, process_group=0
        ),
        subprocess.Popen(
            [sys.executable, "-m", "gateway.worker", "0"],
            env={**env, "PROMETHEUS_MULTIPROC_DIR": str(run_dir / "prometheus")},  # as supervisord
            process_group=0,
        ),
    ]
    base = f"http://127.0.0.1:{port}"

    def gateway_answers() -> bool:
        # The gateway's own "starting", not nginx's page for an absent gateway.
        body = http_json(base + "/health")[2]
        return isinstance(body, dict) and body.get("status") == "starting"

    wait_for(gateway_answers, 30, "nginx and the gateway to answer")
    yield base, run_dir, procs
    for proc in procs:
        stop_tree(proc)


def test_rendered_config_passes_nginx_t(front) -> None:
    _, run_dir, _ = front
    nginx = "/usr/sbin/nginx" if os.path.exists("/usr/sbin/nginx") else "nginx"
    result = subprocess.run(
        [nginx, "-t", "-c", str(run_dir / "nginx.conf")], capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 0, result.stderr


def test_access_log_entries_are_cloud_loggings(front) -> None:
    base, run_dir, _ = front
    trace = "4bf92f3577b34da6a3ce929d0e0e4736"
    asked = [
        ("/ping", {"X-Cloud-Trace-Context": f"{trace}/1;o=1", "X-Request-Id": "log-1"}),
        ("/nope", {"traceparent": f"00-{trace}-00f067aa0ba902b7-01", "X-Request-Id": "log-2"}),
        ("/v1/models", {"User-Agent": 'quote " agent', "X-Request-Id": "log-3"}),
    ]
    for path, headers in asked:
        http_json(base + path, headers=headers)
    lines = (run_dir / "access.log").read_text().splitlines()
    entries = {e["request_id"]: e for e in map(json.loads, lines) if e["request_id"][:4] == "log-"}
    ping, nope, models = (entries[f"log-{i}"] for i in (1, 2, 3))
    assert ping["severity"] == "ERROR" and ping["process"] == "nginx" and ping["time"]  # a 503
    assert ping["httpRequest"]["requestMethod"] == "GET"
    assert ping["httpRequest"]["requestUrl"] == "/ping" and ping["httpRequest"]["status"] == 503
    assert ping["httpRequest"]["latency"].endswith("s") and ping["httpRequest"]["remoteIp"]
    assert int(ping["httpRequest"]["responseSize"]) > 0
    traced = f"projects/my-project/traces/{trace}"
    assert ping["logging.googleapis.com/trace"] == traced  # Google's header
    assert nope["logging.googleapis.com/trace"] == traced  # W3C's
    assert (nope["severity"], nope["httpRequest"]["status"]) == ("WARNING", 404)
    assert "logging.googleapis.com/trace" not in models  # no trace asked: none linked
    assert models["httpRequest"]["userAgent"] == 'quote " agent'
    assert models["severity"] == "ERROR"  # its 503: no engine


def _samples(text: str) -> dict[tuple[str, frozenset], float]:
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_both_surfaces_are_counted_at_the_front_door(front) -> None:
    base, _, _ = front
    before = _samples(http_json(base + "/metrics")[2])
    asked = [("/v1/completions", b"{}"), ("/v1/completions", b"{}"), ("/predict", b"{}")]
    asked += [("/ping", None), ("/no/such/route", None), ("/v1/responses/resp_123", None)]
    for path, data in asked:
        http_json(base + path, data=data)
    after = _samples(http_json(base + "/metrics")[2])

    def grew(name: str, **labels: str) -> float:
        key = (name, frozenset(labels.items()))
        return after.get(key, 0) - before.get(key, 0)

    requests = "vgate_http_requests_total"
    assert grew(requests, surface="openai", route="/v1/completions", status="503") == 2
    assert grew(requests, surface="vertex", route="/predict", status="400") == 1  # no instances
    assert grew(requests, surface="health", route="/ping", status="503") == 1
    assert grew(requests, surface="other", route="other", status="404") == 1
    # A route vLLM names by id counts as one route, whatever the id.
    assert grew(requests, surface="openai", route="/v1/responses/{id}", status="503") == 1
    for histogram in ("vgate_http_request_duration_seconds", "vgate_http_first_byte_seconds"):
        labels = {"surface": "openai", "route": "/v1/completions"}
        assert grew(f"{histogram}_count", **labels) == 2
        assert grew(f"{histogram}_bucket", **labels, le="+Inf") == 2
        assert grew(f"{histogram}_bucket", **labels, le="60.0") == 2  # nginx's own 503s: fast


def test_health_says_starting_with_503(front) -> None:
    base, _, _ = front
    status, headers, body = http_json(base + "/health")
    assert status == 503 and body["status"] == "starting" and headers["Retry-After"] == "5"
    assert [r["state"] for r in body["replicas"]] == ["starting", "starting"]


def test_every_answer_has_a_request_id_and_keeps_the_clients(front) -> None:
    base, _, _ = front
    assert len(http_json(base + "/ping")[1]["X-Request-Id"]) == 32
    assert (
        http_json(base + "/ping", headers={"X-Request-Id": "abc-1"})[1]["X-Request-Id"] == "abc-1"
    )


def test_openai_routes_without_a_ready_engine_get_json_503(front) -> None:
    base, _, _ = front
    status, headers, body = http_json(base + "/v1/models")
    assert status == 503 and body["error"]["status"] == "UNAVAILABLE"
    assert headers["Retry-After"] == "5"


def test_predict_without_a_ready_engine_gets_json_503(front) -> None:
    base, _, _ = front
    status, _, body = http_json(base + "/predict", data=b'{"instances": [{"prompt": "a"}]}')
    assert status == 503 and "no engine is ready" in body["error"]["message"]


def test_body_over_the_limit_gets_json_413(front) -> None:
    base, _, _ = front
    for route in ("/predict", "/v1/completions"):
        status, _, body = http_json(base + route, data=b"x" * 100_001)
        assert status == 413 and body["error"]["code"] == 413, route


@pytest.mark.parametrize(
    ("route", "data", "status"),
    [
        ("/nope", None, 404),
        ("/predict", b"{bad", 400),
        ("/predict", b"{}", 400),
        ("/ping", b"{}", 405),
    ],
)
def test_bad_requests_get_json_errors(front, route: str, data: bytes | None, status: int) -> None:
    base, _, _ = front
    got, headers, body = http_json(base + route, data=data)
    assert got == status and body["error"]["code"] == status
    assert headers["Content-Type"].startswith("application/json")


def test_internal_listener_is_a_unix_socket_only(front) -> None:
    base, run_dir, procs = front
    nginx = psutil.Process(procs[0].pid)
    ports = {
        c.laddr.port
        for p in [nginx, *nginx.children()]
        for c in p.net_connections(kind="inet")
        if c.status == psutil.CONN_LISTEN
    }
    assert ports == {int(base.rsplit(":", 1)[1])}
    assert (run_dir / "engines.sock").is_socket()


class _Signals:
    """supervisord's part in a reload, done here directly: SIGHUP to nginx, or nothing."""

    def __init__(self, nginx: subprocess.Popen | None, sends: bool = True) -> None:
        self._nginx, self._sends = nginx, sends

    def reload_nginx(self) -> None:
        if self._nginx is None:
            raise OSError("nginx is not running")
        if self._sends:
            self._nginx.send_signal(signal.SIGHUP)


def _apply(run_dir: Path, reloads: _Signals, ready: set[int]) -> tuple[bool, str]:
    """(what apply_upstream said, the generation nginx serves afterwards)."""

    async def run() -> tuple[bool, str]:
        connector = aiohttp.UnixConnector(path=str(run_dir / "engines.sock"))
        timeout = aiohttp.ClientTimeout(total=5)
        async with aiohttp.ClientSession(connector=connector, timeout=timeout) as internal:
            workers = load_workers(run_dir / "engines.json")
            applied = await apply_upstream(internal, reloads, run_dir, workers, ready)  # type: ignore[arg-type]
            async with internal.get(monitor.GENERATION_URL) as resp:
                return applied, await resp.text()

    return asyncio.run(run())


def _written_generation(run_dir: Path) -> str:
    return (run_dir / UPSTREAM_FILE).read_text().split('default "', 1)[1].split('"', 1)[0]


def test_a_new_upstream_counts_once_nginx_serves_it(front) -> None:
    _, run_dir, procs = front
    applied, served = _apply(run_dir, _Signals(procs[0]), {0})
    assert applied and served == _written_generation(run_dir)
    text = (run_dir / UPSTREAM_FILE).read_text()
    assert text.count("server 127.0.0.1:") == 2 and text.count(" down;") == 1  # replica 1
    applied, _ = _apply(run_dir, _Signals(procs[0]), set())  # no engine, as the others expect
    assert applied


def test_a_reload_that_did_not_happen_is_not_counted(front, monkeypatch) -> None:
    _, run_dir, procs = front
    monkeypatch.setattr(monitor, "RELOAD_DEADLINE_S", 1.0)
    applied, served = _apply(run_dir, _Signals(None), {0})  # nginx could not be signalled
    assert not applied and served != _written_generation(run_dir)
    applied, served = _apply(run_dir, _Signals(procs[0], sends=False), {0})  # signal lost
    assert not applied and served != _written_generation(run_dir)
    assert _apply(run_dir, _Signals(procs[0]), set())[0]


def _raw(base: str, data: bytes) -> tuple[int, dict]:
    """Send bytes as they are; (status, JSON body) of nginx's answer."""
    host, port = base.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as conn:
        conn.sendall(data)
        answer = b""
        while chunk := conn.recv(65536):
            answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body)


def test_malformed_requests_get_json_errors(front) -> None:
    base, _, _ = front
    status, body = _raw(base, b"NOT HTTP AT ALL\r\n\r\n")
    assert status == 400 and body["error"]["message"].startswith("malformed HTTP request"), body
    status, body = _raw(base, b"GET /" + b"a" * 20_000 + b" HTTP/1.1\r\nHost: x\r\n\r\n")
    assert status == 414 and body["error"]["message"] == "the request URI is too long", body
    huge = b"GET /ping HTTP/1.1\r\nHost: x\r\nX-Big: " + b"b" * 20_000 + b"\r\n\r\n"
    status, body = _raw(base, huge)
    assert status == 400 and "headers are too large" in body["error"]["message"], body


def test_one_client_has_at_most_its_share_in_flight(front) -> None:
    base, _, _ = front
    host, port = base.removeprefix("http://").split(":")
    # Two requests held open in their body. nginx counts a request from its headers on and
    # answers 100 Continue only once it reads the body, past the count: waiting for it
    # keeps the third request from racing the held ones to another nginx worker.
    head = (
        b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\nExpect: 100-continue\r\n\r\n"
    )
    held = [socket.create_connection((host, int(port)), timeout=10) for _ in range(2)]
    try:
        for conn in held:
            conn.sendall(head)
            assert conn.recv(100).startswith(b"HTTP/1.1 100 Continue")
            conn.sendall(b"{")
        status, _, body = http_json(base + "/predict", {"instances": [{"prompt": "a"}]})
        assert status == 429 and "at most 2 from one client" in body["error"]["message"], body
    finally:
        for conn in held:
            conn.close()
    # Health is never counted against a client.
    assert http_json(base + "/health")[0] == 503


def test_a_drain_refuses_new_requests_and_finishes_those_in_flight(front) -> None:
    """Last in this module: the front answers nothing but 503 afterwards."""
    base, run_dir, _ = front
    host, port = base.removeprefix("http://").split(":")
    body = b'{"instances": [{"prompt": "a"}]}'
    head = f"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n"
    in_flight = socket.create_connection((host, int(port)), timeout=10)
    with in_flight:
        in_flight.sendall(head.encode() + b"Expect: 100-continue\r\n\r\n")
        assert in_flight.recv(100).startswith(b"HTTP/1.1 100 Continue")  # nginx holds it
        took: list[float] = []
        drainer = threading.Thread(target=lambda: took.append(drain(run_dir, 30)))
        drainer.start()

        def refused() -> dict | None:
            # Before the reload, the gateway's own 503 (no engine): not this one.
            status, headers, answer = http_json(base + "/ping", timeout=5)
            return headers if status == 503 and "shutting down" in str(answer) else None

        headers = wait_for(refused, 10, "readiness to answer 503 once draining")
        assert headers["Connection"] == "close" and headers["X-Request-Id"]
        status, _, answer = http_json(base + "/v1/completions", {"prompt": "a"})
        assert status == 503 and answer["error"]["message"] == "shutting down"
        assert drainer.is_alive()  # the request in flight holds it
        in_flight.sendall(body)  # ... and is answered by the gateway, as without a drain
        answer = in_flight.recv(65536)
        assert answer.startswith(b"HTTP/1.1 503") and b"no engine is ready" in answer, answer
    drainer.join(35)
    assert took and took[0] < 30, took  # done once the request was, not at the deadline
