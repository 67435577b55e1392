"""The container's log by a path: stdout itself when it can be opened again, else a
pipe of ours copied into it (tests/e2e/test_image.py has the real case: the image's
non-root user and a stdout pipe that belongs to root)."""

import json
import os
import socket

from gateway.control.log_sink import open_sink, open_wrapper


def test_a_stdout_that_can_be_opened_again_is_used_as_it_is(tmp_path) -> None:
    with open(tmp_path / "log", "wb") as out:
        sink = open_sink(out.fileno())
        assert sink.fd == out.fileno() and sink.relay is None
        assert sink.path == f"/proc/{os.getpid()}/fd/{out.fileno()}"


def test_a_socket_gets_a_pipe_whose_lines_reach_it() -> None:
    ours, runtime = socket.socketpair()  # a socket cannot be opened by its /proc path
    sink = open_sink(ours.fileno())
    assert sink.fd != ours.fileno() and sink.relay is not None
    writer = os.open(sink.path, os.O_WRONLY | os.O_APPEND)  # as nginx and vLLM do
    lines = [f"line {i}\n".encode() * 50 for i in range(200)]
    for line in lines:
        os.write(writer, line)
    os.close(writer)
    sink.close()
    assert not sink.relay.is_alive()
    ours.close()
    got = b""
    while chunk := runtime.recv(1 << 16):
        got += chunk
    assert got == b"".join(lines)


def test_what_is_not_json_reaches_the_sink_as_json_entries(tmp_path) -> None:
    sink = os.open(tmp_path / "log", os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    wrapper = open_wrapper(sink, "vgate")
    writer = os.open(f"/proc/{os.getpid()}/fd/{wrapper.fd}", os.O_WRONLY | os.O_APPEND)
    os.write(writer, b"2026-12-01 09:00:00,123 WARN exited: engine-1 (terminated by SIGKILL)\n")
    os.write(writer, b'{"severity": "INFO", "message": "ready", "process": "monitor"}\n')
    os.write(writer, b"2026/12/01 09:00:00 [alert] 9#9: worker process 10 exited on signal 9\n")
    os.write(writer, b"x" * 70_000 + b"\n")  # longer than one read: cut, never unbounded
    os.close(writer)
    wrapper.close()
    assert not wrapper.relay.is_alive()
    os.close(sink)
    entries = [json.loads(line) for line in (tmp_path / "log").read_bytes().splitlines()]
    assert [(e["severity"], e["process"]) for e in entries[:3]] == [
        ("WARNING", "supervisord"),
        ("INFO", "monitor"),
        ("ALERT", "nginx"),
    ]
    assert entries[0]["message"] == "exited: engine-1 (terminated by SIGKILL)"
    assert "".join(e["message"] for e in entries[3:]) == "x" * 70_000
