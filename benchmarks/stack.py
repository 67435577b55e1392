"""Start a vgate stack (`vgate serve`) or plain vLLM's own server, and stop every process of it."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

from engine.workers import EngineWorker, load_workers
from tests.helpers import free_port, http_json, spawn, stop_tree, wait_for

STARTUP_DEADLINE_S = 600
# What a user would run without vgate (the module vLLM documents; 0.32 keeps it as an alias).
PLAIN_VLLM_MODULE = "vllm.entrypoints.openai.api_server"


@dataclass(frozen=True)
class Stack:
    proc: subprocess.Popen  # vgate serve (it runs supervisord), or plain vLLM's server
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

    def model(self) -> str:
        """The served model's name (the first in /v1/models)."""
        status, _, body = http_json(self.base + "/v1/models", timeout=10)
        if status != 200:
            raise RuntimeError(f"/v1/models answered {status}: {body!r}")
        return body["data"][0]["id"]


def vgate_argv(port: int, run_dir: Path, max_model_len: int, extra: list[str]) -> list[str]:
    vgate = Path(sys.executable).parent / "vgate"
    return [
        str(vgate), "serve", "--host", "127.0.0.1", "--port", str(port),
        "--run-dir", str(run_dir), "--gateway-workers", "1",
        "--max-model-len", str(max_model_len), *extra,
    ]  # fmt: skip


@contextmanager
def running_stack(
    run_dir: Path, max_model_len: int, extra_args: list[str] | None = None
) -> Iterator[Stack]:
    """The stack, every replica ready per /health; stopped on exit whatever happened.

    `extra_args`: more `vgate serve` flags; without them, one engine replica (`--replicas 1`).
    With them, vgate's own defaults apply to what they do not name.
    """
    extra = ["--replicas", "1"] if extra_args is None else extra_args
    port = free_port()
    run_dir.mkdir(parents=True, exist_ok=True)
    log = run_dir / "stack.log"
    proc = spawn(vgate_argv(port, run_dir, max_model_len, extra), log)
    stack = Stack(proc, port, run_dir, log)

    def ready() -> bool:
        if proc.poll() is not None:
            raise RuntimeError(f"vgate serve exited {proc.returncode}:\n{stack.log_tail()}")
        status, _, body = http_json(stack.base + "/health", timeout=5)
        return (
            status == 200
            and isinstance(body, dict)
            and body.get("ready_replicas", 0) >= 1
            and body.get("ready_replicas") == body.get("replicas_total")
        )

    try:
        wait_for(ready, STARTUP_DEADLINE_S, "every replica ready on /health", every=1.0)
        yield stack
    finally:
        stop_tree(proc)


@contextmanager
def running_vllm(
    run_dir: Path,
    model: str,
    max_model_len: int,
    extra_args: list[str] | None = None,
    env: dict[str, str] | None = None,
) -> Iterator[Stack]:
    """vLLM's own OpenAI server as a user would start it, ready; stopped on exit.

    Nothing of vgate's is set (no core binding, no KV cache size) but what `env` adds.
    """
    port = free_port()
    run_dir.mkdir(parents=True, exist_ok=True)
    log = run_dir / "vllm.log"
    argv = [sys.executable, "-m", PLAIN_VLLM_MODULE, "--model", model]
    argv += ["--host", "127.0.0.1", "--port", str(port), "--max-model-len", str(max_model_len)]
    argv += extra_args or []
    env = dict(os.environ, VLLM_NO_USAGE_STATS="1") | (env or {})
    proc = spawn(argv, log, env=env)
    stack = Stack(proc, port, run_dir, log)

    def ready() -> bool:
        if proc.poll() is not None:
            raise RuntimeError(f"vLLM exited {proc.returncode}:\n{stack.log_tail()}")
        status, _, _ = http_json(stack.base + "/v1/models", timeout=5)
        return status == 200

    try:
        wait_for(ready, STARTUP_DEADLINE_S, "plain vLLM to answer /v1/models", every=1.0)
        yield stack
    finally:
        stop_tree(proc)


ServerStart = Callable[[Path], AbstractContextManager[Stack]]


@contextmanager
def servers_for_rounds(
    starts: dict[str, ServerStart], root: Path, together: bool
) -> Iterator[Callable[[str], AbstractContextManager[Stack]]]:
    """`use(name)`: a context giving that server, for one round's work on it.

    `together`: every server is started first, one after the other (startups on a few
    cores must not overlap), and all stay up until the end. Otherwise each `use`
    starts the server and stops it after (on a GPU, servers would share its memory).
    Everything started is stopped on exit, whatever happened.
    """
    with ExitStack() as up:
        running: dict[str, Stack] = {}

        @contextmanager
        def start(name: str) -> Iterator[Stack]:
            t0 = time.monotonic()
            with starts[name](root / name.replace(" ", "-")) as stack:
                print(f"  {name} ready in {time.monotonic() - t0:.0f} s", flush=True)
                yield stack

        @contextmanager
        def use(name: str) -> Iterator[Stack]:
            if name in running:
                yield running[name]
            else:
                with start(name) as stack:
                    yield stack

        if together:
            for name in starts:
                running[name] = up.enter_context(start(name))
        yield use
