"""What prefix-aware routing (nginx's Lua: vgate_routing.lua) costs nginx per request:
the same rendered config with --routing least-conn and --routing prefix, in front of
the same stand-in engines, rounds interleaved, for chat bodies of a few sizes.

The stand-in engines are a second nginx that answers every POST itself, so the front
nginx's CPU time (psutil, its own processes only) is all that differs: reading the
body in Lua, decoding its JSON, hashing its blocks, the shared-memory reads and writes
and the choice.
"""

from __future__ import annotations

import http.client
import json
import os
import shutil
import signal
import subprocess
import tempfile
from pathlib import Path

from benchmarks.front_metrics import cpu_seconds
from benchmarks.stats import percentile
from engine.demo_model import DEMO_MODEL_NAME
from engine.workers import load_workers
from gateway.config import resolve
from gateway.control import nginx_config
from gateway.control.serve import prepare
from tests.helpers import free_port, stop_tree, wait_for

PATH = "/v1/chat/completions"
ROUTINGS = ("least-conn", "prefix")
STANDIN = """daemon off; worker_processes 1; pid {run}/standin.pid; error_log stderr error;
events {{ worker_connections 1024; }}
http {{ access_log off; client_body_temp_path {run}/standin-body;
  server {{ {listens} location / {{ default_type application/json;
    return 200 '{{"choices":[]}}'; }} }} }}
"""


def chat_body(kib: int) -> bytes:
    """A conversation of about `kib` KiB: a system prompt and turns, as clients send it."""
    messages = [{"role": "system", "content": "You answer briefly. " * 20}]
    turn = 0
    while len(json.dumps(messages)) < kib * 1024:
        role = "user" if turn % 2 == 0 else "assistant"
        messages.append({"role": role, "content": f"turn {turn} " + "word " * 100})
        turn += 1
    return json.dumps({"model": DEMO_MODEL_NAME, "messages": messages, "max_tokens": 16}).encode()


def _front(run_dir: Path, routing: str) -> tuple[subprocess.Popen, subprocess.Popen, int]:
    """The front nginx (routing as asked) and the stand-in engines behind it, both ready."""
    port = free_port()
    argv = ["--host", "127.0.0.1", "--port", str(port), "--run-dir", str(run_dir)]
    argv += ["--replicas", "2", "--device", "cpu", "--routing", routing]
    _, env = prepare(resolve(argv, {}), dict(os.environ), "/dev/null")
    workers = load_workers(run_dir / "engines.json")
    listens = " ".join(f"listen 127.0.0.1:{w.port};" for w in workers)
    (run_dir / "standin.conf").write_text(STANDIN.format(run=run_dir, listens=listens))
    standin = subprocess.Popen(
        [env["VGATE_NGINX"], "-c", str(run_dir / "standin.conf")], process_group=0
    )
    front = subprocess.Popen(
        [env["VGATE_NGINX"], "-c", str(run_dir / "nginx.conf")], env=env, process_group=0
    )

    def answers(status: int) -> bool:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
        try:
            conn.request("POST", PATH, chat_body(1), {"Content-Type": "application/json"})
            return conn.getresponse().status == status
        except OSError:
            return False
        finally:
            conn.close()

    wait_for(lambda: answers(503), 30, "nginx to answer (no engine ready yet)")
    nginx_config.write_upstream(run_dir, workers, {0, 1}, "bench")
    front.send_signal(signal.SIGHUP)
    wait_for(lambda: answers(200), 30, "nginx to route to the stand-ins")
    return front, standin, port


def _round(front: subprocess.Popen, port: int, body: bytes, requests: int) -> float:
    """The front nginx's CPU microseconds per request over `requests` kept-alive requests."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    headers = {"Content-Type": "application/json"}
    before = cpu_seconds(front.pid)
    for _ in range(requests):
        conn.request("POST", PATH, body, headers)
        resp = conn.getresponse()
        resp.read()
        assert resp.status == 200, resp.status
    after = cpu_seconds(front.pid)
    conn.close()
    return (after - before) / requests * 1e6


def bench(
    sizes_kib: tuple[int, ...] = (1, 8, 32), requests: int = 5_000, rounds: int = 4
) -> dict[str, dict[str, list[float]]]:
    """{body size: {routing: nginx CPU us per request, a value per round}}."""
    if nginx_config.routing(None, nginx_config.lua_modules()) != "prefix":
        return {}
    root = Path(tempfile.mkdtemp(prefix="vgate-bench-routing-"))
    running = {}
    try:
        for routing in ROUTINGS:
            running[routing] = _front(root / routing, routing)
        results: dict[str, dict[str, list[float]]] = {}
        for kib in sizes_kib:
            body = chat_body(kib)
            results[f"{kib} KiB"] = per_size = {routing: [] for routing in ROUTINGS}
            for _ in range(rounds):
                for routing, (front, _, port) in running.items():
                    per_size[routing].append(_round(front, port, body, requests))
        return results
    finally:
        for front, standin, _ in running.values():
            stop_tree(front)
            stop_tree(standin)
        shutil.rmtree(root, ignore_errors=True)


def table(results: dict[str, dict[str, list[float]]]) -> str:
    lines = [
        "prefix-aware routing (nginx Lua): nginx CPU per request, median of rounds",
        f"  {'body':>8} {'least-conn':>11} {'prefix':>9} {'cost':>9}",
    ]
    for size, per in results.items():
        plain, routed = (percentile(per[k], 0.5) for k in ROUTINGS)
        lines.append(f"  {size:>8} {plain:9.1f}us {routed:7.1f}us {routed - plain:7.1f}us")
    return "\n".join(lines)


if __name__ == "__main__":
    print(table(bench()))
