"""Answering predict requests: every instance at once, in order; or one, streamed.

Google's container reads only instances[0]; here each instance becomes one
engine call, all in flight together, and predictions[i] belongs to
instances[i]. One failure cancels the others' engine work.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import aiohttp
import orjson

from gateway.engine_client import NO_TAGS, Tags, call_json, open_stream
from gateway.errors import ApiError
from gateway.metrics import UPSTREAM_ERRORS
from gateway.predict.protocol import GENERATE_ROUTE, TOKENIZE_ROUTE, Instance
from gateway.predict.responses import (
    done_event,
    event,
    framing,
    predictions,
    stream_delta,
    text_event,
)


@dataclass(frozen=True)
class Deadline:
    """The one deadline of a request (--request-timeout), for all of its work."""

    at: float  # event loop time
    seconds: float

    @classmethod
    def start(cls, seconds: float) -> Deadline:
        return cls(asyncio.get_running_loop().time() + seconds, seconds)

    @contextlib.asynccontextmanager
    async def bound(self) -> AsyncIterator[None]:
        """Run the block within the deadline; past it, cancel the block and answer 504."""
        try:
            async with asyncio.timeout_at(self.at):
                yield
        except TimeoutError:
            UPSTREAM_ERRORS.labels("timeout").inc()
            raise ApiError(504, f"the request did not finish within {self.seconds:g} s") from None


async def engine_request(
    session: aiohttp.ClientSession, instance: Instance, where: str, tags: Tags
) -> dict[str, Any]:
    """The instance's request as the engine takes it.

    The tokens-in endpoint takes token ids: the prompt is tokenized by the
    engine, as a completion's prompt would be, so the engine sees it exactly.
    """
    if instance.route != GENERATE_ROUTE:
        return instance.request
    # The named model's tokenizer (its name also routes the call to its engines); an
    # adapter named in "model" has its base model's.
    asked = {"prompt": instance.prompt}
    if instance.request.get("model"):
        asked["model"] = instance.request["model"]
    tokens = await call_json(session, TOKENIZE_ROUTE, asked, where, tags)
    return {**instance.request, "token_ids": tokens["tokens"]}


async def _answer(
    session: aiohttp.ClientSession, instance: Instance, where: str, tags: Tags
) -> Any:
    request = await engine_request(session, instance, where, tags)
    return await call_json(session, instance.route, request, where, tags)


async def predict(
    session: aiohttp.ClientSession,
    instances: list[Instance],
    deadline: Deadline,
    tags: Tags = NO_TAGS,
) -> Any:
    try:
        async with deadline.bound(), asyncio.TaskGroup() as group:
            tasks = [
                group.create_task(_answer(session, inst, f"instances[{i}]", tags.instance(i)))
                for i, inst in enumerate(instances)
            ]
    except ExceptionGroup as group_error:
        # The first instance that failed fails the request; the rest were cancelled.
        first = group_error.exceptions[0]
        raise first if isinstance(first, ApiError) else group_error from None
    return predictions(instances, [t.result() for t in tasks])


async def stream(
    session: aiohttp.ClientSession, instance: Instance, tags: Tags = NO_TAGS
) -> AsyncIterator[bytes]:
    """The bytes of a streamed prediction, as the engine makes them.

    Nothing is yielded before the engine accepted the request, so a refusal is
    still a plain JSON error. A chat instance's OpenAI chunks pass through as
    they are; a text instance's become `{"predictions": ["<delta>"]}` events.
    """
    stream_format = instance.stream_format
    request = await engine_request(session, instance, "instances[0]", tags)
    request = {**request, "stream": True}
    async with open_stream(session, instance.route, request, "instances[0]", tags) as body:
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
                yield event(data, stream_format)
                continue
            delta = stream_delta(instance, chunk)
            if delta:
                yield text_event(delta, stream_format)
        yield done_event(stream_format)
