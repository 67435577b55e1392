"""nginx's launcher: takes over from a master that died uncleanly, then becomes nginx.

A master killed with SIGKILL leaves its workers running: they still accept on
the front port and finish the requests they hold. supervisord starts each
program in a process group of its own, so those workers are the last group this
launcher recorded. The new master binds beside them (the front listener has
`reuseport`), and only once it serves are the old workers told to quit
gracefully (SIGQUIT: stop accepting, finish what they hold), then killed after
the stop grace: no connection is refused and no request cut on the way. The
old unix listener's path is removed first so the new master can bind it (the
old workers keep their unlinked socket).
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import time
from pathlib import Path

from engine.logs import configure

log = logging.getLogger("vgate.nginx")

GROUP_FILE = "nginx.pgid"
PID_FILE = "nginx.pid"
SOCKETS = ("engines.sock",)
NEW_MASTER_DEADLINE_S = 10.0


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    return True


def _retire(run_dir: Path, old: int, grace_s: float) -> None:
    """In a child: once the new master serves, the old group quits, or is killed."""
    end = time.monotonic() + NEW_MASTER_DEADLINE_S
    while time.monotonic() < end:
        with contextlib.suppress(OSError, ValueError):
            if int((run_dir / PID_FILE).read_text()) == os.getppid():
                break
        time.sleep(0.1)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(old, signal.SIGQUIT)
    end = time.monotonic() + grace_s
    while group_alive(old) and time.monotonic() < end:
        time.sleep(0.2)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(old, signal.SIGKILL)


def take_over(run_dir: Path, grace_s: float) -> None:
    """Retire what the last nginx left, if anything; clear its unix listener's path."""
    with contextlib.suppress(OSError, ValueError):
        old = int((run_dir / GROUP_FILE).read_text())
        if old != os.getpgrp() and group_alive(old):
            log.warning("taking over from the last master's workers (%d)", old)
            if os.fork() == 0:
                try:
                    _retire(run_dir, old, grace_s)
                finally:
                    os._exit(0)
    for name in SOCKETS:
        (run_dir / name).unlink(missing_ok=True)


def main() -> None:
    configure("nginx-launcher")
    run_dir = Path(os.environ["VGATE_RUN_DIR"])
    take_over(run_dir, float(os.environ.get("VGATE_STOP_GRACE", "30")))
    (run_dir / GROUP_FILE).write_text(str(os.getpgrp()))
    nginx = os.environ["VGATE_NGINX"]
    # No `-e stderr`: nginx before 1.19.5 (Ubuntu 22.04's, in GPU bases) refuses it; a
    # non-root nginx that cannot open its built-in error log writes to stderr anyway.
    os.execv(nginx, [nginx, "-c", str(run_dir / "nginx.conf")])


if __name__ == "__main__":
    main()
    sys.exit(1)
