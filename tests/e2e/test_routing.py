"""Prefix-aware routing on the shared stack: real vLLM engines, as the engines count it.

Which engine served a request is read from the engines' own counters
(vllm:request_success_total per replica), and whether routing paid off from their
prefix caches (vllm:prefix_cache_hits_total).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import json
import signal
from collections.abc import Iterator
from typing import Any

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from engine.demo_model import DEMO_MODEL_NAME
from tests.e2e.conftest import VERTEX_ENV, Stack
from tests.helpers import http_json, wait_for

PREDICT = VERTEX_ENV["AIP_PREDICT_ROUTE"]


def _served(stack: Stack, replicas: tuple[str, ...] = ("0", "1")) -> dict[str, float]:
    """Requests each engine finished, from its own /metrics (not the gateway's, which
    leaves out an engine that does not answer)."""
    out = {}
    for r in replicas:
        port = stack.workers()[int(r)].port
        status, _, text = http_json(f"http://127.0.0.1:{port}/metrics", timeout=10)
        assert status == 200, text
        out[r] = sum(
            s.value
            for family in text_string_to_metric_families(text)
            for s in family.samples
            if s.name == "vllm:request_success_total"
        )
    return out


def _replica(stack: Stack, before: dict[str, float], count: int = 1) -> str:
    """The one engine that served the last `count` requests (the stack is otherwise idle)."""

    def counted() -> dict[str, float] | None:
        after = _served(stack)
        rose = {r: after[r] - before[r] for r in after}
        return rose if sum(rose.values()) >= count else None

    rose = wait_for(counted, 30, "the engines to count the requests")
    engines = [r for r, n in rose.items() if n]
    assert len(engines) == 1 and sum(rose.values()) == count, rose
    return engines[0]


def _conversation(seed: str, turns: int) -> list[list[dict[str, str]]]:
    """Each turn's messages: a growing history (the demo model's context is 1,024 tokens,
    about a character each; the balancer's blocks are 256 characters, so the first turn
    is one block and each later turn adds one)."""
    messages = [{"role": "user", "content": f"{seed} opens: " + "tell " * 60}]
    out = [messages]
    for turn in range(1, turns):
        messages = [
            *messages,
            {"role": "assistant", "content": f"{seed} said " + "yes " * 25},
            {"role": "user", "content": f"{seed} {turn} " + "ask " * 30},
        ]
        out.append(messages)
    return out


def _chat(stack: Stack, messages: list[dict[str, str]], headers: dict | None = None) -> str:
    before = _served(stack)
    body = {"model": DEMO_MODEL_NAME, "messages": messages, "max_tokens": 4}
    status, _, answer = http_json(stack.base + "/v1/chat/completions", body, headers=headers)
    assert status == 200, answer
    return _replica(stack, before)


def _predict(stack: Stack, messages: list[dict[str, str]]) -> str:
    before = _served(stack)
    body = {
        "instances": [{"@requestFormat": "chatCompletions", "messages": messages, "max_tokens": 4}]
    }
    status, answer = stack.request(PREDICT, body)
    assert status == 200, answer
    return _replica(stack, before)


def _hits(stack: Stack) -> dict[str, float]:
    m = stack.metrics()
    return {r: m[("vllm:prefix_cache_hits_total", r)] for r in ("0", "1")}


def _in_flight(stack: Stack) -> dict[str, int]:
    async def ask() -> Any:
        connector = aiohttp.UnixConnector(path=str(stack.run_dir / "engines.sock"))
        async with (
            aiohttp.ClientSession(
                connector=connector, timeout=aiohttp.ClientTimeout(total=10)
            ) as session,
            session.get("http://internal/vgate/routing") as resp,
        ):
            assert resp.status == 200
            return json.loads(await resp.text())["in_flight"]

    return asyncio.run(ask())


def test_each_conversation_keeps_to_an_engine_of_its_own(stack: Stack) -> None:
    first, second = _conversation("alpha", 3), _conversation("beta", 3)
    hits = _hits(stack)
    a, b = _chat(stack, first[0]), _chat(stack, second[0])
    assert a != b  # two new conversations, both engines idle: one each
    for turn in (1, 2):
        assert _chat(stack, first[turn]) == a
        assert _chat(stack, second[turn]) == b
    after = _hits(stack)
    assert after[a] > hits[a] and after[b] > hits[b]  # each engine reused its own prefix


def test_predict_keeps_a_conversation_where_the_openai_route_put_it(stack: Stack) -> None:
    turns = _conversation("gamma", 3)
    home = _chat(stack, turns[0])
    assert _predict(stack, turns[1]) == home
    assert _chat(stack, turns[2]) == home


def test_a_session_id_keeps_unrelated_prompts_together(stack: Stack) -> None:
    session = {"X-Session-Id": "e2e-session"}
    home = _chat(stack, _conversation("delta", 1)[0], session)
    for i in range(3):
        assert _chat(stack, _conversation(f"other{i}", 1)[0], session) == home


def _both_ready(stack: Stack) -> None:
    """Both engines in routing (a test before may have had one restarted)."""

    def ready() -> bool:
        status, health = stack.request("/health", timeout=5)
        return status == 200 and health["ready_replicas"] == 2

    wait_for(ready, 300, "both replicas to be ready")


@contextlib.contextmanager
def _stopped(stack: Stack, replica: str) -> Iterator[None]:
    """The engine's API server stopped: what it is sent stays in flight, at any speed.
    Kept short: the monitor takes a stopped engine out after about 6 s."""
    server = stack.engine_server(int(replica))
    server.send_signal(signal.SIGSTOP)
    try:
        yield
    finally:
        server.send_signal(signal.SIGCONT)


def _counted(stack: Stack, before: dict[str, float], total: int) -> dict[str, float]:
    """How many requests each engine served since `before`, once they add up to `total`."""

    def rose() -> dict[str, float] | None:
        after = _served(stack)
        counts = {r: after[r] - before[r] for r in after}
        return counts if sum(counts.values()) >= total else None

    return wait_for(rose, 30, f"the engines to count {total} requests")


def test_a_busy_engine_is_passed_over(stack: Stack) -> None:
    """The conversation's engine holds two of its requests; the next turn goes to the other
    (it is answered while the conversation's engine cannot answer anything)."""
    _both_ready(stack)
    turns = _conversation("epsilon", 3)
    home = _chat(stack, turns[0])
    other = "1" if home == "0" else "0"
    before = _served(stack)
    url = stack.base + "/v1/chat/completions"
    body = {"model": DEMO_MODEL_NAME, "messages": turns[1], "max_tokens": 4}
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        with _stopped(stack, home):
            held = [pool.submit(http_json, url, body, timeout=60) for _ in range(2)]
            wait_for(lambda: _in_flight(stack)[home] == 2, 5, "two requests on the engine")
            status, _, answer = http_json(url, {**body, "messages": turns[2]}, timeout=5)
            assert status == 200, answer
        assert [h.result()[0] for h in held] == [200, 200]
    assert _counted(stack, before, 3) == {home: 2, other: 1}


def test_a_predict_requests_instances_spread_by_the_same_bound(stack: Stack) -> None:
    """Four instances sharing a long prefix that one engine holds: two stay in flight there
    (stopped), and the bound sends the next to the other engine."""
    system = {"role": "system", "content": "shared " * 90}

    def messages(i: int) -> list[dict[str, str]]:
        return [system, {"role": "user", "content": f"question {i}"}]

    _both_ready(stack)
    home = _chat(stack, messages(-1))
    other = "1" if home == "0" else "0"
    instances = [
        {"@requestFormat": "chatCompletions", "messages": messages(i), "max_tokens": 4}
        for i in range(4)
    ]
    before = _served(stack)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        with _stopped(stack, home):
            answer = pool.submit(stack.request, PREDICT, {"instances": instances})

            def served_by_other() -> bool:
                return _served(stack, (other,))[other] > before[other]

            wait_for(served_by_other, 5, "the other engine to serve one while two wait")
            assert _in_flight(stack)[home] >= 2
        status, body = answer.result()
    assert status == 200 and len(body["predictions"]) == 4, body
    counts = _counted(stack, before, 4)
    assert counts[home] >= 2 and counts[other] >= 1, counts
