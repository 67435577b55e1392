"""SIGTERM: refuse new work at once, let what is in flight finish, then stop.

A load balancer stops sending only once readiness fails, and nginx's own graceful
stop closes its listener: probes and late requests would meet a refused
connection. Instead nginx reloads with the front server answering every request
503 (readiness included) and closing the connection. A reload is nginx's own
graceful handover: the workers that hold requests finish them, streams included,
and exit; the new ones answer 503. The internal listener keeps serving, so
predict requests in flight still reach their engines. The drain is over when
every worker of before the reload has exited, or at the grace deadline.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from pathlib import Path

from engine.files import write_atomic
from gateway.control.nginx_launch import PID_FILE

log = logging.getLogger("vgate")

DRAIN_FILE = "draining.conf"
# Inside the front server block: every request (health and readiness too) gets this.
DRAINING = """\
default_type application/json;
keepalive_timeout 0;
return 503 '{"error":{"code":503,"status":"UNAVAILABLE","message":"shutting down"}}';
"""


def children(pid: int, proc: Path = Path("/proc")) -> set[int]:
    """The processes whose parent is `pid`."""
    found = set()
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:  # gone meanwhile
            continue
        # "pid (comm) state ppid ...": comm may hold spaces and parentheses.
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
            found.add(int(entry.name))
    return found


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie is not serving anything
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def drain(run_dir: Path, grace_s: float) -> float:
    """Refuse new requests, wait for those in flight; the seconds it took."""
    start = time.monotonic()
    try:
        master = int((run_dir / PID_FILE).read_text())
        workers = children(master)
        write_atomic(run_dir / DRAIN_FILE, DRAINING)
        os.kill(master, signal.SIGHUP)
    except (OSError, ValueError):  # no nginx (yet): nothing to drain
        return 0.0
    log.info(
        "stopping: new requests get 503; %d nginx worker(s) finish what they hold, for up to %g s",
        len(workers),
        grace_s,
    )
    while time.monotonic() - start < grace_s and any(alive(pid) for pid in workers):
        time.sleep(0.2)
    return time.monotonic() - start
