"""A real Cloud Storage API for tests and benchmarks: gcp-storage-emulator on loopback.

`Emulator` runs the emulator in its own process; `FaultyFront` is an HTTP
front for it that adds a fixed latency per request (and a bandwidth cap per
download), answers 403 for chosen
buckets, or flips bytes of chosen objects: the conditions a real bucket can
produce that the emulator alone cannot.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import unquote

import aiohttp
from aiohttp import web
from google.cloud import storage

from tests.helpers import free_port, stop_tree, wait_for


@contextmanager
def emulator() -> Iterator[str]:
    """The emulator's URL, for STORAGE_EMULATOR_HOST; stopped on exit."""
    port = free_port()
    exe = Path(sys.executable).parent / "gcp-storage-emulator"
    proc = subprocess.Popen(
        [str(exe), "start", "--host", "127.0.0.1", "--port", str(port), "--in-memory", "-q"],
        process_group=0,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: _answers(url), 30, "the storage emulator to listen", every=0.2)
        yield url
    finally:
        stop_tree(proc, grace_s=5)


def _answers(url: str) -> bool:
    try:
        return client(url).lookup_bucket("probe") is None
    except Exception:
        return False


def client(url: str) -> storage.Client:
    os.environ["STORAGE_EMULATOR_HOST"] = url
    return storage.Client.create_anonymous_client()


def upload_dir(gcs: storage.Client, bucket: str, prefix: str, source: Path) -> int:
    """Upload every file under `source` to gs://bucket/prefix/...; returns the count."""
    target = gcs.lookup_bucket(bucket) or gcs.create_bucket(bucket)
    files = [p for p in sorted(source.rglob("*")) if p.is_file()]
    for path in files:
        target.blob(f"{prefix}/{path.relative_to(source).as_posix()}").upload_from_filename(path)
    return len(files)


@dataclass
class FaultyFront:
    """An HTTP front for the emulator, in a thread of its own."""

    upstream: str
    latency_s: float = 0.0
    bytes_per_s: float = 0.0  # a bandwidth cap per request, as one stream from a bucket has
    forbidden_buckets: set[str] = field(default_factory=set)
    corrupt_objects: set[str] = field(default_factory=set)  # names whose downloads are flipped
    downloads: list[str] = field(default_factory=list)  # object media requests seen
    url: str = ""

    @contextmanager
    def running(self) -> Iterator[FaultyFront]:
        loop = asyncio.new_event_loop()
        port = free_port()
        runner: web.AppRunner | None = None

        async def start() -> None:
            nonlocal runner
            app = web.Application()
            app.router.add_route("*", "/{tail:.*}", self._forward)
            runner = web.AppRunner(app, shutdown_timeout=1)  # no drain for a test front
            await runner.setup()
            await web.TCPSite(runner, "127.0.0.1", port).start()

        thread = threading.Thread(target=loop.run_forever, daemon=True)
        thread.start()
        asyncio.run_coroutine_threadsafe(start(), loop).result(10)  # listening on return
        self.url = f"http://127.0.0.1:{port}"
        try:
            yield self
        finally:
            if runner is not None:
                asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(10)
            loop.call_soon_threadsafe(loop.stop)
            thread.join(10)
            loop.close()

    async def _forward(self, request: web.Request) -> web.StreamResponse:
        if self.latency_s:
            await asyncio.sleep(self.latency_s)
        path = unquote(request.raw_path.split("?", 1)[0])
        if any(f"/b/{b}/" in path or path.endswith(f"/b/{b}") for b in self.forbidden_buckets):
            return web.json_response(
                {"error": {"code": 403, "message": "caller does not have storage.objects.list"}},
                status=403,
            )
        media = request.query.get("alt") == "media"
        if media:
            self.downloads.append(path)
        async with (
            aiohttp.ClientSession() as session,
            session.request(
                request.method,
                self.upstream + request.raw_path,
                headers={k: v for k, v in request.headers.items() if k.lower() != "host"},
                data=await request.read(),
            ) as resp,
        ):
            body = await resp.read()
            headers = {
                k: v
                for k, v in resp.headers.items()
                if k.lower() not in ("content-length", "transfer-encoding", "content-encoding")
            }
        # Object metadata names the emulator in its media links: point them here.
        body = body.replace(
            self.upstream.split("//", 1)[1].encode(), self.url.split("//", 1)[1].encode()
        )
        if media and self.bytes_per_s:
            await asyncio.sleep(len(body) / self.bytes_per_s)
        if media and any(path.endswith("/o/" + name) for name in self.corrupt_objects):
            body = bytes(b ^ 0xFF for b in body[:16]) + body[16:]
        return web.Response(status=resp.status, body=body, headers=headers)
