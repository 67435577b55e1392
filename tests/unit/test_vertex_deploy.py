"""deploy/vertex/deploy.py: what it sends Vertex, seen by a local recorder.

The real google-cloud-aiplatform SDK, its REST transport pointed at a loopback
server that records each request and answers as Vertex would (a finished
operation, then the model); no Google Cloud account is involved.
"""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import ClassVar

import pytest

from tests.helpers import loopback_http

DEPLOY = Path(__file__).resolve().parents[2] / "deploy" / "vertex" / "deploy.py"
MODEL = "projects/p/locations/us-central1/models/123"
UPLOAD_RESPONSE = "type.googleapis.com/google.cloud.aiplatform.v1.UploadModelResponse"


def _deploy_module():
    spec = importlib.util.spec_from_file_location("vertex_deploy", DEPLOY)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class Recorder(BaseHTTPRequestHandler):
    seen: ClassVar[list[tuple[str, str, dict]]] = []

    def _answer(self, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length", 0))
        path = self.path.split("?")[0]
        self.seen.append(("POST", path, json.loads(self.rfile.read(length) or b"{}")))
        if path.endswith("/models:upload"):
            self._answer(
                {
                    "name": f"{MODEL}/operations/1",
                    "done": True,
                    "response": {
                        "@type": UPLOAD_RESPONSE,
                        "model": MODEL,
                    },
                }
            )
        else:
            self.send_error(404)

    def do_GET(self) -> None:
        self.seen.append(("GET", self.path, {}))
        if self.path.split("?")[0].endswith(MODEL):
            self._answer({"name": MODEL, "displayName": "vgate"})
        else:
            self.send_error(404)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def vertex() -> Iterator[str]:
    Recorder.seen = []
    with loopback_http(Recorder) as port:
        yield f"http://127.0.0.1:{port}"


def test_the_upload_carries_googles_container_spec(vertex: str) -> None:
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import aiplatform

    deploy = _deploy_module()
    args = deploy.parse(
        ["--project", "p", "--image", "us-docker.pkg.dev/p/vgate/vgate:0.1.0",
         "--model", "gs://b/llama", "--hf-token", "hf_x", "--", "--max-model-len=8192"]
    )  # fmt: skip
    aiplatform.init(
        project="p",
        location="us-central1",
        api_endpoint=vertex,
        api_transport="rest",
        credentials=AnonymousCredentials(),
    )
    model = aiplatform.Model.upload(**deploy.upload_request(args))
    assert model.resource_name == MODEL
    ((_, path, body),) = [s for s in Recorder.seen if s[0] == "POST"]
    assert path == "/v1/projects/p/locations/us-central1/models:upload"
    spec = body["model"]["containerSpec"]
    assert spec["imageUri"] == "us-docker.pkg.dev/p/vgate/vgate:0.1.0"
    assert spec["args"] == ["--model=gs://b/llama", "--max-model-len=8192"]
    assert spec["ports"] == [{"containerPort": 8080}]
    assert (spec["predictRoute"], spec["healthRoute"]) == ("/generate", "/ping")
    assert {e["name"]: e["value"] for e in spec["env"]} == {
        "MODEL_ID": "gs://b/llama",
        "DEPLOY_SOURCE": "vgate",
        "HF_TOKEN": "hf_x",
    }
    assert spec["sharedMemorySizeMb"] == "16384"
    assert spec["deploymentTimeout"] == "7200s"


def test_dry_run_sends_nothing_and_hides_the_token(capsys: pytest.CaptureFixture) -> None:
    deploy = _deploy_module()
    argv = ["--project", "p", "--image", "i", "--model", "m", "--hf-token", "hf_secret"]
    assert deploy.main([*argv, "--scale-on-waiting", "8", "--dry-run"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["upload"]["serving_container_environment_variables"]["HF_TOKEN"] == "<set>"
    assert shown["deploy"]["autoscaling_target_vllm_num_requests_waiting"] == 8
    assert "hf_secret" not in json.dumps(shown)
