"""Prefix-aware routing in the real nginx, in front of stand-in engines that say who they are.

The policy itself is tested without nginx (tests/unit/test_routing_policy.py); here:
the Lua balancer reads real bodies on both listeners, keeps a conversation on one
engine and a second one on the other, passes over a loaded engine, retries a dead
one's request elsewhere, and counts nothing in flight once requests end.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from engine.demo_model import DEMO_MODEL_NAME
from engine.workers import load_workers
from gateway.config import resolve
from gateway.control.nginx_config import lua_modules, write_upstream
from gateway.control.serve import prepare
from tests.helpers import free_port, http_json, stop_tree, wait_for

pytestmark = pytest.mark.skipif(not lua_modules(), reason="needs nginx's Lua module")

SYSTEM = "You are a careful assistant who answers in full sentences. " * 12


class Engines:
    """Stand-in engines on the workers' ports, in a thread: each answers with its replica
    and records the requests it got; a request whose body says "hold" waits for release()."""

    def __init__(self, ports: dict[int, int]) -> None:
        self.ports = ports
        self.seen: list[tuple[int, str, dict, dict]] = []  # (replica, path, body, headers)
        self.loop = asyncio.new_event_loop()
        self._held: asyncio.Event | None = None
        self._runners: list[web.AppRunner] = []
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self.loop).result(10)

    async def _start(self) -> None:
        self._held = asyncio.Event()
        for replica, port in self.ports.items():
            app = web.Application()
            app.router.add_post("/{path:.*}", self._handler(replica))
            runner = web.AppRunner(app)
            await runner.setup()
            await web.TCPSite(runner, "127.0.0.1", port).start()
            self._runners.append(runner)

    def _handler(self, replica: int):
        async def answer(request: web.Request) -> web.Response:
            try:
                body = await request.json()
            except ValueError:
                return web.json_response({"replica": replica}, status=400)
            self.seen.append((replica, request.path, body, dict(request.headers)))
            if body.get("hold"):
                assert self._held is not None
                await self._held.wait()
            return web.json_response({"replica": replica})

        return answer

    def stop(self, replica: int) -> None:
        """The engine dies: its port refuses connections."""
        index = list(self.ports).index(replica)
        asyncio.run_coroutine_threadsafe(self._runners[index].cleanup(), self.loop).result(10)

    def release(self) -> None:
        assert self._held is not None
        held = self._held
        self.loop.call_soon_threadsafe(held.set)

    def hold_again(self) -> None:
        async def fresh() -> None:
            self._held = asyncio.Event()

        asyncio.run_coroutine_threadsafe(fresh(), self.loop).result(10)

    def close(self) -> None:
        self.release()

        async def down() -> None:
            for runner in self._runners:
                await runner.cleanup()

        asyncio.run_coroutine_threadsafe(down(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)


def _reload(nginx: subprocess.Popen, run_dir: Path, ready: set[int]) -> None:
    """Route to `ready`, as the monitor does: write the upstream file, reload, wait to see it."""
    generation = str(len(str(ready))) + str(os.urandom(4).hex())
    write_upstream(run_dir, load_workers(run_dir / "engines.json"), ready, generation)
    nginx.send_signal(signal.SIGHUP)

    def serves() -> bool:
        return _internal(run_dir, "GET", "/vgate/upstream-generation")[1] == generation

    wait_for(serves, 10, "nginx to load the upstream")


def _internal(run_dir: Path, method: str, path: str, body: dict | None = None) -> tuple[int, str]:
    async def ask() -> tuple[int, str]:
        connector = aiohttp.UnixConnector(path=str(run_dir / "engines.sock"))
        timeout = aiohttp.ClientTimeout(total=10)
        async with (
            aiohttp.ClientSession(connector=connector, timeout=timeout) as session,
            session.request(method, "http://internal" + path, json=body) as resp,
        ):
            return resp.status, await resp.text()

    return asyncio.run(ask())


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path, Engines]]:
    run_dir = tmp_path_factory.mktemp("run")
    port = free_port()
    config = resolve(
        [
            "--port",
            str(port),
            "--host",
            "127.0.0.1",
            "--run-dir",
            str(run_dir),
            "--replicas",
            "2",
            "--device",
            "cpu",
            "--routing",
            "prefix",
            # Any name but the model's is an adapter of it (the tests' "adapter-x").
            "--enable-lora",
        ],
        {},
    )
    _, env = prepare(config, dict(os.environ), str(run_dir / "access.log"))
    nginx = subprocess.Popen(
        [env["VGATE_NGINX"], "-c", str(run_dir / "nginx.conf")], env=env, process_group=0
    )
    engines = Engines({w.replica: w.port for w in load_workers(run_dir / "engines.json")})
    try:
        wait_for(lambda: (run_dir / "engines.sock").exists(), 10, "nginx to listen")
        _reload(nginx, run_dir, {0, 1})
        yield f"http://127.0.0.1:{port}", run_dir, engines
    finally:
        stop_tree(nginx)
        engines.close()


def _chat(history: list[str]) -> dict:
    messages = [{"role": "system", "content": SYSTEM}]
    for i, text in enumerate(history):
        messages.append({"role": "user" if i % 2 == 0 else "assistant", "content": text})
    return {"model": DEMO_MODEL_NAME, "messages": messages, "max_tokens": 4}


def _send(base: str, body: dict, headers: dict | None = None) -> int:
    status, _, answer = http_json(base + "/v1/chat/completions", body, headers=headers)
    assert status == 200, answer
    return answer["replica"]


def _turns(seed: str, count: int) -> list[list[str]]:
    """The growing histories of one conversation's turns."""
    history: list[str] = []
    out = []
    for turn in range(count):
        history = [*history, f"{seed} question {turn}: " + f"{seed} words " * 160]
        out.append(history)
        history = [*history, f"{seed} answer {turn}: " + f"{seed} reply " * 30]
    return out


def _in_flight(run_dir: Path) -> dict[str, int]:
    status, text = _internal(run_dir, "GET", "/vgate/routing")
    assert status == 200, text
    return json.loads(text)["in_flight"]


def _nothing_in_flight(run_dir: Path) -> None:
    """Every request counted off: nginx does it in its log phase, just after the answer."""
    wait_for(lambda: _in_flight(run_dir) == {"0": 0, "1": 0}, 10, "nothing in flight")


def test_a_conversation_keeps_to_its_engine_and_the_next_goes_to_the_other(stack) -> None:
    base, run_dir, _ = stack
    first, second = _turns("alpha", 4), _turns("beta", 4)
    a = _send(base, _chat(first[0]))
    b = _send(base, _chat(second[0]))
    assert a != b  # a new conversation, no engine holds it, both idle: the other engine
    for turn in range(1, 4):
        assert _send(base, _chat(first[turn])) == a
        assert _send(base, _chat(second[turn])) == b
    _nothing_in_flight(run_dir)


def test_predicts_engine_calls_are_routed_the_same_way(stack) -> None:
    """The gateway's engine calls (the internal listener) take the same route."""
    base, run_dir, _ = stack
    turns = _turns("gamma", 3)
    engine = _send(base, _chat(turns[0]))
    for history in turns[1:]:
        status, text = _internal(run_dir, "POST", "/v1/chat/completions", _chat(history))
        assert status == 200 and json.loads(text)["replica"] == engine


def test_a_loaded_engine_is_passed_over(stack) -> None:
    base, run_dir, engines = stack
    turns = _turns("delta", 3)
    home = _send(base, _chat(turns[0]))
    engines.hold_again()
    held = [{**_chat(turns[1]), "hold": True} for _ in range(2)]
    threads = [threading.Thread(target=_send, args=(base, body)) for body in held]
    for thread in threads:
        thread.start()
    try:
        # Both held requests share the conversation's prefix: both on its engine (2 in
        # flight, the other idle, is within the bound ceil(1.1 x 3 / 2) = 2).
        wait_for(lambda: _in_flight(run_dir)[str(home)] == 2, 10, "two requests held")
        assert _in_flight(run_dir)[str(1 - home)] == 0
        assert _send(base, _chat(turns[2])) == 1 - home  # a third would pass the bound
    finally:
        engines.release()
        for thread in threads:
            thread.join(10)
    _nothing_in_flight(run_dir)


def test_a_session_id_pins_a_session_whatever_its_prompts(stack) -> None:
    base, _, _ = stack
    pinned = _send(base, _chat(["epsilon"]), {"X-Session-Id": "session-1"})
    for i in range(6):
        prompt = f"unrelated prompt {i} " * 30
        assert _send(base, _chat([prompt]), {"X-Session-Id": "session-1"}) == pinned


def test_an_adapter_goes_where_it_was_loaded(stack) -> None:
    base, _, _ = stack
    body = {"model": "adapter-x", "prompt": "short", "max_tokens": 1}
    status, _, first = http_json(base + "/v1/completions", body)
    assert status == 200
    for i in range(4):
        status, _, answer = http_json(base + "/v1/completions", {**body, "prompt": f"p{i}"})
        assert status == 200 and answer["replica"] == first["replica"]


def test_without_shared_prefixes_load_is_shared_evenly(stack) -> None:
    base, run_dir, engines = stack
    before = len(engines.seen)
    for i in range(40):
        _send(base, _chat([f"unique {i} " + "filler " * 60]))
        _nothing_in_flight(run_dir)  # one at a time, each counted off before the next
    counts = [sum(1 for r, *_ in engines.seen[before:] if r == k) for k in (0, 1)]
    assert counts == [20, 20]  # one at a time, no match: ties rotate


def test_unreadable_bodies_are_still_passed_to_an_engine(stack) -> None:
    """Not JSON, nested past the decoder's depth, or fields of the wrong type: routed by
    load, and the engine says what is wrong (here the stand-in answers)."""
    base, run_dir, _engines = stack
    deep = {"model": "demo", "messages": [{"role": "user", "content": "x"}]}
    for _ in range(40):
        deep = {"messages": [deep]}
    odd = [
        {"model": 5, "messages": "not a list"},
        {"model": "demo", "messages": [{"role": ["x"], "content": {"parts": 1}}]},
        {"model": "demo", "prompt": [[1, 2], "x", None]},
        deep,
    ]
    for body in odd:
        assert _send(base, body) in (0, 1)
    status, _, answer = http_json(base + "/v1/completions", data=b"{not json")
    assert status == 400 and answer["replica"] in (0, 1)
    _nothing_in_flight(run_dir)


def test_a_dead_engines_request_is_retried_on_the_other(stack) -> None:
    """Last: it stops the engines."""
    base, run_dir, engines = stack
    turns = _turns("zeta", 2)
    home = _send(base, _chat(turns[0]))
    engines.stop(home)
    assert _send(base, _chat(turns[1])) == 1 - home  # refused, retried on the other
    assert _send(base, _chat(turns[1])) == 1 - home  # passed over while it is failed
    engines.stop(1 - home)
    status, _, answer = http_json(base + "/v1/chat/completions", _chat(turns[1]))
    assert status == 503 and answer["error"]["status"] == "UNAVAILABLE", answer
    _nothing_in_flight(run_dir)  # counted off through the error page
