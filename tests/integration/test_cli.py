"""`vgate serve` refuses a configuration that cannot work: one clear line, exit 2, nothing runs."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from gateway.config import ConfigError
from gateway.control.serve import find_nginx
from tests.helpers import free_port, log_entries, stop_tree


def _start(*args: str, env: dict[str, str] | None = None) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "gateway.control.cli", "serve", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, **(env or {})},
        process_group=0,
    )


def _finish(proc: subprocess.Popen, timeout_s: float = 60) -> subprocess.CompletedProcess:
    """Its end; should it start serving after all, stop everything it started."""
    try:
        out, err = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        stop_tree(proc)
        raise AssertionError("vgate serve started instead of refusing") from None
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def _serve(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return _finish(_start(*args, env=env))


def test_busy_port() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        result = _serve("--host", "127.0.0.1", "--port", str(port))
    assert result.returncode == 2
    [entry] = log_entries(result.stderr)
    assert entry["severity"] == "ERROR" and entry["process"] == "vgate"
    assert entry["message"] == f"port {port} on 127.0.0.1 is busy (Address already in use)"


def test_text_for_a_terminal() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        result = _serve("--host", "127.0.0.1", "--port", str(port), "--log-format", "text")
    assert result.returncode == 2
    [line] = result.stderr.splitlines()
    assert line.endswith(f" ERROR vgate: port {port} on 127.0.0.1 is busy (Address already in use)")


REFUSALS: list[tuple[list[str], dict[str, str], str]] = [
    (["--device", "tpu"], {}, "--device: invalid value 'tpu'"),
    (
        ["--device", "cuda", "--tensor-parallel-size", "2"],
        {"CUDA_VISIBLE_DEVICES": "0,1,2"},
        "2 GPUs per replica (tensor x pipeline parallel size) do not divide the 3",
    ),
    (["--device", "cuda"], {"CUDA_VISIBLE_DEVICES": ""}, "--device cuda, but no GPU"),
    (["--port", "x"], {}, "--port: invalid value 'x'"),
    ([], {"AIP_HTTP_PORT": "0"}, "AIP_HTTP_PORT: invalid value '0'"),
    # Engine flags, read by vLLM's own parser before anything starts.
    (
        ["--max-num-seqz=8"],
        {},
        "vLLM refuses the engine flags: unrecognized arguments: --max-num-seqz=8 "
        "(did you mean --max-num-seqs?)",
    ),
    (
        ["--max-num-seqs", "many"],
        {},
        "vLLM refuses the engine flags: argument --max-num-seqs: invalid int value",
    ),
    (
        ["--device", "cpu", "-tp", "2"],
        {},
        "tensor or pipeline parallelism (--tensor-parallel-size, "
        "--pipeline-parallel-size) needs --device cuda",
    ),
    (
        ["--device", "cuda", "-tp=2", "-pp=2"],
        {"CUDA_VISIBLE_DEVICES": "0,1"},
        "4 GPUs per replica (tensor x pipeline parallel size) do not divide the 2",
    ),
    (["--enforce-eager", "org/m"], {}, "'org/m' is not a flag: give the model first"),
    (["org/m", "--model", "org/n"], {}, "the model is given twice"),
    # Several models: a list of the wrong length, one line before anything starts.
    (
        ["--model", "/m/a,/m/b", "--replicas", "1,2,3"],
        {},
        "--replicas: 3 values for 2 models: give one per model, comma-separated, or one for all",
    ),
    (
        ["--model=/m/a,/m/b", "--served-model-name=a,b,c"],
        {},
        "--served-model-name: 3 values for 2 models ('a,b,c')",
    ),
]


@pytest.fixture(scope="module")
def refused() -> list[subprocess.CompletedProcess]:
    """Every refusal's run, started at once: each spends seconds importing vLLM's parser."""
    # A free port each, so that only the fault under test can stop it.
    started = [
        _start(*args, env={"AIP_HTTP_PORT": str(free_port()), **env}) for args, env, _ in REFUSALS
    ]
    try:
        return [_finish(proc, timeout_s=300) for proc in started]
    finally:
        for proc in started:  # one that did not refuse stops the wait: none is left running
            stop_tree(proc)


@pytest.mark.parametrize("case", range(len(REFUSALS)), ids=[r[2][:40] for r in REFUSALS])
def test_bad_configuration_is_one_line(refused: list, case: int) -> None:
    says = REFUSALS[case][2]
    result = refused[case]
    assert result.returncode == 2
    [entry] = log_entries(result.stderr)  # one line, in the run's log format
    assert entry["severity"] == "ERROR" and entry["message"].startswith(says), entry


def test_help_and_version() -> None:
    def vgate(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "gateway.control.cli", *args],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip

    top = vgate("--help")
    assert top.returncode == 0 and "serve" in top.stdout and "demo-model" in top.stdout
    assert vgate("--version").stdout.startswith("vgate ")
    serve = vgate("serve", "--help")
    assert serve.returncode == 0
    for shown in ("(default: 8080)", "{auto,cpu,cuda}", "engines:", "engine flags:", "--help=all"):
        assert shown in serve.stdout, shown
    demo = vgate("demo-model", "--help")
    assert demo.returncode == 0 and "usage: vgate demo-model" in demo.stdout
    assert not Path("--help").exists()
    nothing = vgate()
    assert nothing.returncode == 2 and "usage: vgate" in nothing.stderr


def test_nginx_not_installed() -> None:
    with pytest.raises(ConfigError, match="nginx is not installed"):
        find_nginx(search_path="/nonexistent")


@pytest.mark.parametrize(("flags", "architecture"), [([], "Llama"), (["--vision"], "Blip2")])
def test_demo_model_command_writes_a_model(
    tmp_path: Path, flags: list[str], architecture: str
) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "gateway.control.cli", "demo-model", *flags, str(tmp_path / "m")],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {
        p.name for p in (tmp_path / "m").iterdir()
    }
    assert architecture in (tmp_path / "m" / "config.json").read_text()


def test_a_gcs_model_that_is_not_there_stops_serve_before_anything_starts(tmp_path) -> None:
    from tests.gcs_emulator import emulator

    with emulator() as url:
        out = subprocess.run(
            [sys.executable, "-m", "gateway.control.cli", "serve", "--model", "gs://no-bucket/llama",
             "--port", str(free_port()), "--run-dir", str(tmp_path / "run")],
            env={**os.environ, "STORAGE_EMULATOR_HOST": url},
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
    assert out.returncode == 2
    [entry] = log_entries(out.stderr)
    assert entry["message"] == "gs://no-bucket/llama: bucket 'no-bucket' does not exist"
    assert not (tmp_path / "run").exists()


def _message(line: str) -> str:
    """The message of serve's error line, in either form: a JSON log entry, or text."""
    try:
        entry = json.loads(line)
    except ValueError:
        return line.removeprefix("vgate: ")
    return entry["message"] if isinstance(entry, dict) else line


def test_admin_routes_without_a_key_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    """Admin routes are never open: --enable-admin-routes alone does not start."""
    for variable in ("VGATE_API_KEY", "VLLM_API_KEY"):
        monkeypatch.delenv(variable, raising=False)
    result = _serve("--enable-admin-routes", env={"AIP_HTTP_PORT": str(free_port())})
    assert result.returncode == 2
    [line] = result.stderr.strip().splitlines()
    assert _message(line) == "--enable-admin-routes needs --api-key: admin routes are never open"
