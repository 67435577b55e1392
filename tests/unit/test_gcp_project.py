"""The project for trace links: given, else the metadata server's on Google Cloud only."""

from __future__ import annotations

import http.server
import typing
from pathlib import Path

from gateway.control.gcp_project import find_project
from tests.helpers import loopback_http


class _Metadata(http.server.BaseHTTPRequestHandler):
    asked: typing.ClassVar[list[str | None]] = []

    def do_GET(self) -> None:
        _Metadata.asked.append(self.headers.get("Metadata-Flavor"))
        body = b"my-project-123"
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *_: object) -> None:
        pass


def _machine(tmp_path: Path, product: str) -> Path:
    path = tmp_path / "product_name"
    path.write_text(product + "\n")
    return path


def test_on_google_cloud_the_metadata_server_says(tmp_path: Path) -> None:
    _Metadata.asked = []
    with loopback_http(_Metadata) as port:
        url = f"http://127.0.0.1:{port}/computeMetadata/v1/project/project-id"
        google = _machine(tmp_path, "Google Compute Engine")
        assert find_project(None, google, url) == "my-project-123"
        assert find_project("given-project", google, url) == "given-project"
        assert find_project(None, _machine(tmp_path, "Standard PC (Q35)"), url) is None
        assert find_project(None, tmp_path / "absent", url) is None
    assert _Metadata.asked == ["Google"]  # once, and only on Google Cloud


def test_a_metadata_server_that_does_not_answer_means_no_project(tmp_path: Path) -> None:
    with loopback_http(_Metadata) as port:
        pass  # stopped: nothing listens there any more
    url = f"http://127.0.0.1:{port}/computeMetadata/v1/project/project-id"
    assert find_project(None, _machine(tmp_path, "Google"), url, timeout_s=1) is None
