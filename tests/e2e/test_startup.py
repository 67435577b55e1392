"""Starting as users do: the model given first; runs that cannot serve end with their cause.

Each starts its own `vgate serve` (one replica of the demo model) beside the shared stack.
"""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest

from engine.demo_model import MAX_POSITIONS, ensure_demo_model
from tests.e2e.conftest import MODEL_URI, SERVE, Stack, one_replica_stack
from tests.gcs_emulator import FaultyFront
from tests.helpers import free_port, log_messages, spawn, stop_tree, wait_for

pytestmark = pytest.mark.e2e

# A run that cannot serve ends long before Vertex's 2 h deployment timeout: three failed
# starts of a demo-model engine take about a minute here; this bounds it, not sizes it.
END_DEADLINE_S = 600


def _vgate(
    argv: list[str], tmp_path: Path, env: dict[str, str] | None = None
) -> tuple[subprocess.Popen, Path]:
    """A run expected to end by itself (one replica), and its log."""
    log = tmp_path / "serve.log"
    argv = [*SERVE, *argv, "--host", "127.0.0.1", "--port", str(free_port())]
    argv += ["--run-dir", str(tmp_path / "run"), "--replicas", "1"]
    return spawn(argv, log, {**os.environ, **(env or {})}), log


def _ends(proc: subprocess.Popen, log: Path) -> tuple[int, str]:
    """The exit code and the last message of a run that must end by itself."""
    try:
        code = proc.wait(timeout=END_DEADLINE_S)
    except subprocess.TimeoutExpired:
        stop_tree(proc)
        raise AssertionError(f"still running after {END_DEADLINE_S} s") from None
    return code, log_messages(log)[-1]


def test_the_model_given_first_is_served_even_without_vllms_api_docs(tmp_path: Path) -> None:
    # Without the OpenAPI document predict cannot validate; the engines still get ready.
    model = ensure_demo_model()
    args = [str(model), "--max-model-len", "256", "--disable-fastapi-docs"]
    with one_replica_stack(tmp_path, args) as stack:
        status, models = stack.request("/v1/models")
        assert status == 200 and [m["id"] for m in models["data"]] == [str(model)]
        body = {"prompt": "hi", "max_tokens": 3, "ignore_eos": True}
        status, out = stack.request("/v1/completions", body)
        assert status == 200 and out["usage"]["completion_tokens"] == 3
        status, answer = stack.request("/predict", {"instances": [body]})
        assert status == 400 and answer["error"]["message"] == (
            "predict cannot be served here: the engines publish no OpenAPI document "
            "(--disable-fastapi-docs)"
        )


def test_an_engine_that_cannot_start_ends_the_run_with_its_cause(tmp_path: Path) -> None:
    too_long = MAX_POSITIONS * 2
    proc, log = _vgate([str(ensure_demo_model()), f"--max-model-len={too_long}"], tmp_path)
    code, last = _ends(proc, log)
    assert code == 1, last
    assert last.startswith("no engine replica can start: "), last
    assert f"max_model_len ({too_long})" in last and "lower --max-model-len" in last, last
    said = log_messages(log)
    assert any(m.startswith("replica 0 (cpu:0-1) cannot start: ") for m in said)  # both cores
    # Failed after its third failed start, then stopped rather than restarted for ever
    # (a fourth start may already be under way when the monitor stops it).
    assert 3 <= sum(m.startswith("engine replica 0 exited") for m in said) <= 4


def test_a_download_that_fails_for_good_ends_the_run_with_its_cause(
    tmp_path: Path, storage: str
) -> None:
    prefix = MODEL_URI.removeprefix("gs://").split("/", 1)[1]
    bad = f"{prefix}/model.safetensors"
    with FaultyFront(storage, corrupt_objects={bad}).running() as front:
        env = {"AIP_STORAGE_URI": MODEL_URI, "STORAGE_EMULATOR_HOST": front.url}
        argv = ["--download-dir", str(tmp_path / "models")]
        proc, log = _vgate(argv, tmp_path, env)
        code, last = _ends(proc, log)
    assert code == 1, last
    assert last == (
        "no engine replica can start: the model download failed: "
        f"{MODEL_URI}/model.safetensors: checksum mismatch 3 times"
    ), last


def test_live_answers_from_the_start_and_through_a_download(tmp_path: Path, storage: str) -> None:
    """Liveness (`/live`) is 200 while vgate's processes run; readiness (`/ping`) stays 503
    while the model downloads (here it cannot arrive: 1 byte/s)."""
    with FaultyFront(storage, bytes_per_s=1).running() as front:
        env = {**os.environ, "AIP_STORAGE_URI": MODEL_URI, "STORAGE_EMULATOR_HOST": front.url}
        port = free_port()
        argv = [*SERVE, "--host", "127.0.0.1", "--port", str(port), "--replicas", "1"]
        argv += ["--run-dir", str(tmp_path / "run"), "--download-dir", str(tmp_path / "models")]
        started = time.monotonic()
        proc = spawn(argv, tmp_path / "serve.log", env)
        stack = Stack(proc, f"http://127.0.0.1:{port}", tmp_path / "run", tmp_path / "serve.log")
        try:
            wait_for(lambda: stack.request("/live", timeout=5)[0] == 200, 60, "/live", every=0.1)
            print(f"\n/live answered {time.monotonic() - started:.1f} s after start")
            wait_for(lambda: front.downloads, 60, "the model download to start")
            for _ in range(10):  # through the download: alive, not ready
                assert stack.request("/live", timeout=5) == (200, {"status": "alive"})
                assert stack.request("/ping", timeout=5)[0] == 503
                time.sleep(0.5)
            assert proc.poll() is None
        finally:
            stop_tree(proc)
