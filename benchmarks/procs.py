"""CPU time of each role in the stack, from psutil, so overhead is seen per process.

On 2 shared cores absolute speed is noisy; CPU seconds spent per streamed token
by each process is the figure that says what nginx and the gateway cost.
"""

from __future__ import annotations

import contextlib
import os
from collections import defaultdict

import psutil

from engine.workers import VLLM_SERVER_MODULE
from tests.helpers import descendants

# Report order. "engine core+workers" are the API server's descendants.
ROLES = (
    "nginx",
    "gateway",
    "monitor",
    "supervisord",
    "api server",
    "engine core+workers",
    "loadgen",
    "other",
    "outside",
)
API_SERVER = VLLM_SERVER_MODULE

Key = tuple[int, float]  # (pid, create time): survives pid reuse
Snapshot = dict[Key, tuple[str, str, float]]  # key -> (role, process name, user+system s)
MACHINE: Key = (-1, 0.0)  # busy CPU seconds of the whole machine, all cores


def _role(p: psutil.Process, api_pids: set[int], root: int) -> str:
    if p.pid == os.getpid():
        return "loadgen"
    cmd = " ".join(p.cmdline())
    if p.pid == root or "supervisor.supervisord" in cmd:  # vgate serve, and its supervisord
        return "supervisord"
    if API_SERVER in cmd:
        return "api server"
    if any(parent.pid in api_pids for parent in p.parents()):
        return "engine core+workers"
    if "nginx" in p.name() or "nginx" in cmd:
        return "nginx"
    if "gateway.worker" in cmd:
        return "gateway"
    if "gateway.control.monitor" in cmd:
        return "monitor"
    return "other"


def snapshot(root: int) -> Snapshot:
    """CPU seconds so far of supervisord, everything under it, and this load generator."""
    procs = [psutil.Process(root), *descendants(root), psutil.Process()]
    api_pids = set()
    for p in procs:
        with contextlib.suppress(psutil.Error):
            if API_SERVER in " ".join(p.cmdline()):
                api_pids.add(p.pid)
    t = psutil.cpu_times()
    out: Snapshot = {MACHINE: ("machine", "", t.user + t.nice + t.system + t.irq + t.softirq)}
    for p in procs:
        with contextlib.suppress(psutil.Error):
            t = p.cpu_times()
            out[(p.pid, p.create_time())] = (_role(p, api_pids, root), p.name(), t.user + t.system)
    return out


def cpu_by_role(before: Snapshot, after: Snapshot) -> dict[str, float]:
    """CPU seconds each role used between two snapshots (a process born in between counts whole).

    "outside" is the machine's busy time not spent in any process measured here: other
    people's processes and kernel work not charged to a process. It says how noisy a
    round was. A process that exited in between is lost; none should during a benchmark.
    """
    used: dict[str, float] = defaultdict(float)
    for key, (role, _, cpu) in after.items():
        used[role] += cpu - before.get(key, (role, "", 0.0))[2]
    machine = used.pop("machine")
    used["outside"] = machine - sum(used.values())
    return {role: used.get(role, 0.0) for role in ROLES}


def describe(snap: Snapshot) -> list[dict[str, object]]:
    """Which processes had which role, for the JSON record."""
    rows = [(role, name, pid) for (pid, _), (role, name, _) in snap.items() if role in ROLES]
    rows.sort(key=lambda r: (ROLES.index(r[0]), r[2]))
    return [{"pid": pid, "role": role, "name": name} for role, name, pid in rows]
