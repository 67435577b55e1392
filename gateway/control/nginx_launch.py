"""nginx's launcher: clears what a master that died uncleanly left, then becomes nginx.

A master killed with SIGKILL leaves its workers running (they still hold the
front port) and its unix listening socket on disk; a new master could bind
neither. supervisord starts each program in a process group of its own, so the
old workers are that group: this launcher records its group (it becomes the
master, same pid) and, on the next start, kills whatever is left in the last
one and removes the socket before exec'ing nginx.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import time
from pathlib import Path

GROUP_FILE = "nginx.pgid"
SOCKETS = ("engines.sock",)
GONE_DEADLINE_S = 5.0


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    return True


def clear_leftovers(run_dir: Path) -> None:
    """Kill the last nginx's process group if any of it lives on; remove its sockets."""
    with contextlib.suppress(OSError, ValueError):
        pgid = int((run_dir / GROUP_FILE).read_text())
        if pgid != os.getpgrp() and _group_alive(pgid):
            print(f"vgate: nginx: stopping what the last master left (group {pgid})", flush=True)
            os.killpg(pgid, signal.SIGKILL)
            end = time.monotonic() + GONE_DEADLINE_S
            while _group_alive(pgid) and time.monotonic() < end:
                time.sleep(0.05)
    for name in SOCKETS:
        (run_dir / name).unlink(missing_ok=True)


def main() -> None:
    run_dir = Path(os.environ["VGATE_RUN_DIR"])
    clear_leftovers(run_dir)
    (run_dir / GROUP_FILE).write_text(str(os.getpgrp()))
    nginx = os.environ["VGATE_NGINX"]
    os.execv(nginx, [nginx, "-c", str(run_dir / "nginx.conf")])


if __name__ == "__main__":
    main()
    sys.exit(1)
