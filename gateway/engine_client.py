"""Calls from the gateway to the engines, through nginx's internal listener.

Going through nginx keeps one least_conn view over all traffic, OpenAI and
predict alike. Errors become ApiErrors that say what happened.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Any

import aiohttp
import orjson

from gateway.errors import ApiError
from gateway.metrics import UPSTREAM_ERRORS

RECONNECT_AFTER_S = 0.5
# nginx's internal listener is a unix socket; the host name is only a label.
BASE_URL = "http://engines"


def engine_session(socket_path: str) -> aiohttp.ClientSession:
    return aiohttp.ClientSession(
        connector=aiohttp.UnixConnector(path=socket_path, limit=0),
        timeout=aiohttp.ClientTimeout(total=None),
    )


def _engine_message(body: bytes) -> str:
    try:
        error = orjson.loads(body)["error"]
        return str(error["message"] if isinstance(error, dict) else error)
    except (ValueError, KeyError, TypeError):
        return body[:200].decode(errors="replace") or "no message"


@dataclass(frozen=True)
class Tags:
    """What an engine call carries of the client's request: its id (for the engines'
    logs) and its X-Session-Id (nginx's routing keeps a session on one engine)."""

    request_id: str | None = None
    session_id: str | None = None

    @classmethod
    def of(cls, headers: Mapping[str, str]) -> Tags:
        return cls(headers.get("X-Request-Id"), headers.get("X-Session-Id"))

    def instance(self, index: int) -> Tags:
        """Each instance's engine request has an id of its own, in the same session."""
        request_id = f"{self.request_id}-{index}" if self.request_id else None
        return Tags(request_id, self.session_id)

    def headers(self) -> dict[str, str]:
        headers = {"Content-Type": "application/json"}
        if self.request_id:
            headers["X-Request-Id"] = self.request_id
        if self.session_id:
            headers["X-Session-Id"] = self.session_id
        return headers


NO_TAGS = Tags()


def _engine_error(status: int, body: bytes, where: str) -> ApiError:
    """The engine's refusal, for the client: its 4xx as they are, the rest as 429/502/503."""
    message = f"{where}: {_engine_message(body)}"
    if 400 <= status < 500 and status not in (408, 429):
        return ApiError(status, message)
    UPSTREAM_ERRORS.labels(f"status_{status}").inc()
    if status in (429, 503):
        return ApiError(status, message, {"Retry-After": "5"})
    return ApiError(502, message)


def _unreachable(e: aiohttp.ClientError, where: str) -> ApiError:
    UPSTREAM_ERRORS.labels("connection").inc()
    return ApiError(503, f"{where}: engine unreachable ({e.__class__.__name__})")


async def call_json(
    session: aiohttp.ClientSession,
    path: str,
    payload: dict[str, Any],
    where: str,
    tags: Tags = NO_TAGS,
) -> Any:
    """POST `payload` to an engine route; `where` names the instance in any error.

    The caller sets the deadline (the whole request's, see predict/serving.py).
    """
    async with open_stream(session, path, payload, where, tags) as body:
        return orjson.loads(await body.read())


async def get_json(session: aiohttp.ClientSession, path: str, where: str) -> Any:
    """GET an engine route through nginx (any ready engine answers)."""
    try:
        async with session.get(BASE_URL + path) as resp:
            body = await resp.read()
            if resp.status != 200:
                raise _engine_error(resp.status, body, where)
            return orjson.loads(body)
    except aiohttp.ClientError as e:
        raise _unreachable(e, where) from None


@contextlib.asynccontextmanager
async def open_stream(
    session: aiohttp.ClientSession,
    path: str,
    payload: dict[str, Any],
    where: str,
    tags: Tags = NO_TAGS,
) -> AsyncIterator[aiohttp.StreamReader]:
    """An engine's answer as it arrives, once the engine has accepted the request.

    Leaving the block early (a client gone, a deadline) closes the connection,
    and vLLM stops the generation.
    """
    data, headers = orjson.dumps(payload), tags.headers()
    try:
        async with await _post(session, BASE_URL + path, data, headers) as resp:
            if resp.status != 200:
                raise _engine_error(resp.status, await resp.read(), where)
            yield resp.content
    except aiohttp.ClientError as e:
        raise _unreachable(e, where) from None


async def _post(
    session: aiohttp.ClientSession, url: str, data: bytes, headers: dict[str, str]
) -> aiohttp.ClientResponse:
    """Sent again, once, when nginx did not take it: a kept-alive connection that an
    nginx worker closed as it reloaded (nginx answers 502 for an engine that failed, so
    the request reached none), or nginx's internal socket not there for a moment while
    a new master takes over from one that died."""
    try:
        return await session.post(url, data=data, headers=headers)
    except aiohttp.ServerDisconnectedError:
        return await session.post(url, data=data, headers=headers)
    except aiohttp.ClientConnectorError:
        await asyncio.sleep(RECONNECT_AFTER_S)
        return await session.post(url, data=data, headers=headers)
