"""Answering predict requests: every instance at once, in order; or one, streamed.

Google's container reads only instances[0]; here each instance becomes one
engine call, all in flight together, and predictions[i] belongs to
instances[i]. One failure cancels the others' engine work.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import orjson

from gateway.engine_client import call_json, open_stream
from gateway.errors import ApiError
from gateway.metrics import UPSTREAM_ERRORS
from gateway.predict.protocol import Instance
from gateway.predict.responses import (
    done_event,
    framing,
    predictions,
    stream_delta,
    text_event,
)


def deadline_error(timeout: float) -> ApiError:
    UPSTREAM_ERRORS.labels("timeout").inc()
    return ApiError(504, f"the request did not finish within {timeout:g} s")


async def predict(
    session: aiohttp.ClientSession,
    instances: list[Instance],
    timeout: float,
    request_id: str | None = None,
) -> Any:
    try:
        async with asyncio.timeout(timeout), asyncio.TaskGroup() as group:
            tasks = [
                group.create_task(
                    call_json(session, inst.route, inst.request, f"instances[{i}]", request_id)
                )
                for i, inst in enumerate(instances)
            ]
    except TimeoutError:
        raise deadline_error(timeout) from None
    except ExceptionGroup as group_error:
        # The first instance that failed fails the request; the rest were cancelled.
        first = group_error.exceptions[0]
        raise first if isinstance(first, ApiError) else group_error from None
    return predictions(instances, [t.result() for t in tasks])


async def stream(
    session: aiohttp.ClientSession,
    instance: Instance,
    stream_format: str,
    request_id: str | None = None,
) -> AsyncIterator[bytes]:
    """The bytes of a streamed prediction, as the engine makes them.

    Nothing is yielded before the engine accepted the request, so a refusal is
    still a plain JSON error. A chat instance's OpenAI chunks pass through as
    they are; a text instance's become `{"predictions": ["<delta>"]}` events.
    """
    request = {**instance.request, "stream": True}
    async with open_stream(session, instance.route, request, "instances[0]", request_id) as body:
        if instance.chat:
            async for chunk in body.iter_any():
                yield chunk
            return
        if not instance.raw_response:
            yield text_event(framing(instance), stream_format)
        async for line in body:
            if not line.startswith(b"data: "):
                continue
            data = line[6:].strip()
            if data == b"[DONE]":
                break
            chunk = orjson.loads(data)
            if "error" in chunk:  # the engine failed mid-stream: pass it on
                yield b"data: " + data + b"\n\n" if stream_format == "sse" else data + b"\0"
                continue
            delta = stream_delta(instance, chunk)
            if delta:
                yield text_event(delta, stream_format)
        yield done_event(stream_format)
