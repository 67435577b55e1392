"""What counting the front door's requests (nginx's Lua, vgate_front_metrics.lua) costs
nginx per request: the same rendered config with and without it, rounds interleaved.

nginx answers the requests itself (a closed admin route's JSON 404), so its CPU time is
all there is to measure; the difference between the two configs, per request, is what
the counting costs. Counted from the nginx processes' own CPU time (psutil), which the
load generator sharing the cores does not disturb the way wall time would.
"""

from __future__ import annotations

import http.client
import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from unittest import mock

import psutil

from benchmarks.stats import percentile
from gateway.config import resolve
from gateway.control import nginx_config
from gateway.control.serve import prepare
from tests.helpers import free_port, stop_tree, wait_for

PATH = "/v1/load_lora_adapter"  # closed: nginx's own 404


def _nginx(run_dir: Path, counted: bool) -> tuple[subprocess.Popen, int]:
    port = free_port()
    argv = ["--host", "127.0.0.1", "--port", str(port), "--run-dir", str(run_dir)]
    # least_conn in both: prefix routing is Lua too, and only the counting is measured here.
    argv += ["--replicas", "1", "--routing", "least-conn"]
    config = resolve(argv, {})
    modules = nginx_config.lua_modules() if counted else []
    with mock.patch.object(nginx_config, "lua_modules", return_value=modules):
        _, env = prepare(config, dict(os.environ), "/dev/null")
    proc = subprocess.Popen(
        [env["VGATE_NGINX"], "-c", str(run_dir / "nginx.conf")], env=env, process_group=0
    )

    def answers() -> bool:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
        try:
            conn.request("GET", PATH)
            return conn.getresponse().status == 404
        except OSError:
            return False
        finally:
            conn.close()

    wait_for(answers, 30, "nginx to answer")
    return proc, port


def cpu_seconds(pid: int) -> float:
    """CPU seconds of a process and its children (nginx: the master and its workers)."""
    family = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
    return sum(sum(p.cpu_times()[:2]) for p in family)


def _round(proc: subprocess.Popen, port: int, requests: int) -> float:
    """nginx's CPU microseconds per request over `requests` kept-alive requests."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    before = cpu_seconds(proc.pid)
    for _ in range(requests):
        conn.request("GET", PATH)
        conn.getresponse().read()
    after = cpu_seconds(proc.pid)
    conn.close()
    return (after - before) / requests * 1e6


def bench(requests: int = 20_000, rounds: int = 4) -> dict[str, list[float]]:
    if not nginx_config.lua_modules():
        return {}
    root = Path(tempfile.mkdtemp(prefix="vgate-bench-lua-"))
    running = {}
    try:
        for name, counted in (("plain", False), ("counted", True)):
            running[name] = _nginx(root / name, counted)
        results: dict[str, list[float]] = {name: [] for name in running}
        for _ in range(rounds):
            for name, (proc, port) in running.items():
                results[name].append(_round(proc, port, requests))
        return results
    finally:
        for proc, _ in running.values():
            stop_tree(proc)
        shutil.rmtree(root, ignore_errors=True)


def table(results: dict[str, list[float]]) -> str:
    plain, counted = (percentile(results[k], 0.5) for k in ("plain", "counted"))
    return "\n".join(
        [
            "front-door metrics (nginx Lua): nginx CPU per request, median of rounds",
            f"  without counting {plain:7.1f} us",
            f"  with counting    {counted:7.1f} us",
            f"  cost             {counted - plain:7.1f} us per request",
        ]
    )


if __name__ == "__main__":
    print(table(bench()))
