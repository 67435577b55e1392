"""`vgate serve` refuses a configuration that cannot work: one clear line, exit 2, nothing runs."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest

from gateway.config import ConfigError
from gateway.control.serve import find_nginx
from tests.helpers import free_port, stop_tree


def _serve(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run `vgate serve`; should it start serving after all, stop everything it started."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "gateway.control.cli", "serve", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, **(env or {})},
        process_group=0,
    )
    try:
        out, err = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        stop_tree(proc)
        raise AssertionError("vgate serve started instead of refusing") from None
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def test_busy_port() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        result = _serve("--host", "127.0.0.1", "--port", str(port))
    assert result.returncode == 2
    assert (
        result.stderr.strip() == f"vgate: port {port} on 127.0.0.1 is busy (Address already in use)"
    )


@pytest.mark.parametrize(
    ("args", "env", "says"),
    [
        (["--device", "tpu"], {}, "vgate: --device: invalid value 'tpu'"),
        (
            ["--device", "cuda", "--tensor-parallel-size", "2"],
            {"CUDA_VISIBLE_DEVICES": "0,1,2"},
            "vgate: --tensor-parallel-size 2 does not divide the 3 visible GPUs",
        ),
        (["--device", "cuda"], {"CUDA_VISIBLE_DEVICES": ""}, "vgate: --device cuda, but no GPU"),
        (["--port", "x"], {}, "vgate: --port: invalid value 'x'"),
        ([], {"AIP_HTTP_PORT": "0"}, "vgate: AIP_HTTP_PORT: invalid value '0'"),
    ],
)
def test_bad_configuration_is_one_line(args: list[str], env: dict[str, str], says: str) -> None:
    # A free port, so that only the fault under test can stop it.
    result = _serve(*args, env={"AIP_HTTP_PORT": str(free_port()), **env})
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1
    assert result.stderr.startswith(says), result.stderr


def test_nginx_not_installed() -> None:
    with pytest.raises(ConfigError, match="nginx is not installed"):
        find_nginx(search_path="/nonexistent")


def test_demo_model_command_writes_a_model(tmp_path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "gateway.control.cli", "demo-model", str(tmp_path / "m")],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {
        p.name for p in (tmp_path / "m").iterdir()
    }


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
    assert out.stderr.strip() == "vgate: gs://no-bucket/llama: bucket 'no-bucket' does not exist"
    assert not (tmp_path / "run").exists()
