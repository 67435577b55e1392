"""The watchdog's probes and verdicts, on real files, sockets and processes."""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from gateway.control.liveness import HUNG_AFTER_S, ReplicaWatch
from gateway.control.watchdog import check, heartbeat_fresh, nginx_answers
from gateway.state import STATE_FILE, write_state


@contextmanager
def unix_server(path: Path, answer: bytes | None) -> Iterator[None]:
    """Accepts on `path`; answers `answer` to each request, or nothing (hangs)."""
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(path))
    server.listen()
    held: list[socket.socket] = []

    def serve() -> None:
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            conn.recv(1024)
            if answer is not None:
                conn.sendall(answer)
            held.append(conn)

    threading.Thread(target=serve, daemon=True).start()
    try:
        yield
    finally:
        server.close()
        for conn in held:
            conn.close()


def test_the_monitor_heartbeat_is_its_state_file(tmp_path: Path) -> None:
    state = tmp_path / STATE_FILE
    assert not heartbeat_fresh(state, time.time())  # not written yet
    write_state(state, [], now=time.time() - 1)
    assert heartbeat_fresh(state, time.time())
    write_state(state, [], now=time.time() - 60)
    assert not heartbeat_fresh(state, time.time())
    state.write_text("{")  # torn or foreign: no heartbeat
    assert not heartbeat_fresh(state, time.time())


def test_nginx_answers_only_with_a_200_in_time(tmp_path: Path) -> None:
    path = tmp_path / "engines.sock"
    assert not nginx_answers(path)  # nothing listens
    with unix_server(path, b"HTTP/1.1 200 OK\r\n\r\nstart"):
        assert nginx_answers(path)
    path.unlink()
    with unix_server(path, None):
        started = time.monotonic()
        assert not nginx_answers(path)
        assert time.monotonic() - started < 5


class _Programs:
    def __init__(self, pids: dict[str, int]):
        self.pids = pids

    def program(self, name: str) -> tuple[str, int]:
        return "RUNNING", self.pids[name]


def test_a_hung_monitor_is_killed_and_a_live_nginx_is_not(tmp_path: Path) -> None:
    sleeper = [sys.executable, "-c", "import time; time.sleep(60)"]
    monitor = subprocess.Popen(sleeper, process_group=0)
    nginx = subprocess.Popen(sleeper, process_group=0)
    try:
        write_state(tmp_path / STATE_FILE, [], now=time.time() - 60)  # it stopped writing
        now = time.monotonic()
        # Both answered once started, and last long ago.
        watches = {
            name: ReplicaWatch(ready_since_start=True, last_answer=now - 2 * HUNG_AFTER_S)
            for name in ("monitor", "nginx")
        }
        with unix_server(tmp_path / "engines.sock", b"HTTP/1.1 200 OK\r\n\r\nstart"):
            check(tmp_path, _Programs({"monitor": monitor.pid, "nginx": nginx.pid}), watches)  # type: ignore[arg-type]
        assert monitor.wait(10) == -9
        assert nginx.poll() is None  # it answered
        assert watches["monitor"] == ReplicaWatch()  # the new one starts from nothing
    finally:
        for p in (monitor, nginx):
            p.kill()
            p.wait(10)
