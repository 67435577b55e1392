"""The watchdog of the monitor and nginx: a supervisord event listener, woken by TICK_5.

supervisord restarts a program that exits, not one that stops (SIGSTOP, a
deadlock). The monitor watches the engines and the gateway workers; this
watches the monitor and nginx, with the same rise/fall rule (liveness.py):

- the monitor: its heartbeat is the state file it writes on every poll. One that
  wrote since it started and then has not for HUNG_AFTER_S is killed, well
  before the gateways call its state stale (STALE_AFTER_S) and readiness fails.
- nginx: a request nginx answers itself on the internal socket, within
  PROBE_TIMEOUT_S. A master that stops answering is killed with its workers;
  supervisord starts nginx again through its launcher, which takes over.

Events come on stdin and answers go on stdout (supervisord's protocol): logs
go to stderr.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import socket
import sys
import time
import xmlrpc.client
from pathlib import Path
from urllib.parse import urlsplit

from supervisor import childutils

from engine.logs import configure
from gateway.control.liveness import ReplicaWatch
from gateway.control.monitor import GENERATION_URL, Supervisor
from gateway.state import STATE_FILE

log = logging.getLogger("vgate.watchdog")

PROBE_TIMEOUT_S = 2.0
HEARTBEAT_FRESH_S = 5.0  # the monitor writes every second; a slow poll takes a few
# What the monitor asks nginx after a reload: nginx answers it itself.
NGINX_PROBE = f"GET {urlsplit(GENERATION_URL).path} HTTP/1.0\r\nHost: internal\r\n\r\n".encode()


def nginx_answers(socket_path: Path) -> bool:
    try:
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(PROBE_TIMEOUT_S)
            s.connect(str(socket_path))
            s.sendall(NGINX_PROBE)
            return s.recv(64).startswith(b"HTTP/1.1 200")
    except OSError:
        return False


def heartbeat_fresh(state_file: Path, now: float) -> bool:
    try:
        return now - json.loads(state_file.read_text())["updated"] < HEARTBEAT_FRESH_S
    except (OSError, ValueError, KeyError, TypeError):
        return False


def check(run_dir: Path, supervisor: Supervisor, watches: dict[str, ReplicaWatch]) -> None:
    """One tick: probe the monitor and nginx; kill (the group of) one that hangs."""
    try:
        programs = {name: supervisor.program(name) for name in watches}
    except (OSError, xmlrpc.client.Error):
        return  # supervisord says nothing now: no verdict
    now = time.monotonic()
    probes = {
        "monitor": heartbeat_fresh(run_dir / STATE_FILE, time.time()),
        "nginx": nginx_answers(run_dir / "engines.sock"),
    }
    for name, watch in watches.items():
        state, pid = programs[name]
        watch.probe(now, state, probes[name])
        reason = watch.restart_reason(now)
        if reason and state == "RUNNING" and pid:
            log.warning("%s: restarting: %s", name, reason)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)
            watches[name] = ReplicaWatch()


def main() -> None:
    configure("watchdog")  # to stderr: stdout is supervisord's event protocol
    run_dir = Path(os.environ["VGATE_RUN_DIR"])
    supervisor = Supervisor(run_dir)
    watches = {"monitor": ReplicaWatch(), "nginx": ReplicaWatch()}
    while True:
        childutils.listener.wait(sys.stdin, sys.stdout)
        try:
            check(run_dir, supervisor, watches)
        finally:
            childutils.listener.ok(sys.stdout)


if __name__ == "__main__":
    main()
