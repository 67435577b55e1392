"""Vertex AI's online prediction path, in front of a container, for the SDK's examples.

Vertex's API takes `endpoints/{id}:predict`, sends the same `instances` and
`parameters` to the container's AIP_PREDICT_ROUTE and answers with its
`predictions` and the deployed model's id. This does that on loopback (and
answers the SDK's GET of the endpoint), so google-cloud-aiplatform's real client
code talks to a real vgate. Vertex's control plane and authentication are not here.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler

from tests.helpers import loopback_http

ENDPOINT = "projects/p/locations/us-central1/endpoints/123"
DEPLOYED_MODEL_ID = "456"


@contextmanager
def vertex_front(predict_url: str) -> Iterator[str]:
    """The front's base URL, forwarding predictions to `predict_url`."""

    class Front(BaseHTTPRequestHandler):
        def _send(self, status: int, body: dict) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:
            if self.path.split("?")[0] == f"/v1/{ENDPOINT}":
                self._send(200, {"name": ENDPOINT, "displayName": "vgate"})
            else:
                self._send(404, {"error": {"code": 404, "message": self.path}})

        def do_POST(self) -> None:
            if self.path.split("?")[0] != f"/v1/{ENDPOINT}:predict":
                self._send(404, {"error": {"code": 404, "message": self.path}})
                return
            body = self.rfile.read(int(self.headers["Content-Length"]))
            request = urllib.request.Request(
                predict_url, body, {"Content-Type": "application/json"}
            )
            try:
                with urllib.request.urlopen(request, timeout=60) as answer:
                    predictions = json.loads(answer.read())["predictions"]
            except urllib.error.HTTPError as e:
                self._send(e.code, json.loads(e.read()))
                return
            self._send(200, {"predictions": predictions, "deployedModelId": DEPLOYED_MODEL_ID})

        def log_message(self, *args: object) -> None:
            pass

    with loopback_http(Front) as port:
        yield f"http://127.0.0.1:{port}"
