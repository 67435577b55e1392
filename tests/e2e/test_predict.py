"""Vertex predict on the real stack: every row of shared/VERTEX.md, through the front door."""

from __future__ import annotations

import base64
import time
from typing import Any

import orjson
import psutil
import pytest

from tests.e2e.conftest import (
    HF_TOKEN,
    MAX_MODEL_LEN,
    REQUEST_TIMEOUT_S,
    SEQUENCE_TOKENS,
    VERTEX_ENV,
    Stack,
    Work,
)
from tests.gcs_emulator import client
from tests.helpers import descendants, hang_up, http_json, wait_for

pytestmark = pytest.mark.e2e

CHAT = "chatCompletions"
USER = [{"role": "user", "content": "Say something."}]
LONG = {"max_tokens": SEQUENCE_TOKENS, "ignore_eos": True}  # as long as the context allows


def _chat(**fields: Any) -> dict[str, Any]:
    return {"@requestFormat": CHAT, "messages": USER, **fields}


def _predict(stack: Stack, body: object, path: str = "/predict") -> tuple[int, Any]:
    return stack.request(path, body, timeout=REQUEST_TIMEOUT_S + 30)


def _ok(stack: Stack, body: object) -> Any:
    status, answer = _predict(stack, body)
    assert status == 200, answer
    return answer["predictions"]


def _error(stack: Stack, body: object, status: int) -> str:
    got, answer = _predict(stack, body)
    assert got == status, answer
    assert answer["error"]["code"] == status
    return answer["error"]["message"]


# --- shapes -----------------------------------------------------------------------------


def test_every_instance_is_answered_in_order_64_of_them(stack: Stack) -> None:
    prompts = [f"story number {i}." for i in range(64)]  # none a prefix of another
    predictions = _ok(
        stack,
        {
            # echo: the engine's own answer repeats the prompt it was given.
            "instances": [{"prompt": p, "echo": True} for p in prompts],
            "parameters": {"max_tokens": 4, "raw_response": True},
        },
    )
    assert len(predictions) == len(prompts)
    assert all(p.startswith(prompt) for prompt, p in zip(prompts, predictions, strict=True))


def test_parameters_are_defaults_and_instance_fields_win(stack: Stack) -> None:
    predictions = _ok(
        stack,
        {
            "instances": [_chat(max_tokens=5), _chat(), {"prompt": "hi"}],
            "parameters": {"max_tokens": 3, "ignore_eos": True, "raw_response": True},
        },
    )
    assert predictions[0]["usage"]["completion_tokens"] == 5
    assert predictions[1]["usage"]["completion_tokens"] == 3
    assert isinstance(predictions[2], str)  # raw_response from parameters: no framing
    assert not predictions[2].startswith("Prompt:")


def test_a_single_chat_instance_is_the_chat_completion_itself(stack: Stack) -> None:
    status, answer = _predict(
        stack,
        {"@requestFormat": CHAT, "instances": [{"messages": USER, "max_tokens": 4}]},
        VERTEX_ENV["AIP_PREDICT_ROUTE"],
    )
    assert status == 200, answer
    prediction = answer["predictions"]
    assert prediction["object"] == "chat.completion"
    assert prediction["choices"][0]["message"]["role"] == "assistant"
    assert isinstance(prediction["choices"][0]["message"]["content"], str)


def test_several_chat_instances_give_a_list_in_order(stack: Stack) -> None:
    lengths = [2, 5, 3, 4]
    predictions = _ok(stack, {"instances": [_chat(max_tokens=n, ignore_eos=True) for n in lengths]})
    assert [p["usage"]["completion_tokens"] for p in predictions] == lengths


def test_mixed_text_and_chat_instances(stack: Stack) -> None:
    predictions = _ok(
        stack, {"instances": [{"prompt": "hello", "max_tokens": 3}, _chat(max_tokens=3)]}
    )
    assert predictions[0].startswith("Prompt:\nhello\nOutput:\n")
    assert predictions[1]["object"] == "chat.completion"


def test_n_above_one(stack: Stack) -> None:
    one = _ok(stack, {"instances": [{"prompt": "a", "n": 3, "max_tokens": 3}]})
    assert len(one) == 3 and all(p.startswith("Prompt:\na\nOutput:\n") for p in one)
    two = _ok(stack, {"instances": [{"prompt": "a", "n": 2}, {"prompt": "b", "n": 2}]})
    assert [len(p) for p in two] == [2, 2] and two[1][0].startswith("Prompt:\nb\n")
    chat = _ok(stack, {"instances": [_chat(n=2, max_tokens=3)]})
    assert len(chat["choices"]) == 2


def test_sampling_fields_reach_the_engine(stack: Stack) -> None:
    chat = _ok(stack, {"instances": [_chat(max_tokens=3, logprobs=True, top_logprobs=2)]})
    assert [len(t["top_logprobs"]) for t in chat["choices"][0]["logprobs"]["content"]] == [2] * 3
    seeded = {"prompt": "x", "max_tokens": 12, "temperature": 1.0, "seed": 7}
    first, second = _ok(stack, {"instances": [seeded, seeded], "parameters": {}})
    assert first == second  # the same seed samples the same text, on either replica
    stopped = _ok(
        stack, {"instances": [{**LONG, "prompt": "x", "stop": ["e"], "ignore_eos": False}]}
    )
    assert "e" not in stopped[0].split("Output:\n", 1)[1]


# --- errors -----------------------------------------------------------------------------


def test_an_invalid_instance_fails_the_request_before_any_generation(stack: Stack) -> None:
    before = stack.total("vllm:generation_tokens_total")
    instances = [{"prompt": "a", "max_tokens": 50}] * 2 + [{"prompt": "c", "max_tokens": 0}]
    assert _error(stack, {"instances": instances}, 400) == (
        "instances[2].max_tokens: must be a positive integer"
    )
    message = _error(stack, {"instances": [{"prompt": "a", "max_tokns": 5}]}, 400)
    assert message == "instances[0].max_tokns: unknown field (did you mean 'max_tokens'?)"
    assert stack.total("vllm:generation_tokens_total") == before


@pytest.mark.parametrize(
    ("body", "status", "message"),
    [
        ({"instances": [{"prompt": "a"}] * 65}, 400, "instances: at most 64 per request, got 65"),
        ({"instances": [{"prompt": "word " * 3000}]}, 400, "instances[0]: This model's maximum"),
        (
            {"instances": [_chat(messages=[{"role": "user", "content": 5}])]},
            400,
            "instances[0].messages[0].content: must be string or array",
        ),
        (
            {"instances": [{"prompt": "a", "dynamic-lora": "gs://adapters/x"}]},
            400,
            "instances[0].dynamic-lora: the engines run without LoRA; start vgate serve with "
            "--enable-lora",
        ),
        (
            {"instances": [_chat(media_io_kwargs={"video": {"num_frames": -1}})]},
            400,
            "instances[0].media_io_kwargs: not a field a client may set",
        ),
        (
            {"instances": [{"prompt": "a", "stream": True}] * 2},
            400,
            "instances[0].stream: streaming takes exactly one instance, got 2",
        ),
    ],
)
def test_errors_say_what_was_wrong(stack: Stack, body: dict, status: int, message: str) -> None:
    assert _error(stack, body, status).startswith(message)


PIXEL = (
    "data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8BQDwAEhQ"
    "GAhKmMIQAAAABJRU5ErkJggg=="
)


def test_images_reach_the_engine_and_a_text_model_refuses_them(stack: Stack, storage: str) -> None:
    image = "gs://vertex-models/media/pixel.png"
    bucket = client(storage).lookup_bucket("vertex-models")
    bucket.blob("media/pixel.png").upload_from_string(
        base64.b64decode(PIXEL.split(",")[1]), content_type="image/png"
    )
    text = {"prompt": "What is this?", "multi_modal_data": {"image": PIXEL}}
    from_storage = {"prompt": "What is this?", "multi_modal_data": {"image": image}}
    chat = _chat(
        messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": image}}]}]
    )
    for instance in (text, from_storage, chat):
        message = _error(stack, {"instances": [{"prompt": "fine"}, instance]}, 400)
        assert message == "instances[1]: vgate-demo is not a multimodal model"
    missing = {"prompt": "?", "multi_modal_data": {"image": image + ".gone"}}
    assert _error(stack, {"instances": [missing]}, 400) == (
        f"instances[0]: {image}.gone: no such object"
    )
    # Only the buckets the operator allows: the container's credentials are not the caller's.
    elsewhere = {"prompt": "?", "multi_modal_data": {"image": "gs://someone-else/x.png"}}
    assert _error(stack, {"instances": [elsewhere]}, 400) == (
        "instances[0]: gs://someone-else/x.png: bucket 'someone-else' is not allowed for media "
        "(--allowed-media-buckets)"
    )


def test_a_body_too_large_is_413(stack: Stack) -> None:
    status, _, answer = http_json(
        stack.base + "/predict", {"instances": [{"prompt": "a" * 1_600_000}]}
    )
    assert status == 413 and answer["error"]["status"] == "REQUEST_TOO_LARGE"


# --- cancellation -----------------------------------------------------------------------


def _instances(work: Work) -> list[dict[str, Any]]:
    return [{**work.fields(), "prompt": "go"}] * work.instances


def test_a_failed_instance_cancels_the_others_engine_work(stack: Stack) -> None:
    # MARGIN x 10 s of work: had the failure not cancelled it, far more than half of it
    # would be generated before the engines went idle.
    work = stack.work_for(10, instances=3)
    asked = work.tokens
    before = stack.total("vllm:generation_tokens_total")
    instances = [*_instances(work), {"prompt": "word " * 3000}]
    assert _error(stack, {"instances": instances}, 400).startswith("instances[3]: ")
    generated = stack.generated_once_idle(before)
    assert generated < asked / 2, f"{generated} of {asked} tokens were generated"


def test_the_deadline_gives_504_and_stops_the_generation(stack: Stack) -> None:
    # MARGIN x what the engines make in the deadline at their measured saturated rate.
    work = stack.work_for(REQUEST_TIMEOUT_S, instances=64)
    instances, asked = _instances(work), work.tokens
    before = stack.total("vllm:generation_tokens_total")
    start = time.monotonic()
    message = _error(stack, {"instances": instances}, 504)
    took = time.monotonic() - start
    at_deadline = stack.total("vllm:generation_tokens_total") - before
    assert message == f"the request did not finish within {REQUEST_TIMEOUT_S} s"
    assert REQUEST_TIMEOUT_S <= took < REQUEST_TIMEOUT_S + 5
    generated = stack.generated_once_idle(before)
    assert generated < asked * 0.6, f"{generated} of {asked} tokens were generated"
    assert generated - at_deadline < asked * 0.05, "generation went on after the deadline"


@pytest.mark.parametrize("streamed", [False, True])
def test_a_client_that_disconnects_cancels_every_instance(stack: Stack, streamed: bool) -> None:
    # MARGIN x 20 s of work, so it is still running when the client goes and most of it
    # is left: one streamed chat instance (a text one streams one sequence), or 32 instances.
    # (Once in four full runs an engine went on for about 20 s after the disconnect before
    # vLLM aborted the work: the bound, under half of what was asked, is 40 s of it.)
    work = stack.work_for(20, instances=1 if streamed else 32)
    asked = work.tokens
    instances = [_chat(**work.fields(), stream=True)] if streamed else _instances(work)
    before = stack.total("vllm:generation_tokens_total")
    conn = stack.send("/predict", {"instances": instances})
    if streamed:
        resp = conn.getresponse()
        assert resp.status == 200 and resp.readline().startswith(b"data: ")
    else:
        wait_for(lambda: stack.total("vllm:num_requests_running") > 0, 30, "generation to start")
    hang_up(conn)
    generated = stack.generated_once_idle(before)
    assert generated < asked / 2, f"{generated} of {asked} tokens were generated"


# --- streaming --------------------------------------------------------------------------


def _stream(stack: Stack, body: object) -> tuple[int, str, list[tuple[float, bytes]]]:
    """(status, content type, [(seconds since the request, bytes read)]) of a predict call."""
    start = time.monotonic()
    resp = stack.send("/predict", body).getresponse()
    reads = []
    while data := resp.read1(65536):
        reads.append((time.monotonic() - start, data))
    return resp.status, resp.getheader("Content-Type", ""), reads


def _events(reads: list[tuple[float, bytes]], separator: bytes) -> list[tuple[float, bytes]]:
    """Each event with the time its last byte arrived."""
    events, pending = [], b""
    for when, data in reads:
        *done, pending = (pending + data).split(separator)
        events += [(when, e) for e in done if e]
    assert not pending, f"the stream ended inside an event: {pending[:80]!r}"
    return events


def _arrives_early(events: list[tuple[float, Any]], first: int) -> None:
    """Deltas come as the engine makes them: the first long before the last."""
    assert events[first][0] < events[-1][0] / 3, (events[first][0], events[-1][0])


def test_text_streams_as_server_sent_events(stack: Stack) -> None:
    body = {"instances": [{**LONG, "max_tokens": 600, "prompt": " hi ", "stream": True}]}
    status, kind, reads = _stream(stack, body)
    assert status == 200 and kind.startswith("text/event-stream")
    events = _events(reads, b"\n\n")
    assert events[-1][1] == b"data: [DONE]"
    deltas = [orjson.loads(e.removeprefix(b"data: "))["predictions"] for _, e in events[:-1]]
    assert all(len(d) == 1 and isinstance(d[0], str) for d in deltas)
    text = "".join(d[0] for d in deltas)
    assert deltas[0] == ["Prompt:\nhi\nOutput:\n"] and len(text) > len(deltas[0][0])
    assert len(deltas) > 100  # one event per token or so, not one blob
    _arrives_early(events, first=1)  # event 0 is the framing


def test_chat_streams_openai_chunks(stack: Stack) -> None:
    body = {"instances": [_chat(**{**LONG, "max_tokens": 600}, stream=True)]}
    status, kind, reads = _stream(stack, body)
    assert status == 200 and kind.startswith("text/event-stream")
    events = _events(reads, b"\n\n")
    assert events[-1][1] == b"data: [DONE]"
    chunks = [orjson.loads(e.removeprefix(b"data: ")) for _, e in events[:-1]]
    assert {c["object"] for c in chunks} == {"chat.completion.chunk"}
    assert sum(bool(c["choices"] and c["choices"][0]["delta"].get("content")) for c in chunks) > 100
    _arrives_early(events, first=1)


def test_the_legacy_nul_separated_format(stack: Stack) -> None:
    instance = {**LONG, "max_tokens": 600, "prompt": "hi", "stream": True}
    body = {"instances": [instance], "parameters": {"stream_format": "nul", "raw_response": True}}
    status, kind, reads = _stream(stack, body)
    assert status == 200 and kind == "application/octet-stream"
    events = _events(reads, b"\0")
    chunks = [orjson.loads(e) for _, e in events]
    assert all(list(c) == ["predictions"] and len(c["predictions"]) == 1 for c in chunks)
    assert len(chunks) > 100
    _arrives_early(events, first=0)


def test_a_stream_past_the_deadline_ends_with_a_504_event(stack: Stack) -> None:
    # One instance goes to one engine; sized by both engines' rate, MARGIN x the deadline.
    work = stack.work_for(REQUEST_TIMEOUT_S, instances=1)
    body = {"instances": [_chat(**work.fields(), stream=True)]}
    before = stack.total("vllm:generation_tokens_total")
    status, _, reads = _stream(stack, body)
    assert status == 200
    events = _events(reads, b"\n\n")
    last = orjson.loads(events[-1][1].removeprefix(b"data: "))
    assert last["error"]["code"] == 504 and events[-1][0] >= REQUEST_TIMEOUT_S
    generated = stack.generated_once_idle(before)
    assert generated < work.tokens / 2, f"{generated} of {work.tokens} tokens were generated"


def test_a_streamed_request_the_engine_refuses_is_a_plain_json_error(stack: Stack) -> None:
    body = {"instances": [{"prompt": "word " * 3000, "stream": True}]}
    assert _error(stack, body, 400).startswith("instances[0]: This model's maximum")


# --- the container's arguments --------------------------------------------------------


def test_google_style_arguments_reach_the_engines(stack: Stack) -> None:
    status, models = stack.request("/v1/models")
    assert status == 200 and models["data"][0]["max_model_len"] == MAX_MODEL_LEN
    servers = [p for p in descendants(stack.proc.pid) if "--model" in _cmdline(p)]
    assert len(servers) == 2
    for server in servers:
        assert {"--gpu-memory-utilization=0.9", "--max-loras=1"} <= set(server.cmdline())
        assert server.environ()["HF_TOKEN"] == HF_TOKEN


def _cmdline(p: psutil.Process) -> list[str]:
    try:
        return p.cmdline()
    except psutil.NoSuchProcess:
        return []
