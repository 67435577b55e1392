"""The fan-out of predict: deadline and cancellation, against a stand-in engine.

The stand-in (an aiohttp server on a unix socket) replaces the engines only
here, to steer timing; the real stack's tests use vLLM.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from aiohttp import web

from gateway.engine_client import Tags, engine_session
from gateway.errors import ApiError
from gateway.predict.protocol import COMPLETIONS_ROUTE, Instance
from gateway.predict.serving import Deadline, predict


def _inst(prompt: str, raw: bool = False) -> Instance:
    return Instance(False, COMPLETIONS_ROUTE, {"prompt": prompt}, prompt, raw)


async def _with_engine(
    tmp_path: Path, instances: list[Instance], timeout: float, ids: list[str] | None = None
):
    """Run predict against a stand-in; return (outcome, how many engine calls were cancelled).

    `ids`: filled with the engine requests' ids and sessions (the predict request's are
    "req" and "chat-7").
    """
    cancelled = 0

    async def completions(request: web.Request) -> web.Response:
        nonlocal cancelled
        prompt = (await request.json())["prompt"]
        if ids is not None:
            ids.append(request.headers["X-Request-Id"] + "@" + request.headers["X-Session-Id"])
        if prompt == "bad":
            return web.json_response({"error": {"message": "too long"}}, status=400)
        try:
            await asyncio.sleep(0 if prompt == "fast" else 30)
        except asyncio.CancelledError:
            cancelled += 1
            raise
        return web.json_response({"choices": [{"text": prompt.upper()}]})

    app = web.Application()
    app.router.add_post("/v1/completions", completions)
    runner = web.AppRunner(app, handler_cancellation=True)
    await runner.setup()
    sock = str(tmp_path / "engines.sock")
    await web.UnixSite(runner, sock).start()
    try:
        async with engine_session(sock) as session:
            try:
                deadline = Deadline.start(timeout)
                outcome: object = await predict(session, instances, deadline, Tags("req", "chat-7"))
            except ApiError as e:
                outcome = e
        # The stand-in sees each disconnect shortly after; give it a bounded moment.
        async with asyncio.timeout(5):
            while cancelled < sum(i.prompt == "slow" for i in instances):
                await asyncio.sleep(0.01)
        return outcome, cancelled
    finally:
        await runner.cleanup()


def test_answers_come_back_in_order(tmp_path: Path) -> None:
    insts = [_inst("fast", raw=True), _inst("fast")]
    ids: list[str] = []
    outcome, _ = asyncio.run(_with_engine(tmp_path, insts, 5, ids))
    assert outcome == ["FAST", "Prompt:\nfast\nOutput:\nFAST"]
    # Each instance's own id, for the engines' logs; the session, for nginx's routing.
    assert sorted(ids) == ["req-0@chat-7", "req-1@chat-7"]


def test_a_failed_instance_fails_the_request_and_cancels_the_others(tmp_path: Path) -> None:
    insts = [_inst("slow"), _inst("bad"), _inst("slow")]
    outcome, cancelled = asyncio.run(_with_engine(tmp_path, insts, 20))
    assert isinstance(outcome, ApiError) and outcome.status == 400
    assert outcome.message == "instances[1]: too long"
    assert cancelled == 2


def test_the_deadline_gives_504_and_cancels_engine_work(tmp_path: Path) -> None:
    insts = [_inst("fast"), _inst("slow")]
    outcome, cancelled = asyncio.run(_with_engine(tmp_path, insts, 0.5))
    assert isinstance(outcome, ApiError) and outcome.status == 504
    assert outcome.message == "the request did not finish within 0.5 s"
    assert cancelled == 1
