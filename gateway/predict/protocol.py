"""A predict request, parsed and checked whole before any generation starts.

Each instance becomes one engine request: a text-generation instance a
completion, a chat instance (`"@requestFormat": "chatCompletions"`) the chat
request it is. A text instance with `multi_modal_data` goes to vLLM's
tokens-in endpoint with its media: the engine sees the prompt exactly as
written (tokenized as a completion's would be) plus the images, with no chat
template around it, as Google's container does. (A request-level chat
template would do it too, but only with --trust-request-chat-template, which
would let every OpenAI client send templates.)
`parameters` gives defaults; an instance's own fields win. Every problem is a
400 that names the instance and the field. Pure: no I/O, tested without servers.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import orjson

from engine.lora_cache import AdapterError, AdapterPolicy, check_adapter_name, classify_adapter
from gateway.errors import ApiError
from gateway.predict.validation import CHAT, COMPLETION, RequestSchemas

CHAT_FORMAT = "chatCompletions"
COMPLETIONS_ROUTE = "/v1/completions"
CHAT_ROUTE = "/v1/chat/completions"
GENERATE_ROUTE = "/inference/v1/generate"  # tokens in, text out (vLLM's --enable-scale-out)
TOKENIZE_ROUTE = "/tokenize"
# Stream formats: server-sent events, or the NUL-separated JSON chunks of
# Google's older images.
STREAM_FORMATS = ("sse", "nul")
# multi_modal_data key: the chat content part vLLM takes it as.
MEDIA_PARTS = {"image": "image_url", "video": "video_url", "audio": "audio_url"}
TOP_LEVEL_FIELDS = ("instances", "parameters", "@requestFormat")
# Chat messages and content parts in one request: each costs schema validation on the
# gateway's event loop, which answers /ping too (review M11); no conversation needs more.
MAX_CHAT_ITEMS = 2048
# What a client may set on an instance: OpenAI's sampling and output fields and vLLM's
# sampling extras. The rest of vLLM's request schemas is the operator's (processor and
# media kwargs, chat templates, KV transfer, priority, request ids, raw extras, prompt
# embeddings, beam search): refused by name.
SAMPLING_FIELDS = frozenset(
    {
        "max_tokens", "max_completion_tokens", "min_tokens", "temperature", "top_p", "top_k",
        "min_p", "n", "seed", "stop", "stop_token_ids", "ignore_eos", "presence_penalty",
        "frequency_penalty", "repetition_penalty", "length_penalty", "logit_bias",
        "allowed_token_ids", "bad_words", "logprobs", "top_logprobs",
        "include_stop_str_in_output", "skip_special_tokens", "spaces_between_special_tokens",
        "response_format", "structured_outputs", "user", "stream_options",
        "model",  # checked as dynamic-lora is
    }
)  # fmt: skip
CLIENT_FIELDS = {
    COMPLETION: SAMPLING_FIELDS | {"prompt", "echo", "suffix"},
    CHAT: SAMPLING_FIELDS
    | {
        "messages", "tools", "tool_choice", "parallel_tool_calls", "add_generation_prompt",
        "continue_final_message", "reasoning_effort", "include_reasoning", "documents",
    },
}  # fmt: skip


@dataclass(frozen=True)
class Instance:
    """One instance, as the engine request it becomes."""

    chat: bool  # a chat instance: its prediction is the ChatCompletion itself
    route: str
    request: dict[str, Any]
    prompt: str = ""  # text generation: for Google's "Prompt:/Output:" framing
    raw_response: bool = False
    stream: bool = False
    stream_format: str = "sse"

    @property
    def sequences(self) -> int:
        """Sequences the engine generates for it: its `n`."""
        n = self.request.get("sampling_params", self.request).get("n")
        return n if isinstance(n, int) and n > 0 else 1


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


@dataclass(frozen=True)
class Envelope:
    """The request's outer shape, checked without the engine's schema."""

    instances: list[Any]
    parameters: dict[str, Any]
    request_format: str | None


def parse_envelope(body: bytes, max_instances: int) -> Envelope:
    request = parse_body(body)
    unknown = [k for k in request if k not in TOP_LEVEL_FIELDS]
    if unknown:
        fields = ", ".join(TOP_LEVEL_FIELDS)
        raise _bad(f"{unknown[0]}: unknown field (a predict request has {fields})")
    if "instances" not in request:
        raise _bad("instances: required")
    instances = request["instances"]
    if not isinstance(instances, list):
        raise _bad("instances: must be a list")
    if not instances:
        raise _bad("instances: must not be empty")
    if len(instances) > max_instances:
        raise _bad(
            f"instances: at most {max_instances} per request, got {len(instances)} "
            "(split the request, or raise --max-instances)"
        )
    parameters = request.get("parameters")
    if parameters is None:
        parameters = {}
    if not isinstance(parameters, dict):
        raise _bad("parameters: must be an object")
    request_format = _request_format("@requestFormat", request.get("@requestFormat"))
    return Envelope(integral(instances), integral(parameters), request_format)


EXACT_INTEGERS = 2**53  # beyond this a double does not hold every integer


def integral(value: Any) -> Any:
    """Whole-number floats as ints, everywhere in `value`.

    Vertex's API carries instances as protobuf Structs, whose numbers are doubles:
    a client's `"max_tokens": 64` can reach the container as 64.0 (Google's SDK
    sends it so). JSON does not tell the two apart; vLLM's integer fields and the
    checks here want 64.
    """
    if isinstance(value, float) and value.is_integer() and abs(value) < EXACT_INTEGERS:
        return int(value)
    if isinstance(value, dict):
        return {k: integral(v) for k, v in value.items()}
    if isinstance(value, list):
        return [integral(v) for v in value]
    return value


def parse_instances(
    envelope: Envelope, schemas: RequestSchemas, *, lora: AdapterPolicy | None
) -> list[Instance]:
    """Every instance as its engine request; all checked before any is sent.

    A streamed request has exactly one instance. `lora`: the adapter sources a
    client may name, or None when the engines run without LoRA.
    """
    items = sum(_chat_items(raw) for raw in envelope.instances)
    if items > MAX_CHAT_ITEMS:
        raise _bad(
            f"instances: {items} chat messages and content parts in all; "
            f"at most {MAX_CHAT_ITEMS} per request"
        )
    instances = [
        _parse_instance(i, raw, envelope.parameters, envelope.request_format, schemas, lora)
        for i, raw in enumerate(envelope.instances)
    ]
    streamed = [i for i, inst in enumerate(instances) if inst.stream]
    if streamed and len(instances) > 1:
        raise _bad(
            f"instances[{streamed[0]}].stream: streaming takes exactly one instance, "
            f"got {len(instances)}"
        )
    first = instances[0]
    if first.stream and first.stream_format == "nul" and first.chat:
        raise _bad("instances[0].stream_format: 'nul' is for text-generation instances only")
    if first.stream and not first.chat and first.request.get("n", 1) not in (1, None):
        raise _bad("instances[0].n: a streamed text-generation instance takes n = 1")
    return instances


def _chat_items(raw: Any) -> int:
    """Messages and content parts of one instance, as sent (before any check)."""
    messages = raw.get("messages") if isinstance(raw, dict) else None
    if not isinstance(messages, list):
        return 0
    parts = (m.get("content") for m in messages if isinstance(m, dict))
    return len(messages) + sum(len(c) for c in parts if isinstance(c, list))


def _request_format(where: str, value: Any) -> str | None:
    if value is None or value == CHAT_FORMAT:
        return value
    raise _bad(f"{where}: must be {CHAT_FORMAT!r} (or absent for text generation)")


def _parse_instance(
    index: int,
    raw: Any,
    parameters: dict[str, Any],
    top_format: str | None,
    schemas: RequestSchemas,
    policy: AdapterPolicy | None,
) -> Instance:
    where = f"instances[{index}]"
    if not isinstance(raw, dict):
        raise _bad(f"{where}: must be an object")
    chat = _request_format(f"{where}.@requestFormat", raw.get("@requestFormat", top_format))

    def name(path: str) -> str:
        """The field as the client wrote it: in this instance, or in `parameters`."""
        if not path:
            return where
        key = path.split(".")[0].split("[")[0]
        return f"{where}.{path}" + (
            "" if key in raw or key not in parameters else " (from parameters)"
        )

    fields = {**parameters, **raw}
    fields.pop("@requestFormat", None)
    stream = fields.pop("stream", False)
    if stream is not None and not isinstance(stream, bool):
        raise _bad(f"{name('stream')}: must be true or false")
    streaming = {"stream": bool(stream), "stream_format": fields.pop("stream_format", "sse")}
    if streaming["stream_format"] not in STREAM_FORMATS:
        raise _bad(f"{name('stream_format')}: must be one of {', '.join(STREAM_FORMATS)}")
    lora = fields.pop("dynamic-lora", None)
    model = fields.pop("model", None)
    if lora is not None:
        fields["model"] = _adapter(lora, name("dynamic-lora"), policy)
    elif model not in (None, "") and policy is not None:  # an adapter to fetch: same checks
        fields["model"] = _adapter(model, name("model"), policy)
    elif model is not None:  # without LoRA only the served model's name can answer
        fields["model"] = model
    kind = CHAT if chat else COMPLETION
    operator_fields = schemas.properties(kind) - CLIENT_FIELDS[kind]
    for key in fields:
        if key in operator_fields:
            raise _bad(f"{name(key)}: not a field a client may set (an operator's vLLM option)")
    fields.setdefault("model", "")  # vLLM serves its model under an empty name

    if chat:
        if "raw_response" in raw or "multi_modal_data" in raw:
            key = "raw_response" if "raw_response" in raw else "multi_modal_data"
            hint = " (put images in messages as image_url parts)" * (key == "multi_modal_data")
            raise _bad(f"{where}.{key}: only for text-generation instances{hint}")
        for control in ("raw_response", "multi_modal_data"):
            fields.pop(control, None)  # from parameters, meant for the text instances
        if "messages" not in fields:
            raise _bad(f"{where}.messages: required for a chat instance")
        _check(schemas, CHAT, fields, name)
        return Instance(True, CHAT_ROUTE, fields, **streaming)

    prompt = fields.pop("prompt", None)
    if prompt is None:
        raise _bad(f"{where}.prompt: required")
    if not isinstance(prompt, str):
        raise _bad(f"{name('prompt')}: must be a string")
    raw_response = fields.pop("raw_response", False)
    if not isinstance(raw_response, bool):
        raise _bad(f"{name('raw_response')}: must be true or false")
    media = fields.pop("multi_modal_data", None)
    if media is None:
        request = {**fields, "prompt": prompt}
        _check(schemas, COMPLETION, request, name)
        return Instance(False, COMPLETIONS_ROUTE, request, prompt, raw_response, **streaming)
    parts = _media_parts(media, name("multi_modal_data"))
    _check(schemas, COMPLETION, {**fields, "prompt": prompt}, name)
    model = fields.pop("model") or None  # None: the engine's own model
    for key in fields:
        if key not in schemas.sampling_fields:
            raise _bad(f"{name(key)}: not available with multi_modal_data")
    request = {
        "model": model,
        "sampling_params": fields,
        "content_parts": parts,
        "output_mode": "text",
    }
    return Instance(False, GENERATE_ROUTE, request, prompt, raw_response, **streaming)


def _adapter(lora: Any, where: str, policy: AdapterPolicy | None) -> str:
    """The engine serves an adapter under its name: a loaded one's, or a source to fetch."""
    if not isinstance(lora, str) or not lora:
        raise _bad(f"{where}: must be a non-empty string")
    if policy is None:
        raise _bad(f"{where}: the engines run without LoRA; start vgate serve with --enable-lora")
    try:
        if "/" in lora:  # not the name of an adapter loaded at start: a source
            policy.check(classify_adapter(lora))  # which bounds the name too
        else:
            check_adapter_name(lora)  # bounded, even as a name vLLM alone knows
    except AdapterError as e:
        raise _bad(f"{where}: {e}") from None
    return lora


def _media_parts(media: Any, where: str) -> list[dict[str, Any]]:
    """`{"image": url or [urls]}` as the tokens-in endpoint's content parts, in order."""
    if not isinstance(media, dict) or not media:
        raise _bad(f'{where}: must be an object such as {{"image": "<url>"}}')
    parts = []
    for key, urls in media.items():
        part = MEDIA_PARTS.get(key)
        if part is None:
            raise _bad(f"{where}.{key}: unknown kind; use {', '.join(MEDIA_PARTS)}")
        for url in urls if isinstance(urls, list) else [urls]:
            if not isinstance(url, str) or not url:
                raise _bad(f"{where}.{key}: must be a URL or a list of URLs")
            parts.append({"type": part, "url": url})
    return parts


def _check(
    schemas: RequestSchemas, kind: str, request: dict[str, Any], name: Callable[[str], str]
) -> None:
    problem = schemas.problem(kind, request)
    if problem is not None:
        path, message = problem
        raise _bad(f"{name(path)}: {message}")
