"""Start one vgate stack (`vgate serve`, 1 engine replica) and stop every process of it."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from engine.workers import EngineWorker, load_workers
from tests.helpers import free_port, http_json, spawn, stop_tree, wait_for

STARTUP_DEADLINE_S = 600


@dataclass(frozen=True)
class Stack:
    proc: subprocess.Popen  # vgate serve (it runs supervisord)
    port: int
    run_dir: Path
    log: Path

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def engines(self) -> list[EngineWorker]:
        return load_workers(self.run_dir / "engines.json")

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])


@contextmanager
def running_stack(run_dir: Path, max_model_len: int) -> Iterator[Stack]:
    """The stack, ready (1 replica ready per /health); stopped on exit whatever happened."""
    port = free_port()
    log = run_dir / "stack.log"
    vgate = Path(sys.executable).parent / "vgate"
    argv = [
        str(vgate), "serve", "--host", "127.0.0.1", "--port", str(port),
        "--run-dir", str(run_dir), "--replicas", "1", "--gateway-workers", "1",
        "--max-model-len", str(max_model_len),
    ]  # fmt: skip
    proc = spawn(argv, log)
    stack = Stack(proc, port, run_dir, log)

    def ready() -> bool:
        if proc.poll() is not None:
            raise RuntimeError(f"vgate serve exited {proc.returncode}:\n{stack.log_tail()}")
        status, _, body = http_json(stack.base + "/health", timeout=5)
        return status == 200 and body.get("ready_replicas") == 1

    try:
        wait_for(ready, STARTUP_DEADLINE_S, "1 ready replica on /health", every=1.0)
        yield stack
    finally:
        stop_tree(proc)
