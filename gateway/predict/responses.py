"""What a predict request answers: predictions in Vertex's shapes, and stream events.

Pure: engine answers in, bytes or JSON-ready values out.
"""

from __future__ import annotations

from typing import Any

import orjson

from gateway.errors import error_body
from gateway.predict.protocol import CHAT_ROUTE, Instance

SSE_DONE = b"data: [DONE]\n\n"


def format_text(instance: Instance, text: str) -> str:
    """Google's framing, unless the client asked for the raw text."""
    return text if instance.raw_response else framing(instance) + text


def framing(instance: Instance) -> str:
    return f"Prompt:\n{instance.prompt.strip()}\nOutput:\n"


def _choice_text(instance: Instance, choice: dict[str, Any]) -> str:
    # A text instance with multi_modal_data went to the engine as a chat request.
    if instance.route == CHAT_ROUTE:
        return choice["message"]["content"] or ""
    return choice["text"]


def prediction(instance: Instance, answer: dict[str, Any]) -> Any:
    """A chat instance's prediction is the ChatCompletion; a text one is its text(s)."""
    if instance.chat:
        return answer
    texts = [format_text(instance, _choice_text(instance, c)) for c in answer["choices"]]
    return texts[0] if len(texts) == 1 else texts


def predictions(instances: list[Instance], answers: list[dict[str, Any]]) -> Any:
    """`predictions[i]` for `instances[i]`; a lone instance gives its own shape.

    A lone chat instance: the ChatCompletion object itself (clients read
    predictions["choices"]). A lone text instance with n > 1: one entry per sequence.
    """
    out = [prediction(i, a) for i, a in zip(instances, answers, strict=True)]
    if len(out) == 1 and (instances[0].chat or isinstance(out[0], list)):
        return out[0]
    return out


def stream_delta(instance: Instance, chunk: dict[str, Any]) -> str:
    """The new text in one engine stream chunk of a text instance ('' if none)."""
    choices = chunk.get("choices") or []
    if not choices:
        return ""  # a usage-only chunk
    if instance.route == CHAT_ROUTE:
        return choices[0].get("delta", {}).get("content") or ""
    return choices[0].get("text") or ""


def event(body: bytes, stream_format: str) -> bytes:
    """One JSON body as a server-sent event, or as a NUL-terminated chunk (Google's old format)."""
    return b"data: " + body + b"\n\n" if stream_format == "sse" else body + b"\0"


def text_event(delta: str, stream_format: str) -> bytes:
    return event(orjson.dumps({"predictions": [delta]}), stream_format)


def error_event(status: int, message: str, stream_format: str) -> bytes:
    """An error after the stream began, when the status line is long gone."""
    return event(error_body(status, message), stream_format)


def done_event(stream_format: str) -> bytes:
    # Google's older NUL format has no end marker: the stream just ends.
    return SSE_DONE if stream_format == "sse" else b""
