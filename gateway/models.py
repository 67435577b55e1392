"""/v1/models as callers may see it: the served models and the operator's adapters.

vLLM's own answer lists every adapter any client ever had resolved (their names
are often `gs://their-bucket/...`) and the local path of each model and adapter
(`root`). nginx sends /v1/models here; the list comes from an engine over the
internal socket, without those.
"""

from __future__ import annotations

from typing import Any

import orjson
from aiohttp import web

from gateway.engine_client import get_json


def public_models(answer: dict[str, Any], adapters: frozenset[str]) -> dict[str, Any]:
    """Base models and the adapters in `adapters` (--lora-modules); `root` is the id."""
    shown = [m for m in answer.get("data", []) if not m.get("parent") or m["id"] in adapters]
    return {**answer, "data": [{**m, "root": m["id"]} for m in shown]}


def add_route(app: web.Application, adapters: frozenset[str]) -> None:
    async def models_handler(_: web.Request) -> web.Response:
        answer = await get_json(app["engine_session"], "/v1/models", "models")
        return web.Response(
            body=orjson.dumps(public_models(answer, adapters)), content_type="application/json"
        )

    app.router.add_get("/v1/models", models_handler)
