"""The whole stack, started once per session: `vgate serve`, 2 CPU replicas, the demo model."""

from __future__ import annotations

import contextlib
import http.client
import json
import math
import os
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import psutil
import pytest
from prometheus_client.parser import text_string_to_metric_families

from engine.demo_model import DEMO_MODEL_NAME, write_demo_model
from engine.workers import EngineWorker, load_workers
from tests.gcs_emulator import client, emulator, upload_dir
from tests.helpers import (
    descendants,
    free_port,
    hang_up,
    http_json,
    spawn,
    stop_tree,
    wait_for,
)

STARTUP_DEADLINE_S = 600
# Sequences in flight: as many as nginx's limit_conn takes, so that work sized from the
# engines' rate always fits; tests/e2e/test_admission.py has a stack with a small bound.
MAX_INFLIGHT = 65535
REQUEST_TIMEOUT_S = 20
MAX_MODEL_LEN = 1024
REPLICAS = 2
ENGINE_MAX_NUM_SEQS = 128  # vLLM 0.32's --max-num-seqs on the CPU: sequences an engine runs at once
MODEL_URI = "gs://vertex-models/demo/v2"  # AIP_STORAGE_URI: the demo model, uploaded
HF_TOKEN = "hf_vgate_test_token"
# The longest sequence a test asks for: the demo model's context (MAX_MODEL_LEN) less the prompt.
SEQUENCE_TOKENS = 1000
# How much longer than needed sized work is: covers a rate measured while the machine was
# busier (2 noisy cores) than when the sized work runs.
MARGIN = 4
CALIBRATION_WINDOW_S = 3.0
# As Vertex sets them: both start with /v1/, which is otherwise vLLM's.
VERTEX_ENV = {
    "AIP_HEALTH_ROUTE": "/v1/endpoints/123/deployedModels/456",
    "AIP_PREDICT_ROUTE": "/v1/endpoints/123/deployedModels/456:predict",
}


@dataclass
class Stack:
    proc: subprocess.Popen
    base: str
    run_dir: Path
    log: Path
    pings: list[int] = field(default_factory=list)
    _rate: float | None = None

    def workers(self) -> list[EngineWorker]:
        return load_workers(self.run_dir / "engines.json")

    def engine_server(self, replica: int) -> psutil.Process:
        """The vLLM API server of engine replica `replica`."""
        port = str(self.workers()[replica].port)
        for p in descendants(self.proc.pid):
            try:
                cmd = p.cmdline()
            except psutil.NoSuchProcess:
                continue
            if "--port" in cmd and cmd[cmd.index("--port") + 1] == port and "--model" in cmd:
                return p
        raise AssertionError(f"no engine server for replica {replica}")

    def request(
        self, path: str, body: object | None = None, timeout: float = 60
    ) -> tuple[int, Any]:
        """(status, parsed body) from the front door; status 0: nothing answered."""
        status, _, parsed = http_json(self.base + path, body, timeout=timeout)
        return status, parsed

    def metrics(self) -> dict[tuple[str, str], float]:
        """{(sample name, replica): value summed over other labels} from the front door."""
        status, _, text = http_json(self.base + "/metrics", timeout=10)
        assert status == 200, f"/metrics said {status}"
        totals: dict[tuple[str, str], float] = defaultdict(float)
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                totals[(s.name, s.labels.get("replica", ""))] += s.value
        return totals

    def total(self, name: str) -> float:
        """A metric summed over every replica and label."""
        return sum(v for (n, _), v in self.metrics().items() if n == name)

    def idle(self) -> bool:
        return (
            self.total("vllm:num_requests_running") == 0
            and self.total("vllm:num_requests_waiting") == 0
        )

    def generated_once_idle(self, before: float) -> float:
        """Tokens generated since `before`, once the engines run nothing and stay so.

        A generation still going would keep adding tokens: check it does not.
        """
        wait_for(self.idle, 30, "the engines to stop running")
        generated = self.total("vllm:generation_tokens_total") - before
        time.sleep(1)
        assert self.total("vllm:generation_tokens_total") - before == generated
        return generated

    def send(self, path: str, body: object) -> http.client.HTTPConnection:
        """POST `body` without reading the answer: the caller reads it or hangs up."""
        url = urlsplit(self.base)
        conn = http.client.HTTPConnection(url.hostname, url.port, timeout=60)
        conn.request("POST", path, json.dumps(body), {"Content-Type": "application/json"})
        return conn

    def token_rate(self) -> float:
        """Tokens/s the engines make together when saturated, measured once in this stack.

        Tests that need work to outlast a deadline, a stream to still run or a queue to
        stay full size it from this rate (sequences_for), never from an assumed speed:
        machines of this kind differ several times over (AVX2 or AVX-512).
        """
        if self._rate is None:
            self._rate = self._measure_rate()
        return self._rate

    def work_for(self, seconds: float, instances: int) -> Work:
        """Work in `instances` instances that keeps the engines busy MARGIN x `seconds`.

        The engines make tokens no faster than their measured saturated rate (both of them
        together, so this holds even if all the work lands on one). There are enough
        sequences to saturate both engines, so the work also runs at about that rate:
        it takes about MARGIN x `seconds`, neither much more nor less.
        """
        tokens = MARGIN * self.token_rate() * seconds
        n = math.ceil(REPLICAS * ENGINE_MAX_NUM_SEQS / instances)
        max_tokens = math.ceil(tokens / (instances * n))
        if max_tokens > SEQUENCE_TOKENS:  # the context bounds a sequence: more of them
            n = math.ceil(tokens / (instances * SEQUENCE_TOKENS))
            max_tokens = SEQUENCE_TOKENS
        return Work(instances, n, max_tokens)

    def _measure_rate(self) -> float:
        # Twice the sequences the engines run at once, so both stay saturated, with a
        # queue, through the window (checked: the queue is still there at its end).
        work = Work(64, math.ceil(2 * REPLICAS * ENGINE_MAX_NUM_SEQS / 64), SEQUENCE_TOKENS)
        body = {"instances": [{**work.fields(), "prompt": "go"}] * work.instances}
        before = self.total("vllm:generation_tokens_total")
        conn = self.send("/predict", body)
        try:
            wait_for(lambda: self.total("vllm:num_requests_waiting") > 0, 30, "a queue to form")
            # Samples through the window; the rate is the best second of it: anything else
            # running on the machine can only slow the engines, and a rate measured too
            # low would size work too small to outlast what it must.
            samples = [(time.monotonic(), self.total("vllm:generation_tokens_total"))]
            while samples[-1][0] - samples[0][0] < CALIBRATION_WINDOW_S:
                time.sleep(0.25)  # the sampling period, not a wait
                samples.append((time.monotonic(), self.total("vllm:generation_tokens_total")))
            # Still queued at the end: the engines were saturated through the window.
            assert self.total("vllm:num_requests_waiting") > 0, "calibration work ran out"
        finally:
            hang_up(conn)  # the gateway cancels the work
        self.generated_once_idle(before)
        rate = max(
            (b[1] - a[1]) / (b[0] - a[0])
            for i, a in enumerate(samples)
            for b in samples[i + 1 :]
            if b[0] - a[0] >= 1.0
        )
        print(f"\ncalibration: the engines make {rate:.0f} tokens/s when saturated")
        return rate

    def log_tail(self, lines: int = 60) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])


@dataclass(frozen=True)
class Work:
    """`instances` instances of `n` sequences of `max_tokens` tokens each."""

    instances: int
    n: int
    max_tokens: int

    @property
    def tokens(self) -> int:
        return self.instances * self.n * self.max_tokens

    def fields(self) -> dict[str, Any]:
        """One instance's fields (or one OpenAI request's)."""
        return {"max_tokens": self.max_tokens, "ignore_eos": True, "n": self.n}


SERVE = [sys.executable, "-m", "gateway.control.cli", "serve"]


@contextlib.contextmanager
def one_replica_stack(
    work: Path, args: list[str], env: dict[str, str] | None = None, replicas: int = 1
) -> Iterator[Stack]:
    """`vgate serve ARGS` with one replica (or `replicas`) on a free loopback port, ready;
    stopped on exit."""
    port = free_port()
    argv = [*SERVE, *args, "--host", "127.0.0.1", "--port", str(port)]
    argv += ["--run-dir", str(work / "run"), "--replicas", str(replicas)]
    log = work / "stack.log"
    proc = spawn(argv, log, {**os.environ, **(env or {})})
    stack = Stack(proc, f"http://127.0.0.1:{port}", work / "run", log)

    def ready() -> bool:
        assert proc.poll() is None, stack.log_tail()
        status, health = stack.request("/health", timeout=5)
        return status == 200 and health["ready_replicas"] == replicas

    try:
        wait_for(ready, STARTUP_DEADLINE_S, f"vgate serve {' '.join(args)} to be ready")
        yield stack
    finally:
        stop_tree(proc)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The lifecycle tests run last: the last of them stops the stack."""
    items.sort(key=lambda item: item.module.__name__.endswith("test_lifecycle"))


@pytest.fixture(scope="session")
def storage(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Cloud Storage (the emulator) holding the demo model at MODEL_URI."""
    with emulator() as url:
        source = write_demo_model(tmp_path_factory.mktemp("demo-model"))
        bucket, prefix = MODEL_URI.removeprefix("gs://").split("/", 1)
        upload_dir(client(url), bucket, prefix, source)
        yield url


@pytest.fixture(scope="session")
def stack(tmp_path_factory: pytest.TempPathFactory, storage: str) -> Iterator[Stack]:
    """The stack as Vertex starts it: the model from AIP_STORAGE_URI, AIP_* routes and port."""
    run_dir = tmp_path_factory.mktemp("stack")
    log = run_dir / "stack.log"
    port = free_port()
    argv = [
        sys.executable, "-m", "gateway.control.cli", "serve",
        # Google's container's argument forms, engine flags included.
        "--host=127.0.0.1", f"--max-model-len={MAX_MODEL_LEN}", "--gpu-memory-utilization=0.9",
        "--max-loras=1",
        "--run-dir", str(run_dir), "--replicas", str(REPLICAS), "--gateway-workers", "2",
        "--stop-grace", "20", f"--max-inflight={MAX_INFLIGHT}",
        f"--request-timeout={REQUEST_TIMEOUT_S}",
        "--served-model-name", DEMO_MODEL_NAME,
        "--download-dir", str(run_dir / "model_dir"),
        "--allowed-media-buckets", MODEL_URI.removeprefix("gs://").split("/", 1)[0],
    ]  # fmt: skip
    env = {
        **os.environ,
        **VERTEX_ENV,
        "AIP_HTTP_PORT": str(port),
        "AIP_STORAGE_URI": MODEL_URI,
        "STORAGE_EMULATOR_HOST": storage,
        "HF_TOKEN": HF_TOKEN,
    }
    proc = spawn(argv, log, env)
    s = Stack(proc, f"http://127.0.0.1:{port}", run_dir, log)

    def ready() -> bool:
        if proc.poll() is not None:
            raise AssertionError(f"vgate serve exited {proc.returncode}:\n{s.log_tail()}")
        status, _ = s.request("/ping", timeout=5)
        s.pings.append(status)
        return status == 200

    def all_ready() -> bool:
        status, body = s.request("/health", timeout=5)
        return status == 200 and body["ready_replicas"] == REPLICAS

    try:
        wait_for(ready, STARTUP_DEADLINE_S, "/ping to say 200", every=0.5)
        wait_for(all_ready, STARTUP_DEADLINE_S, "both replicas to be ready")
        yield s
    finally:
        stop_tree(proc)
