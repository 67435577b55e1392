"""/v1/models as callers may see it: every ready engine's models and adapters, as one list.

Each engine knows only its own model and the adapters it loaded, so one engine's answer
depends on which was asked: the list is the union of every ready engine's, asked
directly, and the same whichever gateway worker answers. vLLM's own answer lists
every adapter any client ever had resolved (their names are often
`gs://their-bucket/...`) and the local path of each model and adapter (`root`):
callers see neither. vLLM stamps `created` with the time of each call, and a
`permission` entry with an id of its own each time (OpenAI's model object has none);
here `created` is when the served set was last written, without `permission`, so
the answer stays the same between updates.
"""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import orjson
from aiohttp import web

from engine.workers import EngineWorker
from gateway.errors import ApiError
from gateway.state import READY

ASK_TIMEOUT_S = 5.0


def shown(card: dict[str, Any], adapters: frozenset[str]) -> bool:
    """Base models; the operator's adapters (--lora-modules) and those loaded under a
    name (not a source a client named)."""
    return not card.get("parent") or card["id"] in adapters or "/" not in card["id"]


def public_models(
    answers: list[dict[str, Any]],
    adapters: frozenset[str],
    order: list[str] | None = None,
    created: int | None = None,
) -> dict[str, Any]:
    """One list from the engines' answers: models in `order` (the served order), then the
    adapters by name; `root` is the id."""
    cards: dict[str, dict[str, Any]] = {}
    for answer in answers:
        for card in answer.get("data", []):
            if isinstance(card, dict) and isinstance(card.get("id"), str):
                cards.setdefault(card["id"], card)
    rank = {name: i for i, name in enumerate(order or [])}
    models = sorted(
        (c for c in cards.values() if not c.get("parent")),
        key=lambda c: (rank.get(c["id"], len(rank)), c["id"]),
    )
    adapters_shown = (c for c in cards.values() if c.get("parent") and shown(c, adapters))
    loaded = sorted(adapters_shown, key=lambda c: c["id"])
    stamp = {} if created is None else {"created": created}
    return {
        "object": "list",
        "data": [
            {**{k: v for k, v in c.items() if k != "permission"}, "root": c["id"], **stamp}
            for c in models + loaded
        ],
    }


async def _ask(session: aiohttp.ClientSession, worker: EngineWorker) -> dict[str, Any] | None:
    try:
        timeout = aiohttp.ClientTimeout(total=ASK_TIMEOUT_S)
        async with session.get(worker.url + "/v1/models", timeout=timeout) as resp:
            return orjson.loads(await resp.read()) if resp.status == 200 else None
    except (aiohttp.ClientError, TimeoutError, orjson.JSONDecodeError):
        return None


def add_route(app: web.Application, adapters: frozenset[str]) -> None:
    async def models_handler(_: web.Request) -> web.Response:
        ready = {r.replica for r in app["state"].replicas() if r.state == READY}
        workers = [w for w in app["engines"].workers() if w.replica in ready]
        answers = await asyncio.gather(*(_ask(app["direct_session"], w) for w in workers))
        answered = [a for a in answers if isinstance(a, dict)]
        if not answered:
            raise ApiError(503, "/v1/models: no engine is ready yet", {"Retry-After": "5"})
        order = list(dict.fromkeys(w.model for w in workers))
        body = public_models(answered, adapters, order, app["engines"].written)
        return web.Response(body=orjson.dumps(body), content_type="application/json")

    app.router.add_get("/v1/models", models_handler)
