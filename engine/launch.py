"""Entry point of supervisord's engine program: run engine replica N, and leave nothing behind.

supervisord starts `python -m engine.launch N` (program engine-N) in a
process group of its own. This looks up replica N in the plan `vgate serve`
wrote and runs vLLM in that group. vLLM spawns an engine core and workers that
outlive a server killed with SIGKILL (an OOM kill, say) and would hold the
memory its restart needs; so when the server exits, for whatever reason,
everything left in the group is killed before supervisord restarts it.

vLLM's output passes through here on its way to the log, so that when it exits
the launcher can record why (engine.failures): the monitor reads these records
to tell a replica that cannot start from one that crashed once.
"""

from __future__ import annotations

import collections
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import IO

from engine.failures import Failure, classify
from engine.fetch_model import MODEL_READY
from engine.files import write_atomic
from engine.logs import LineWrapper, configure, log_format, readable, vllm_logging_config
from engine.placement import ENGINE_CPUS_ENV, pin
from engine.ray_cluster import wait_for_cluster
from engine.workers import find_worker, load_workers

log = logging.getLogger("vgate.engine")

# supervisord's socket asks for this password (supervisord.conf): unasked, it logs a
# CRIT line at every start, and any process of the same user could drive it. The
# engines do not get it.
SUPERVISOR_TOKEN_ENV = "VGATE_SUPERVISOR_TOKEN"

# Vertex gives a deployment 2 h, downloads included.
MODEL_WAIT_S = 7200


def wait_for_model(run_dir: Path, deadline_s: float = MODEL_WAIT_S) -> None:
    """Until the download program has the model in place (at once when nothing to fetch)."""
    end = time.monotonic() + deadline_s
    while not (run_dir / MODEL_READY).exists():
        if time.monotonic() > end:
            log.error("the model was not in place within %g s", deadline_s)
            raise SystemExit(1)
        time.sleep(1)


# vLLM's last lines kept for the exit record: a traceback's last line is among them.
TAIL_LINES = 60
# After the server exits, how long its last lines may take to come through the pipe.
RELAY_DRAIN_S = 2.0


def exits_path(run_dir: Path, replica: int) -> Path:
    return run_dir / f"engine-{replica}.exits"


def record_exit(run_dir: Path, replica: int, failure: Failure) -> None:
    """One JSON line per exit; appended, so a reader never sees half a record it counts."""
    line = json.dumps({"cause": failure.cause, "hint": failure.hint}) + "\n"
    with exits_path(run_dir, replica).open("a") as f:
        f.write(line)


def read_exits(run_dir: Path, replica: int) -> list[Failure]:
    try:
        lines = exits_path(run_dir, replica).read_text().splitlines()
    except OSError:
        return []
    return [Failure(**json.loads(line)) for line in lines if line.endswith("}")]


def relay(
    source: IO[bytes], tail: collections.deque[str], out: IO[bytes], wrapper: LineWrapper | None
) -> None:
    """Copy vLLM's output to `out` line by line, as JSON lines when `wrapper` is given (what
    vLLM's logging config does not cover: uvicorn, C++ libraries, tracebacks), keeping the
    last lines as a person reads them."""
    for line in source:
        text = line.decode(errors="replace")
        if wrapper is None:
            out.write(line)
        else:
            out.write(b"".join(entry + b"\n" for entry in wrapper.feed(text)))
        tail.extend(readable(text))
    if wrapper is not None:
        out.write(b"".join(entry + b"\n" for entry in wrapper.flush()))


def logging_config(run_dir: Path, replica: int, environ: dict[str, str]) -> dict[str, str]:
    """vLLM's logging in the container's format, through its own VLLM_LOGGING_CONFIG_PATH,
    unless the operator gave one."""
    if "VLLM_LOGGING_CONFIG_PATH" in environ:
        return {}
    path = run_dir / f"engine-{replica}.logging.json"
    config = vllm_logging_config(f"engine-{replica}", log_format(environ))
    write_atomic(path, json.dumps(config))
    return {"VLLM_LOGGING_CONFIG_PATH": str(path)}


def log_output() -> IO[bytes]:
    """The container's log, around supervisord (gateway/control/serve.py: direct_log_path)."""
    try:
        return open(os.environ["VGATE_LOG_PATH"], "ab", buffering=0)
    except (KeyError, OSError):
        return sys.stdout.buffer


def main(argv: list[str]) -> None:
    replica = int(argv[1])
    run_dir = Path(os.environ["VGATE_RUN_DIR"])
    worker = find_worker(load_workers(run_dir / "engines.json"), replica)
    configure(f"engine-{replica}")
    env = {**os.environ, **worker.env}
    env.update(logging_config(run_dir, replica, env))
    # vLLM must serve its own metrics on its own /metrics, not into a shared dir.
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    # The API keys guard the front door (nginx); the engines, on loopback, answer the
    # gateway and the monitor without them.
    for name in ("VLLM_API_KEY", "VGATE_API_KEY", "VGATE_API_KEYS", SUPERVISOR_TOKEN_ENV):
        env.pop(name, None)
    # A share of the KV cache as --kv-cache-memory-bytes (several models): vLLM's legacy
    # variable would override it, and reads an empty one as a number.
    if env.get("VLLM_CPU_KVCACHE_SPACE") == "":
        del env["VLLM_CPU_KVCACHE_SPACE"]
    # Every core back, from vgate's own (the engine's threads bind themselves).
    pin(env.pop(ENGINE_CPUS_ENV, None))
    wait_for_model(run_dir)
    if worker.cluster_gpus:
        wait_for_cluster(worker.cluster_gpus)
    # supervisord signals the whole group, vLLM included: this process only waits.
    # (A Python handler, unlike SIG_IGN, is not inherited by vLLM.)
    stopping = threading.Event()  # asked to stop: its exit is no failure
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stopping.set())
    out = subprocess.PIPE
    server = subprocess.Popen(worker.argv, env=env, stdout=out, stderr=subprocess.STDOUT)
    tail: collections.deque[str] = collections.deque(maxlen=TAIL_LINES)
    # In a thread: vLLM's engine core inherits the pipe and may outlive the server (an OOM
    # kill of the server alone), so the pipe's end does not tell that the server exited.
    wrapper = LineWrapper(f"engine-{replica}") if log_format(env) == "json" else None
    relaying = threading.Thread(
        target=relay, args=(server.stdout, tail, log_output(), wrapper), daemon=True
    )
    relaying.start()
    code = server.wait()
    relaying.join(timeout=RELAY_DRAIN_S)  # what it printed last is the cause
    if stopping.is_set():
        log.info("engine replica %d stopped (%s)", replica, code)
    else:
        failure = classify(list(tail), code)
        record_exit(run_dir, replica, failure)
        log.warning(
            "engine replica %d exited (%s): %s; stopping what it left",
            replica,
            code,
            failure.line(),
        )
    os.killpg(os.getpgrp(), signal.SIGKILL)  # this process too: supervisord restarts it


if __name__ == "__main__":
    main(sys.argv)
