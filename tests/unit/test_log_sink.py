"""The container's log by a path: stdout itself when it can be opened again, else a
pipe of ours copied into it (tests/e2e/test_image.py has the real case: the image's
non-root user and a stdout pipe that belongs to root)."""

import os
import socket

from gateway.control.log_sink import open_sink


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
