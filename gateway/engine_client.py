"""Calls from the gateway to the engines, through nginx's internal listener.

Going through nginx keeps one least_conn view over all traffic, OpenAI and
predict alike. Errors become ApiErrors that say what happened.
"""

from __future__ import annotations

from typing import Any

import aiohttp
import orjson

from gateway.errors import ApiError
from gateway.metrics import UPSTREAM_ERRORS

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


async def post_json(
    session: aiohttp.ClientSession,
    path: str,
    payload: dict[str, Any],
    where: str,
    request_id: str | None = None,
) -> dict[str, Any]:
    """POST to an engine route; `where` names the instance in any error.

    The caller sets the deadline (the whole request's, see predict/serving.py).
    """
    headers = {"Content-Type": "application/json"}
    if request_id:
        headers["X-Request-Id"] = request_id
    try:
        async with session.post(
            BASE_URL + path,
            data=orjson.dumps(payload),
            headers=headers,
        ) as resp:
            body = await resp.read()
            status = resp.status
    except aiohttp.ClientError as e:
        UPSTREAM_ERRORS.labels("connection").inc()
        raise ApiError(503, f"{where}: engine unreachable ({e.__class__.__name__})") from None
    if status == 200:
        return orjson.loads(body)
    message = f"{where}: {_engine_message(body)}"
    if 400 <= status < 500 and status not in (408, 429):
        raise ApiError(status, message)
    UPSTREAM_ERRORS.labels(f"status_{status}").inc()
    if status in (429, 503):
        raise ApiError(status, message, {"Retry-After": "5"})
    raise ApiError(502, message)
