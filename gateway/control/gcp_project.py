"""The Google Cloud project the container runs in, for links from its logs to traces.

Cloud Logging links an entry to its trace only by the trace's full name,
`projects/PROJECT/traces/TRACE_ID`. Vertex and GKE do not put the project in the
environment, so on Google Cloud (the machine says so, as google-auth checks) the
metadata server is asked once, with a short deadline; anywhere else nothing is asked.
"""

from __future__ import annotations

import urllib.request
from pathlib import Path

from gateway.config import PROJECT_ID

PRODUCT_NAME = Path("/sys/class/dmi/id/product_name")
METADATA_URL = "http://169.254.169.254/computeMetadata/v1/project/project-id"
METADATA_TIMEOUT_S = 1.0


def on_google_cloud(product_name: Path = PRODUCT_NAME) -> bool:
    try:
        return product_name.read_text().strip().startswith("Google")
    except OSError:
        return False


def find_project(
    given: str | None,
    product_name: Path = PRODUCT_NAME,
    url: str = METADATA_URL,
    timeout_s: float = METADATA_TIMEOUT_S,
) -> str | None:
    """The project given, else the metadata server's on Google Cloud, else none."""
    if given or not on_google_cloud(product_name):
        return given or None
    request = urllib.request.Request(url, headers={"Metadata-Flavor": "Google"})
    direct = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never via a proxy
    try:
        with direct.open(request, timeout=timeout_s) as response:
            project = response.read(256).decode().strip()
    except (OSError, UnicodeDecodeError):
        return None
    return project if PROJECT_ID.fullmatch(project) else None
