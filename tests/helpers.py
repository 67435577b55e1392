"""Shared by the integration and end-to-end tests: ports, polling with deadlines, process trees."""

from __future__ import annotations

import contextlib
import http.client
import http.server
import json
import os
import signal
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import psutil
import pytest

T = TypeVar("T")


def http_json(
    url: str,
    body: object | None = None,
    *,
    data: bytes | None = None,
    headers: dict[str, str] | None = None,
    timeout: float = 60,
) -> tuple[int, dict[str, str], Any]:
    """(status, headers, parsed body) of a GET, or a POST of `body` as JSON or of raw `data`.

    Status 0: nothing answered. A body that is not JSON comes back as text.
    """
    if body is not None:
        data = json.dumps(body).encode()
    req = urllib.request.Request(
        url, data=data, headers={"Content-Type": "application/json", **(headers or {})}
    )
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            status, headers, raw = resp.status, dict(resp.headers), resp.read()
    except urllib.error.HTTPError as e:
        with e:  # else its socket lives until a garbage collection, held open toward the server
            status, headers, raw = e.code, dict(e.headers), e.read()
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return 0, {}, None
    try:
        return status, headers, json.loads(raw)
    except ValueError:
        return status, headers, raw.decode(errors="replace")


def hang_up(conn: http.client.HTTPConnection) -> None:
    """Go away mid-request, as a client that gives up does."""
    conn.sock.shutdown(socket.SHUT_RDWR)
    conn.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(check: Callable[[], T | None], deadline_s: float, what: str, every: float = 0.5) -> T:
    """Poll until check() returns something truthy, or fail naming what did not happen."""
    end = time.monotonic() + deadline_s
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > end:
            raise AssertionError(f"timed out after {deadline_s:g} s waiting for {what}")
        time.sleep(every)


def descendants(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def spawn(argv: list[str], log: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    """A process in a process group of its own, its output in `log`; stop it with stop_tree.

    Not a session of its own: the kernel schedules each session as one group
    (autogroup), and a stack's spinning CPU engines in another session left the
    test process unscheduled for seconds at a time, so streams looked buffered.
    """
    # Appending: the process and the processes it starts (supervisord opens /dev/stdout
    # anew) write to the log through different file descriptions.
    with log.open("ab") as out:
        return subprocess.Popen(
            argv, stdout=out, stderr=subprocess.STDOUT, process_group=0, env=env
        )


# Cloud Logging's severities (engine/logs.py writes these and no others).
SEVERITIES = frozenset(
    ("DEFAULT", "DEBUG", "INFO", "NOTICE", "WARNING", "ERROR", "CRITICAL", "ALERT", "EMERGENCY")
)


def log_entries(text: str) -> list[dict[str, Any]]:
    """Every line of a vgate log as the Cloud Logging entry it must be."""
    entries = []
    for number, line in enumerate(text.splitlines(), 1):
        try:
            entry = json.loads(line)
        except ValueError:
            raise AssertionError(f"log line {number} is not JSON: {line[:300]!r}") from None
        assert isinstance(entry, dict), f"log line {number} is not an object: {line[:300]!r}"
        assert entry.get("severity") in SEVERITIES, f"log line {number}: {line[:300]!r}"
        for field in ("message", "time", "process"):
            assert isinstance(entry.get(field), str) and entry[field], (number, field, line)
        entries.append(entry)
    return entries


def log_messages(path: Path) -> list[str]:
    return [e["message"] for e in log_entries(path.read_text(errors="replace"))]


def stop_tree(proc: subprocess.Popen, grace_s: float = 60) -> None:
    """Stop a process started by spawn() and everything under it."""
    family = descendants(proc.pid)
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=grace_s)
    if proc.poll() is None:
        proc.kill()
    for p in family:  # captured before the stop, so orphans re-parented since are in it
        with contextlib.suppress(psutil.NoSuchProcess):
            p.kill()
    proc.wait(timeout=10)


class _Counted(http.server.BaseHTTPRequestHandler):
    hits = 0

    def do_GET(self) -> None:
        type(self).hits += 1
        self.send_response(200)
        self.send_header("Content-Length", "5")
        self.end_headers()
        self.wfile.write(b"bytes")

    def log_message(self, *args: object) -> None:
        pass


@contextlib.contextmanager
def loopback_http(handler: type[http.server.BaseHTTPRequestHandler]) -> Iterator[int]:
    """`handler` served on a loopback port in a thread (the port), stopped on exit."""
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield httpd.server_address[1]
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(10)


@contextlib.contextmanager
def small_disk(where: Path, size: str) -> Iterator[Path]:
    """A tmpfs of `size` ("64k") at where/disk, for full-disk cases (this needs root, as
    CI has)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small disk needs root")
    mount = where / "disk"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mount)], check=True)
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=True)


@contextlib.contextmanager
def counting_http_server() -> Iterator[tuple[int, Callable[[], int]]]:
    """An HTTP server on loopback that answers GETs and counts them: (port, hits())."""
    handler = type("Counted", (_Counted,), {"hits": 0})
    with loopback_http(handler) as port:
        yield port, lambda: handler.hits
