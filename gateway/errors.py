"""JSON errors in Vertex's shape, and the middleware that makes every failure one.

`{"error": {"code": 400, "status": "INVALID_ARGUMENT", "message": "..."}}`: a
client never sees a stack trace or an HTML page.
"""

from __future__ import annotations

import logging

import orjson
from aiohttp import web
from aiohttp.typedefs import Handler

log = logging.getLogger("vgate.gateway")

STATUS_NAMES = {
    400: "INVALID_ARGUMENT",
    404: "NOT_FOUND",
    405: "METHOD_NOT_ALLOWED",
    413: "REQUEST_TOO_LARGE",
    429: "RESOURCE_EXHAUSTED",
    500: "INTERNAL",
    502: "BAD_GATEWAY",
    503: "UNAVAILABLE",
    504: "DEADLINE_EXCEEDED",
}


class ApiError(Exception):
    """An answer for the client: status and a message that names what was wrong."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers or {}


def error_body(status: int, message: str) -> bytes:
    name = STATUS_NAMES.get(status, "UNKNOWN")
    return orjson.dumps({"error": {"code": status, "status": name, "message": message}})


def error_response(
    status: int, message: str, headers: dict[str, str] | None = None
) -> web.Response:
    return web.Response(
        status=status,
        body=error_body(status, message),
        content_type="application/json",
        headers=headers,
    )


@web.middleware
async def json_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except ApiError as e:
        return error_response(e.status, e.message, e.headers)
    except web.HTTPException as e:
        if e.status < 400:
            raise
        message = {
            404: f"no route {request.path}",
            405: f"{request.method} is not allowed on {request.path}",
            413: "request body is too large",
        }.get(e.status, e.reason)
        return error_response(e.status, message)
    except Exception:
        log.exception("unexpected error on %s %s", request.method, request.path)
        return error_response(500, "internal error; see the gateway log")
