"""The container's log, by a path every process of vgate can open.

nginx's access log, vLLM's output (engine/launch.py) and supervisord's programs
write to `vgate serve`'s stdout themselves, a whole line per write, instead of
through supervisord's one Python loop, which stalls them when it falls behind.
They open it again as /proc/<pid>/fd/N. A pipe or FIFO the container runtime
made belongs to root: a non-root user (the image's) can write it through the
descriptor it inherited but not open it again (EACCES), and a socket never can.
Then `vgate serve` makes a pipe of its own and copies it into its stdout in a
thread: a read and a write per 64 KiB, nothing parsed.

supervisord's own lines, and what its programs print that is not JSON already
(nginx's error log above all), pass through `open_wrapper`: a pipe whose lines
become JSON entries (engine.logs.LineWrapper) on their way to the sink.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass

from engine.logs import LineWrapper

CHUNK = 1 << 16


def reopenable(path: str) -> bool:
    try:
        os.close(os.open(path, os.O_WRONLY | os.O_APPEND))
    except OSError:
        return False
    return True


def _write_all(target: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(target, view) :]


def _copy(source: int, target: int) -> None:
    """Until every writer has closed the pipe."""
    while chunk := os.read(source, CHUNK):
        _write_all(target, chunk)
    os.close(source)


def _wrap(source: int, target: int, wrapper: LineWrapper) -> None:
    """Line by line (a line longer than CHUNK is cut into entries), until every writer
    has closed the pipe."""
    with os.fdopen(source, "rb", buffering=CHUNK) as lines:
        while raw := lines.readline(CHUNK):
            entries = wrapper.feed(raw.decode(errors="replace"))
            _write_all(target, b"".join(entry + b"\n" for entry in entries))
    _write_all(target, b"".join(entry + b"\n" for entry in wrapper.flush()))


@dataclass
class LogSink:
    fd: int  # where vgate's processes write: stdout itself, or our pipe into it
    relay: threading.Thread | None = None

    @property
    def path(self) -> str:
        return f"/proc/{os.getpid()}/fd/{self.fd}"

    def close(self, timeout_s: float = 2.0) -> None:
        """Let the relay copy what is left, once the writers are gone."""
        if self.relay is not None:
            os.close(self.fd)
            self.relay.join(timeout_s)


def open_sink(stdout: int = 1) -> LogSink:
    if reopenable(f"/proc/{os.getpid()}/fd/{stdout}"):
        return LogSink(stdout)
    source, sink = os.pipe()
    relay = threading.Thread(target=_copy, args=(source, stdout), name="log-relay", daemon=True)
    relay.start()
    return LogSink(sink, relay)


def open_wrapper(target: int, process: str) -> LogSink:
    """A pipe whose lines reach `target` as JSON entries, from `process` unless they say."""
    source, sink = os.pipe()
    relay = threading.Thread(
        target=_wrap, args=(source, target, LineWrapper(process)), name="log-wrap", daemon=True
    )
    relay.start()
    return LogSink(sink, relay)
