"""/health shows the model download's figures while it runs, and not after."""

import json

from engine.fetch_model import MODEL_READY, PROGRESS_FILE
from gateway.health import _download_progress


def test_download_figures_while_the_download_runs(tmp_path) -> None:
    assert _download_progress(tmp_path) is None  # nothing to download
    figures = {"uri": "gs://b/m", "bytes_done": 5, "bytes_total": 10, "eta_s": 3}
    (tmp_path / PROGRESS_FILE).write_text(json.dumps(figures))
    assert _download_progress(tmp_path) == figures
    (tmp_path / MODEL_READY).touch()
    assert _download_progress(tmp_path) is None
