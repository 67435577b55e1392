"""/health shows the model download's figures while it runs, not after, and no path."""

import json

from engine.fetch_model import MODEL_READY, PROGRESS_FILE
from gateway.health import _download_progress


def test_download_figures_while_the_download_runs(tmp_path) -> None:
    assert _download_progress(tmp_path) is None  # nothing to download
    figures = {"uri": "gs://b/m", "bytes_done": 5, "bytes_total": 10, "eta_s": 3}
    (tmp_path / PROGRESS_FILE).write_text(json.dumps(figures))
    figures.pop("uri")  # callers do not see the bucket's name
    assert _download_progress(tmp_path) == figures
    (tmp_path / MODEL_READY).touch()
    assert _download_progress(tmp_path) is None


def test_health_says_failed_with_causes_once_no_replica_can_start(tmp_path) -> None:
    from types import SimpleNamespace

    from gateway.health import _answer
    from gateway.state import FAILED, ReplicaState, StateReader, write_state

    cause = "OSError: /tmp/vgate-models/bkt/m/config.json: bad, from gs://bkt/m (see /a/b)"
    write_state(tmp_path / "s.json", [ReplicaState(0, FAILED, "cpu:0", cause)])
    app = {"state": StateReader(tmp_path / "s.json", {0: "cpu:0"}), "run_dir": tmp_path}
    response = _answer(SimpleNamespace(app=app), detail=True)  # type: ignore[arg-type]
    body = json.loads(response.body)
    assert response.status == 503 and body["status"] == FAILED
    assert body["replicas"] == [
        {
            "replica": 0,
            "state": FAILED,
            "device": "cpu:0",
            "cause": "OSError: <path>: bad, from <path> (see <path>)",
        }
    ]
