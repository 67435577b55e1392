"""The image, run as Vertex runs it: its own entrypoint and user, Vertex's AIP_*
environment, Google's notebook arguments; then /live, /ping, predict on /generate
and the OpenAI SDK against it, and a SIGTERM that stops it.

`make test` builds it first (`make image`, deploy/build-image.sh); there is no Docker
engine here, so buildah runs it (`buildah from`, then `buildah run --isolation chroot`
with the image's entrypoint, which shares the host's network).
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import openai
import psutil
import pytest

from tests.e2e.conftest import MODEL_URI, VERTEX_ENV, Stack
from tests.helpers import free_port, spawn, stop_tree, wait_for
from tests.vertex_front import ENDPOINT, vertex_front

pytestmark = pytest.mark.e2e

IMAGE = os.environ.get("VGATE_IMAGE", "localhost/vgate:cpu")
VENV = "/opt/vgate/venv"  # the CPU image's (Dockerfile: VENV)
EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
STARTUP_DEADLINE_S = 600  # a bound, not a size: the engine starts in about a minute here
STOP_DEADLINE_S = 90  # the stop grace (30 s), then every program's stop timeout


def _buildah(*args: str) -> str:
    return subprocess.run(
        ["buildah", *args], check=True, capture_output=True, text=True, timeout=120
    ).stdout


@pytest.fixture(scope="module")
def image_config() -> dict:
    """The image's own configuration (Docker format: it carries the HEALTHCHECK)."""
    assert shutil.which("buildah"), "buildah is missing: `make image` installs it"
    inspected = json.loads(_buildah("inspect", "--type", "image", IMAGE))
    return inspected["Docker"]["config"]


class Container(NamedTuple):
    stack: Stack
    name: str  # buildah's working container


@pytest.fixture(scope="module")
def container(
    image_config: dict, storage: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Container]:
    work = tmp_path_factory.mktemp("image")
    port = free_port()
    # Google's notebook arguments, as Vertex appends them to the entrypoint.
    notebook = [
        "python", "-m", "vllm.entrypoints.api_server", "--host=127.0.0.1", f"--port={port}",
        f"--model={MODEL_URI}", "--tensor-parallel-size=1", "--swap-space=16",
        "--gpu-memory-utilization=0.9", "--max-model-len=512", "--dtype=auto",
        "--max-num-seqs=256", "--disable-log-stats", "--trust-remote-code",
    ]  # fmt: skip
    env = {
        **VERTEX_ENV,
        "AIP_HTTP_PORT": str(port),
        "AIP_STORAGE_URI": MODEL_URI,
        "AIP_MODE": "ONLINE",
        "STORAGE_EMULATOR_HOST": storage,
        "MODEL_ID": "vgate/demo",
        "DEPLOY_SOURCE": "notebook",
        "VGATE_REPLICAS": "1",
    }
    name = _buildah("from", "--pull=never", "--name", f"vgate-test-{port}", IMAGE).strip()
    argv = ["buildah", "run", "--isolation", "chroot"]
    argv += [f"--env={k}={v}" for k, v in env.items()]
    argv += [name, "--", *image_config["Entrypoint"], *notebook]
    proc = spawn(argv, work / "container.log", {**os.environ})
    stack = Stack(proc, f"http://127.0.0.1:{port}", work, work / "container.log")
    try:
        wait_for(lambda: stack.request("/live", timeout=5)[0] == 200, 120, "/live")

        def ready() -> bool:
            assert proc.poll() is None, stack.log_tail()
            return stack.request("/ping", timeout=5)[0] == 200

        wait_for(ready, STARTUP_DEADLINE_S, "the image's /ping to say 200")
        yield Container(stack, name)
    finally:
        stop_tree(proc)
        subprocess.run(["buildah", "rm", name], capture_output=True, timeout=120)


def test_the_image_runs_as_a_user_with_a_liveness_healthcheck(image_config: dict) -> None:
    assert image_config["User"] not in ("", "0", "root")
    assert image_config["Entrypoint"] == ["vgate", "serve"]
    check = " ".join(image_config["Healthcheck"]["Test"])
    assert "/live" in check
    assert image_config["Labels"]["org.opencontainers.image.licenses"] == "Apache-2.0"


def test_the_image_serves_predict_and_openai(container: Container) -> None:
    stack = container.stack
    status, body = stack.request("/generate", {"instances": [{"prompt": "hi", "max_tokens": 4}]})
    assert status == 200 and isinstance(body["predictions"][0], str), (status, body)
    status, body = stack.request(
        VERTEX_ENV["AIP_PREDICT_ROUTE"], {"instances": [{"prompt": "hi", "max_tokens": 4}]}
    )
    assert status == 200, (status, body)
    client = openai.OpenAI(base_url=stack.base + "/v1", api_key="unused", timeout=60)
    chat = client.chat.completions.create(
        model="", messages=[{"role": "user", "content": "hi"}], max_tokens=4
    )
    assert chat.usage.completion_tokens == 4


def test_the_vertex_sdk_example_predicts_through_vertexs_path(container: Container) -> None:
    """examples/vertex_predict.py's `Endpoint.predict` (a text and a chat instance), with
    the real aiplatform SDK, through Vertex's prediction path (tests/vertex_front.py)."""
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import aiplatform

    spec = importlib.util.spec_from_file_location("vertex_predict", EXAMPLES / "vertex_predict.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    predict_url = container.stack.base + VERTEX_ENV["AIP_PREDICT_ROUTE"]
    with vertex_front(predict_url) as front:
        aiplatform.init(
            project="p",
            location="us-central1",
            api_endpoint=front,
            api_transport="rest",
            credentials=AnonymousCredentials(),
        )
        text, chat = example.predict(aiplatform.Endpoint(ENDPOINT))
    assert text.startswith("Prompt:\nWhat is Vertex AI?\nOutput:\n"), text
    assert chat["object"] == "chat.completion" and chat["choices"][0]["message"]["content"]


def test_every_process_is_the_images_user_and_code_the_installed_copy(
    container: Container, image_config: dict
) -> None:
    """nginx's workers included; the code is the installed package, not a checkout."""
    serving = [
        p for p in psutil.Process(container.stack.proc.pid).children(recursive=True)
        if "buildah" not in p.name()
    ]  # fmt: skip
    assert any("nginx: worker" in " ".join(p.cmdline()) for p in serving)
    users = {(p.name(), p.uids().effective) for p in serving}
    assert {uid for _, uid in users} == {int(image_config["User"])}, users
    where = _buildah("run", "--isolation", "chroot", container.name, "--", "python3", "-c",
                     "import gateway.control.serve as s; print(s.SUPERVISORD_CONF)")  # fmt: skip
    assert where.strip().startswith(f"{VENV}/lib/python3"), where


def test_sigterm_stops_the_image(container: Container) -> None:
    """Last. The runtime signals the container's first process, the entrypoint: it
    drains and exits 0, and nothing of the container is left."""
    proc = container.stack.proc
    family = psutil.Process(proc.pid).children(recursive=True)
    (entrypoint,) = [
        p for p in family if p.cmdline()[:3] == [f"{VENV}/bin/python", f"{VENV}/bin/vgate", "serve"]
    ]
    entrypoint.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=STOP_DEADLINE_S) == 0, container.stack.log_tail()
    left = [p for p in family if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    assert not left, [p.cmdline() for p in left]
