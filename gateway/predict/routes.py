"""The aiohttp binding of the predict routes."""

from __future__ import annotations

import orjson
from aiohttp import web

from gateway.predict.protocol import parse_body, parse_instances
from gateway.predict.serving import predict


async def predict_handler(request: web.Request) -> web.Response:
    app = request.app
    instances = parse_instances(parse_body(await request.read()))
    answers = await predict(
        app["engine_session"],
        instances,
        app["config"].request_timeout,
        request.headers.get("X-Request-Id"),
    )
    return web.Response(
        body=orjson.dumps({"predictions": answers}), content_type="application/json"
    )


def add_routes(app: web.Application, extra_route: str | None) -> None:
    """/generate, /predict and Vertex's AIP_PREDICT_ROUTE."""
    for path in dict.fromkeys(["/generate", "/predict", extra_route or "/predict"]):
        app.router.add_post(path, predict_handler)
