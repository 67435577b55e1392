"""Parsing and validating a predict request. Pure: no I/O, tested without servers."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import orjson

from gateway.errors import ApiError

# Fields of a text-generation instance that steer vgate, not the sampler.
CONTROL_FIELDS = ("prompt", "raw_response", "stream")


@dataclass(frozen=True)
class TextInstance:
    """A text-generation instance: a prompt and vLLM sampling fields."""

    prompt: str
    raw_response: bool = False
    sampling: dict[str, Any] = field(default_factory=dict)


def _bad(message: str) -> ApiError:
    return ApiError(400, message)


def parse_body(body: bytes) -> dict[str, Any]:
    try:
        request = orjson.loads(body)
    except orjson.JSONDecodeError as e:
        raise _bad(f"request body is not valid JSON: {e}") from None
    if not isinstance(request, dict):
        raise _bad("request body must be a JSON object with an 'instances' list")
    return request


def parse_instances(request: dict[str, Any]) -> list[TextInstance]:
    """The instances of a predict request, with `parameters` as defaults for each."""
    if "instances" not in request:
        raise _bad("instances: required")
    instances = request["instances"]
    if not isinstance(instances, list):
        raise _bad("instances: must be a list")
    if not instances:
        raise _bad("instances: must not be empty")
    parameters = request.get("parameters", {})
    if parameters is None:
        parameters = {}
    if not isinstance(parameters, dict):
        raise _bad("parameters: must be an object")
    return [parse_text_instance(i, inst, parameters) for i, inst in enumerate(instances)]


def parse_text_instance(index: int, instance: Any, parameters: dict[str, Any]) -> TextInstance:
    where = f"instances[{index}]"
    if not isinstance(instance, dict):
        raise _bad(f"{where}: must be an object with a 'prompt'")
    merged = {**parameters, **instance}
    prompt = merged.get("prompt")
    if prompt is None:
        raise _bad(f"{where}.prompt: required")
    if not isinstance(prompt, str):
        raise _bad(f"{where}.prompt: must be a string")
    raw = merged.get("raw_response", False)
    if not isinstance(raw, bool):
        raise _bad(f"{where}.raw_response: must be true or false")
    if merged.get("stream"):
        raise _bad(f"{where}.stream: streaming on the predict route is not supported yet")
    sampling = {k: v for k, v in merged.items() if k not in CONTROL_FIELDS}
    return TextInstance(prompt=prompt, raw_response=raw, sampling=sampling)
