"""POST /update_models (Google's co-host API): the gateway's one administrative route.

Only with --enable-admin-routes, which needs an API key (nginx checks it). The work
is gateway/control/update_models.py's, in a process of its own: it plans the change
(and refuses a bad config) before it answers, then carries it out while this worker
goes on serving; a client that hangs up does not stop an update half done.
"""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

import orjson
from aiohttp import web

from gateway.errors import ApiError

PLAN_DEADLINE_S = 900.0  # vLLM's parser for each model, and a new gs:// model's download
# update_models' exit codes before its plan: another update runs; the config is bad.
_STATUS = {3: 409, 2: 400}


def config_path(body: bytes) -> str:
    try:
        request = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise ApiError(400, "/update_models: the body must be JSON") from None
    path = request.get("model_config_path") if isinstance(request, dict) else None
    if not isinstance(path, str) or not path.strip():
        raise ApiError(400, "model_config_path: required, a gs:// URI or a path in the container")
    return path.strip()


async def run_update(run_dir: Path, path: str) -> web.Response:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "gateway.control.update_models",
        path,
        stdout=asyncio.subprocess.PIPE,
        env={**os.environ, "VGATE_RUN_DIR": str(run_dir)},
        start_new_session=True,  # outlives this worker's restart and a client's hang-up
    )
    assert proc.stdout is not None
    try:
        line = await asyncio.wait_for(asyncio.shield(proc.stdout.readline()), PLAN_DEADLINE_S)
    except TimeoutError:
        raise ApiError(
            504, f"/update_models: no plan within {PLAN_DEADLINE_S:g} s (see the log)"
        ) from None
    try:
        answer = orjson.loads(line)
    except orjson.JSONDecodeError:
        answer = None
    if not isinstance(answer, dict):
        await proc.wait()
        raise ApiError(503, "/update_models: the update ended without a plan (see the log)")
    if answer.get("status") != "success":
        code = await proc.wait()
        raise ApiError(_STATUS.get(code, 503), f"/update_models: {answer.get('message')}")
    asyncio.get_running_loop().create_task(proc.wait())  # reaped when it ends
    return web.json_response(answer)


def add_routes(app: web.Application) -> None:
    async def update_models(request: web.Request) -> web.Response:
        return await run_update(app["run_dir"], config_path(await request.read()))

    app.router.add_post("/update_models", update_models)
