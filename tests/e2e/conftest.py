"""The whole stack, started once per session: `vgate serve`, 2 CPU replicas, the demo model."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from engine.demo_model import DEMO_MODEL_NAME, write_demo_model
from engine.workers import EngineWorker, load_workers
from tests.gcs_emulator import client, emulator, upload_dir
from tests.helpers import free_port, http_json, spawn, stop_tree, wait_for

STARTUP_DEADLINE_S = 600
MAX_INFLIGHT = 16  # 8 per gateway worker
REQUEST_TIMEOUT_S = 20
MAX_MODEL_LEN = 1024
MODEL_URI = "gs://vertex-models/demo/v2"  # AIP_STORAGE_URI: the demo model, uploaded
HF_TOKEN = "hf_vgate_test_token"  # as Google's container takes it: from the environment
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

    def workers(self) -> list[EngineWorker]:
        return load_workers(self.run_dir / "engines.json")

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

    def generated_once_idle(self, before: float) -> float:
        """Tokens generated since `before`, once the engines run nothing and stay so.

        A generation still going would keep adding tokens: check it does not.
        """
        wait_for(
            lambda: self.total("vllm:num_requests_running") == 0,
            30,
            "the engines to stop running",
        )
        generated = self.total("vllm:generation_tokens_total") - before
        time.sleep(1)
        assert self.total("vllm:generation_tokens_total") - before == generated
        return generated

    def log_tail(self, lines: int = 60) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])


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
        sys.executable, "-m", "gateway.cli", "serve",
        # Google's container's argument forms, engine flags included.
        "--host=127.0.0.1", f"--max-model-len={MAX_MODEL_LEN}", "--gpu-memory-utilization=0.9",
        "--max-loras=1",
        "--run-dir", str(run_dir), "--replicas", "2", "--gateway-workers", "2",
        "--stop-grace", "20", f"--max-inflight={MAX_INFLIGHT}",
        f"--request-timeout={REQUEST_TIMEOUT_S}",
        "--served-model-name", DEMO_MODEL_NAME,
        "--download-dir", str(run_dir / "model_dir"),
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
        return status == 200 and body["ready_replicas"] == 2

    try:
        wait_for(ready, STARTUP_DEADLINE_S, "/ping to say 200", every=0.5)
        wait_for(all_ready, STARTUP_DEADLINE_S, "both replicas to be ready")
        yield s
    finally:
        stop_tree(proc)
