"""Answering predict requests: every instance at once, in order.

Google's container reads only instances[0]; here each instance becomes one
engine call, all in flight together, and predictions[i] belongs to
instances[i]. One failure cancels the others' engine work.
"""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp

from gateway.engine_client import post_json
from gateway.errors import ApiError
from gateway.metrics import UPSTREAM_ERRORS
from gateway.predict.protocol import TextInstance


def completion_request(instance: TextInstance) -> dict[str, Any]:
    # "model" left empty: vLLM serves its one model under any empty name.
    return {"model": "", **instance.sampling, "prompt": instance.prompt}


def format_text(instance: TextInstance, text: str) -> str:
    """Google's framing, unless the client asked for the raw text."""
    if instance.raw_response:
        return text
    return f"Prompt:\n{instance.prompt.strip()}\nOutput:\n{text}"


def prediction(instance: TextInstance, completion: dict[str, Any]) -> str | list[str]:
    texts = [format_text(instance, c["text"]) for c in completion["choices"]]
    return texts[0] if len(texts) == 1 else texts


def predictions(instances: list[TextInstance], completions: list[dict[str, Any]]) -> list[Any]:
    """One entry per instance; a lone instance with n > 1 gives one entry per sequence."""
    answers = [prediction(i, c) for i, c in zip(instances, completions, strict=True)]
    if len(answers) == 1 and isinstance(answers[0], list):
        return answers[0]
    return answers


async def predict(
    session: aiohttp.ClientSession,
    instances: list[TextInstance],
    timeout: float,
    request_id: str | None = None,
) -> list[Any]:
    try:
        async with asyncio.timeout(timeout), asyncio.TaskGroup() as group:
            tasks = [
                group.create_task(
                    post_json(
                        session,
                        "/v1/completions",
                        completion_request(inst),
                        f"instances[{i}]",
                        request_id,
                    )
                )
                for i, inst in enumerate(instances)
            ]
    except TimeoutError:
        UPSTREAM_ERRORS.labels("timeout").inc()
        raise ApiError(504, f"the request did not finish within {timeout:g} s") from None
    except ExceptionGroup as group_error:
        # The first instance that failed fails the request; the rest were cancelled.
        first = group_error.exceptions[0]
        raise first if isinstance(first, ApiError) else group_error from None
    return predictions(instances, [t.result() for t in tasks])
