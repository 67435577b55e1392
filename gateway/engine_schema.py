"""The engines' request schema (vLLM's /openapi.json), fetched once, shared by a file.

vLLM builds its OpenAPI document on the first request for it, which takes
seconds. The monitor fetches it from the first ready engine before it reports
that engine ready, so no predict request ever waits for it; the gateway workers
read the file. Engines that publish no document (`--disable-fastapi-docs`) or
no completion and chat requests (an embedding or pooling model) still become
ready: the file then says why predict cannot be served, and predict says so.
"""

from __future__ import annotations

from pathlib import Path

import aiohttp
import orjson

from engine.files import write_atomic
from engine.workers import EngineWorker
from gateway.errors import ApiError
from gateway.predict.validation import RequestSchemas

SCHEMA_FILE = "engine-openapi.json"
FETCH_TIMEOUT_S = 60


UNAVAILABLE = "unavailable"  # the file's one key when there is no schema to have


async def fetch_schema(session: aiohttp.ClientSession, worker: EngineWorker, run_dir: Path) -> None:
    """Fetch the document from one engine and write it atomically."""
    timeout = aiohttp.ClientTimeout(total=FETCH_TIMEOUT_S)
    async with session.get(worker.url + "/openapi.json", timeout=timeout) as resp:
        if resp.status == 404:
            reason = "the engines publish no OpenAPI document (--disable-fastapi-docs)"
            write_atomic(run_dir / SCHEMA_FILE, orjson.dumps({UNAVAILABLE: reason}))
            return
        resp.raise_for_status()
        body = await resp.read()
    try:
        RequestSchemas(orjson.loads(body))  # refuse a document we cannot use
    except KeyError:
        reason = (
            "the model serves neither text completions nor chat (an embedding or pooling model)"
        )
        body = orjson.dumps({UNAVAILABLE: reason})
    write_atomic(run_dir / SCHEMA_FILE, body)


class SchemaReader:
    """The gateway's copy, read once the monitor has written it."""

    def __init__(self, run_dir: Path) -> None:
        self._path = run_dir / SCHEMA_FILE
        self._schemas: RequestSchemas | None = None
        self._unavailable: str | None = None

    def get(self) -> RequestSchemas:
        if self._schemas is None and self._unavailable is None:
            try:
                document = orjson.loads(self._path.read_bytes())
            except FileNotFoundError:
                raise ApiError(
                    503, "no engine is ready to take the request", {"Retry-After": "5"}
                ) from None
            if UNAVAILABLE in document:
                self._unavailable = document[UNAVAILABLE]
            else:
                self._schemas = RequestSchemas(document)
        if self._schemas is None:
            raise ApiError(400, f"predict cannot be served here: {self._unavailable}")
        return self._schemas
