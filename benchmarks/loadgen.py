"""Streaming /v1/completions load from one aiohttp session, timed per request.

Tokens are counted from `usage.completion_tokens` of the final chunk
(`stream_options.include_usage`): the engine's own count of what it generated
and streamed. Counting data events with text would undercount, because vLLM
holds back a token that decodes to an incomplete UTF-8 sequence (common with a
byte-level BPE and random weights) and sends it with the next one. Events with
text are still counted, as a cross-check.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import aiohttp
import orjson


@dataclass(frozen=True)
class RequestResult:
    ok: bool
    ttft_s: float | None  # time to the first data event whose text is not empty
    tokens: int  # usage.completion_tokens
    text_events: int  # data events carrying a non-empty text delta
    error: str = ""


@dataclass
class RoundResult:
    wall_s: float
    results: list[RequestResult] = field(default_factory=list)

    @property
    def tokens(self) -> int:
        return sum(r.tokens for r in self.results if r.ok)

    @property
    def ok(self) -> int:
        return sum(r.ok for r in self.results)


def prompt(i: int) -> str:
    """A distinct short prompt per request, so no two requests are identical."""
    return f"Request {i}: tell me a long story about the sea and the ships."


def completion_body(i: int, max_tokens: int) -> bytes:
    return orjson.dumps(
        {
            "model": "",
            "prompt": prompt(i),
            "max_tokens": max_tokens,
            "ignore_eos": True,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
    )


async def sse_chunks(content: aiohttp.StreamReader) -> AsyncIterator[dict | None]:
    """The JSON chunks of an OpenAI event stream, then None for its [DONE]."""
    async for line in content:
        if not line.startswith(b"data: "):
            continue
        data = line[6:].strip()
        if data == b"[DONE]":
            yield None
            return
        yield orjson.loads(data)


async def one_request(session: aiohttp.ClientSession, url: str, body: bytes) -> RequestResult:
    start = time.perf_counter()
    ttft: float | None = None
    tokens = events = 0
    done = False
    try:
        async with session.post(
            url, data=body, headers={"Content-Type": "application/json"}
        ) as resp:
            if resp.status != 200:
                return RequestResult(False, None, 0, 0, f"HTTP {resp.status}")
            async for chunk in sse_chunks(resp.content):
                if chunk is None:
                    done = True
                    break
                choices = chunk.get("choices")
                if choices and choices[0].get("text"):
                    events += 1
                    if ttft is None:
                        ttft = time.perf_counter() - start
                if usage := chunk.get("usage"):
                    tokens = usage["completion_tokens"]
    except (aiohttp.ClientError, TimeoutError, ValueError) as e:
        return RequestResult(False, ttft, tokens, events, f"{type(e).__name__}: {e}")
    if not done or tokens == 0:
        return RequestResult(False, ttft, tokens, events, "stream ended without usage or [DONE]")
    return RequestResult(True, ttft, tokens, events)


async def run_round(
    url: str, concurrency: int, requests: int, max_tokens: int, first_id: int = 0
) -> RoundResult:
    """`requests` completions, `concurrency` in flight at a time, on one fresh session.

    A fresh session per round: vLLM drops idle keep-alive connections after 5 s,
    and the other path's round in between takes longer than that.
    """
    ids = iter(range(first_id, first_id + requests))
    out = RoundResult(wall_s=0.0)
    connector = aiohttp.TCPConnector(limit=concurrency)
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=120)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:

        async def client() -> None:
            while (i := next(ids, None)) is not None:
                out.results.append(await one_request(session, url, completion_body(i, max_tokens)))

        start = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(concurrency)))
        out.wall_s = time.perf_counter() - start
    return out
