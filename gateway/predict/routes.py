"""The aiohttp binding of the predict routes: /generate, /predict, $AIP_PREDICT_ROUTE."""

from __future__ import annotations

import asyncio
import dataclasses
from pathlib import Path

import orjson
from aiohttp import web

from engine.workers import lora_enabled
from gateway.admission import Admission
from gateway.engine_schema import SchemaReader
from gateway.errors import ApiError
from gateway.predict.media import MediaReader
from gateway.predict.protocol import PredictRequest, parse_envelope, parse_instances
from gateway.predict.responses import error_event
from gateway.predict.serving import deadline_error, predict, stream


async def predict_handler(request: web.Request) -> web.StreamResponse:
    app = request.app
    config = app["config"]
    session = app["engine_session"]
    envelope = parse_envelope(await request.read(), config.max_instances)
    parsed = parse_instances(
        envelope, app["engine_schemas"].get(), lora_enabled(config.engine_args)
    )
    request_id = request.headers.get("X-Request-Id")
    admission: Admission = app["admission"]
    with admission.hold(len(parsed.instances)):
        try:
            async with asyncio.timeout(config.request_timeout):
                instances = await app["media"].inline(parsed.instances)
        except TimeoutError:
            raise deadline_error(config.request_timeout) from None
        parsed = dataclasses.replace(parsed, instances=instances)
        if parsed.stream:
            return await _stream(request, parsed, config.request_timeout, request_id)
        answers = await predict(session, parsed.instances, config.request_timeout, request_id)
    return web.Response(
        body=orjson.dumps({"predictions": answers}), content_type="application/json"
    )


async def _stream(
    request: web.Request, parsed: PredictRequest, timeout: float, request_id: str | None
) -> web.StreamResponse:
    """Send each event as it comes; the deadline covers the whole stream."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    events = stream(
        request.app["engine_session"], parsed.instances[0], parsed.stream_format, request_id
    )
    try:
        try:
            async with asyncio.timeout_at(deadline):
                first = await anext(events, b"")  # an engine refusal is still a JSON error
        except TimeoutError:
            raise deadline_error(timeout) from None
        sse = parsed.stream_format == "sse"
        response = web.StreamResponse(
            headers={
                "Content-Type": "text/event-stream" if sse else "application/octet-stream",
                "Cache-Control": "no-cache",
            }
        )
        await response.prepare(request)
        await response.write(first)
        try:
            async with asyncio.timeout_at(deadline):
                async for event in events:
                    await response.write(event)
        except (TimeoutError, ApiError) as e:
            error = deadline_error(timeout) if isinstance(e, TimeoutError) else e
            await response.write(error_event(error.status, error.message, parsed.stream_format))
        await response.write_eof()
        return response
    finally:
        await events.aclose()  # closes the engine connection: vLLM stops generating


def add_routes(app: web.Application, run_dir: Path, extra_route: str | None) -> None:
    """/generate, /predict and Vertex's AIP_PREDICT_ROUTE."""
    app["engine_schemas"] = SchemaReader(run_dir)
    app["media"] = MediaReader()
    for path in dict.fromkeys(["/generate", "/predict", extra_route or "/predict"]):
        app.router.add_post(path, predict_handler)
