"""The engines' request schema (vLLM's /openapi.json), fetched once, shared by a file.

vLLM builds its OpenAPI document on the first request for it, which takes
seconds. The monitor fetches it from the first ready engine before it reports
that engine ready, so no predict request ever waits for it; the gateway workers
read the file.
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


async def fetch_schema(session: aiohttp.ClientSession, worker: EngineWorker, run_dir: Path) -> None:
    """Fetch the document from one engine and write it atomically."""
    timeout = aiohttp.ClientTimeout(total=FETCH_TIMEOUT_S)
    async with session.get(worker.url + "/openapi.json", timeout=timeout) as resp:
        resp.raise_for_status()
        body = await resp.read()
    RequestSchemas(orjson.loads(body))  # refuse a document we cannot use
    write_atomic(run_dir / SCHEMA_FILE, body)


class SchemaReader:
    """The gateway's copy, read once the monitor has written it."""

    def __init__(self, run_dir: Path) -> None:
        self._path = run_dir / SCHEMA_FILE
        self._schemas: RequestSchemas | None = None

    def get(self) -> RequestSchemas:
        if self._schemas is None:
            try:
                self._schemas = RequestSchemas(orjson.loads(self._path.read_bytes()))
            except FileNotFoundError:
                raise ApiError(
                    503, "no engine is ready to take the request", {"Retry-After": "5"}
                ) from None
        return self._schemas
