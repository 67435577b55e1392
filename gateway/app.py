"""The gateway's aiohttp application: predict, health, metrics and the model list."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
from aiohttp import web

from engine.workers import EngineList
from gateway import admin, health, metrics, models
from gateway.admission import Admission, worker_share
from gateway.config import Config
from gateway.engine_client import engine_session
from gateway.errors import json_errors
from gateway.predict import routes as predict_routes
from gateway.state import STATE_FILE, EngineStates

# aiohttp's own limit sits above nginx's, so nginx's JSON 413 is what clients see.
_BODY_SLACK = 64 * 1024


def make_app(config: Config, run_dir: Path, worker: int = 0) -> web.Application:
    app = web.Application(
        middlewares=[metrics.track_requests, json_errors],
        client_max_size=config.max_request_bytes + _BODY_SLACK,
    )
    engines = EngineList(run_dir / "engines.json")
    app["config"] = config
    app["run_dir"] = run_dir
    assert config.max_inflight is not None, "vgate serve resolves it"
    app["admission"] = Admission(worker_share(config.max_inflight, config.gateway_workers, worker))
    app["engines"] = engines
    app["state"] = EngineStates(engines, run_dir / STATE_FILE)

    async def sessions(app: web.Application) -> AsyncIterator[None]:
        app["engine_session"] = engine_session(str(run_dir / "engines.sock"))
        # Metrics are scraped from each engine directly, by port.
        app["direct_session"] = aiohttp.ClientSession()
        yield
        await app["engine_session"].close()
        await app["direct_session"].close()

    app.cleanup_ctx.append(sessions)
    health.add_routes(app, config.health_route)
    predict_routes.add_routes(app, run_dir, config.predict_route)
    metrics.add_route(app)
    models.add_route(app, frozenset(config.engine.lora_modules))
    if config.enable_admin_routes:
        admin.add_routes(app)
    return app
