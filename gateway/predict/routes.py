"""The aiohttp binding of the predict routes: /generate, /predict, $AIP_PREDICT_ROUTE."""

from __future__ import annotations

import asyncio
import functools
from pathlib import Path

import orjson
from aiohttp import web

from engine.lora_cache import AdapterPolicy
from gateway.admission import Admission, check_possible
from gateway.engine_client import Tags
from gateway.engine_schema import SchemaReader
from gateway.errors import ApiError
from gateway.predict.media import MediaReader
from gateway.predict.protocol import Instance, parse_envelope, parse_instances
from gateway.predict.responses import error_event
from gateway.predict.serving import Deadline, predict, stream

# Bodies larger than this are checked in a thread: checking takes long enough (up to
# about a second) to hold up every request on this worker's loop, /ping included.
OFF_LOOP_BYTES = 64 * 1024


async def predict_handler(request: web.Request) -> web.StreamResponse:
    app = request.app
    config = app["config"]
    session = app["engine_session"]
    body = await request.read()
    envelope = parse_envelope(body, config.max_instances)
    check = functools.partial(
        parse_instances, envelope, app["engine_schemas"].get(), lora=app["lora"]
    )
    instances = await asyncio.to_thread(check) if len(body) > OFF_LOOP_BYTES else check()
    tags = Tags.of(request.headers)
    deadline = Deadline.start(config.request_timeout)
    admission: Admission = app["admission"]
    sequences = sum(i.sequences for i in instances)
    largest = max(enumerate(i.sequences for i in instances), key=lambda pair: pair[1])
    assert config.max_inflight is not None, "vgate serve resolves it"
    check_possible(sequences, largest, config.max_inflight)
    with admission.hold(sequences):
        async with deadline.bound():
            instances = await app["media"].inline(instances)
        if instances[0].stream:
            return await _stream(request, instances[0], deadline, tags)
        answers = await predict(session, instances, deadline, tags)
    return web.Response(
        body=orjson.dumps({"predictions": answers}), content_type="application/json"
    )


async def _stream(
    request: web.Request, instance: Instance, deadline: Deadline, tags: Tags
) -> web.StreamResponse:
    """Send each event as it comes; the request's deadline covers the whole stream."""
    events = stream(request.app["engine_session"], instance, tags)
    try:
        async with deadline.bound():
            first = await anext(events, b"")  # an engine refusal is still a JSON error
        sse = instance.stream_format == "sse"
        response = web.StreamResponse(
            headers={
                "Content-Type": "text/event-stream" if sse else "application/octet-stream",
                "Cache-Control": "no-cache",
            }
        )
        await response.prepare(request)
        await response.write(first)
        try:
            async with deadline.bound():
                async for event in events:
                    await response.write(event)
        except ApiError as e:  # past the deadline, or the engine went away mid-stream
            await response.write(error_event(e.status, e.message, instance.stream_format))
        await response.write_eof()
        return response
    finally:
        await events.aclose()  # closes the engine connection: vLLM stops generating


def add_routes(app: web.Application, run_dir: Path, extra_route: str | None) -> None:
    """/generate, /predict and Vertex's AIP_PREDICT_ROUTE."""
    app["engine_schemas"] = SchemaReader(run_dir)
    config = app["config"]
    allowed = config.allowed_lora_sources
    policy = AdapterPolicy(None if allowed is None else tuple(allowed))
    app["lora"] = policy if config.engine.enable_lora else None
    app["media"] = MediaReader(frozenset(config.allowed_media_buckets))
    for path in dict.fromkeys(["/generate", "/predict", extra_route or "/predict"]):
        app.router.add_post(path, predict_handler)
