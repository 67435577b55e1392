"""Health that Vertex and Kubernetes can trust, answered at once from the monitor's state.

Readiness (`/ping`, `/health`, Vertex's AIP_HEALTH_ROUTE): 200 while at least
one engine replica is ready, 503 before that (Vertex keeps probing and routes no
traffic until 200). With several models, /health also gives each model's count: a
model with none ready gets 503 from routing, the others keep serving. A replica
that cannot start is `failed` with its cause; when every one has failed the status
says so too.

Liveness (`/live`): 200 whenever nginx and a gateway worker answer, from the
first second and through a model download of hours, so a liveness probe
restarts only a container whose front door hangs (the watchdogs restart hung
parts inside it first).
"""

from __future__ import annotations

import re
from pathlib import Path

import orjson
from aiohttp import web

from engine.fetch_model import MODEL_READY, PROGRESS_FILE
from gateway.state import DRAINING, FAILED, READY, ReplicaState


def _status(replicas: list[ReplicaState]) -> dict[str, object]:
    ready = sum(r.state == READY for r in replicas)
    failed = bool(replicas) and all(r.state == FAILED for r in replicas)
    return {
        "status": "ready" if ready else FAILED if failed else "starting",
        "ready_replicas": ready,
        "replicas_total": len(replicas),
    }


def _answer(request: web.Request, detail: bool) -> web.Response:
    every = request.app["state"].replicas()
    replicas = [r for r in every if r.state != DRAINING]  # removed models' last requests
    body = _status(replicas)
    ready = body["ready_replicas"]
    if detail:
        models: dict[str, list[ReplicaState]] = {}
        for r in replicas:
            models.setdefault(r.model, []).append(r)
        body["models"] = {name: _status(rs) for name, rs in models.items()}
        body["replicas"] = [_redacted(r.public()) for r in every]
        download = _download_progress(request.app["run_dir"])
        if download is not None:
            body["download"] = download
    return web.Response(
        status=200 if ready else 503,
        body=orjson.dumps(body),
        content_type="application/json",
        headers=None if ready else {"Retry-After": "5"},
    )


# Callers see neither the container's paths nor bucket names: the logs have them.
_LOCATION = re.compile(r"gs://\S+|(?<![\w.])/(?:[\w.+-]+/)+[\w.+-]*")


def _redacted(replica: dict[str, object]) -> dict[str, object]:
    if isinstance(replica.get("cause"), str):
        replica["cause"] = _LOCATION.sub("<path>", replica["cause"])
    return replica


def _download_progress(run_dir: Path) -> dict[str, object] | None:
    """The model download's figures while it runs (see engine/fetch_model.py), not its URI."""
    if (run_dir / MODEL_READY).exists():
        return None
    try:
        progress = orjson.loads((run_dir / PROGRESS_FILE).read_bytes())
    except (OSError, ValueError):
        return None
    return {k: v for k, v in progress.items() if k != "uri"}


async def ping_handler(request: web.Request) -> web.Response:
    return _answer(request, detail=False)


async def health_handler(request: web.Request) -> web.Response:
    return _answer(request, detail=True)


async def live_handler(_: web.Request) -> web.Response:
    return web.json_response({"status": "alive"})


def add_routes(app: web.Application, extra_route: str | None) -> None:
    """/ping, /health and Vertex's AIP_HEALTH_ROUTE; /live."""
    app.router.add_get("/ping", ping_handler)
    app.router.add_get("/health", health_handler)
    app.router.add_get("/live", live_handler)
    if extra_route and extra_route not in ("/ping", "/health", "/live"):
        app.router.add_get(extra_route, health_handler)
