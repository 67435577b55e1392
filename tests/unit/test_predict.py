"""Predict parsing, translation and response shapes: pure functions, no server."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from engine.lora_cache import AdapterPolicy
from gateway.errors import ApiError
from gateway.predict.protocol import (
    CHAT_ROUTE,
    COMPLETIONS_ROUTE,
    GENERATE_ROUTE,
    MAX_CHAT_ITEMS,
    Instance,
    parse_envelope,
    parse_instances,
)
from gateway.predict.responses import (
    done_event,
    error_event,
    format_text,
    predictions,
    stream_delta,
    text_event,
)
from gateway.predict.validation import RequestSchemas

USER = [{"role": "user", "content": "hi"}]


def _parse(
    schemas: RequestSchemas,
    body: Any,
    max_instances: int = 64,
    lora: AdapterPolicy | None = AdapterPolicy(),  # noqa: B008 (frozen, shared safely)
) -> list[Instance]:
    """What the route does: the envelope first, then every instance."""
    raw = body if isinstance(body, bytes) else orjson.dumps(body)
    return parse_instances(parse_envelope(raw, max_instances), schemas, lora=lora)


def _error(
    schemas: RequestSchemas,
    body: Any,
    max_instances: int = 64,
    lora: AdapterPolicy | None = AdapterPolicy(),  # noqa: B008 (frozen, shared safely)
) -> str:
    with pytest.raises(ApiError) as info:
        _parse(schemas, body, max_instances, lora)
    assert info.value.status == 400
    return info.value.message


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"{", "request body is not valid JSON"),
        (b"[1]", "request body must be a JSON object"),
        ({}, "instances: required"),
        ({"instances": [], "model": "x"}, "model: unknown field"),
        ({"instances": {"prompt": "a"}}, "instances: must be a list"),
        ({"instances": []}, "instances: must not be empty"),
        ({"instances": ["a"]}, "instances[0]: must be an object"),
        ({"instances": [{"prompt": "a"}, {}]}, "instances[1].prompt: required"),
        ({"instances": [{"prompt": 3}]}, "instances[0].prompt: must be a string"),
        ({"instances": [{"prompt": "a", "raw_response": 1}]}, "instances[0].raw_response"),
        ({"instances": [{"prompt": "a"}], "parameters": []}, "parameters: must be an object"),
        (
            {"instances": [{"prompt": "a"}, {"prompt": "b", "max_tokens": -1}]},
            "instances[1].max_tokens: must be a positive integer",
        ),
        (
            {"instances": [{"prompt": "a"}], "parameters": {"max_tokens": "x"}},
            "instances[0].max_tokens (from parameters): must be a positive integer",
        ),
        ({"instances": [{"prompt": "a", "colour": 1}]}, "instances[0].colour: unknown field"),
        ({"instances": [{"prompt": "a", "@requestFormat": "x"}]}, "instances[0].@requestFormat"),
        ({"@requestFormat": "chat", "instances": [{}]}, "@requestFormat: must be"),
        (
            {"@requestFormat": "chatCompletions", "instances": [{"prompt": "a"}]},
            "instances[0].messages: required for a chat instance",
        ),
        (
            {"instances": [{"@requestFormat": "chatCompletions", "messages": USER, "n": 0}]},
            "instances[0].n: must be a positive integer",
        ),
        (
            {
                "instances": [
                    {"messages": USER, "@requestFormat": "chatCompletions", "raw_response": True}
                ]
            },
            "instances[0].raw_response: only for text-generation instances",
        ),
        (
            {"instances": [{"prompt": "a", "stream": True}, {"prompt": "b"}]},
            "instances[0].stream: streaming takes exactly one instance, got 2",
        ),
        ({"instances": [{"prompt": "a", "stream": "yes"}]}, "instances[0].stream: must be true"),
        (
            {"instances": [{"prompt": "a", "stream": True, "n": 2}]},
            "instances[0].n: a streamed text-generation instance takes n = 1",
        ),
        ({"instances": [{"prompt": "a", "stream_format": "xml"}]}, "instances[0].stream_format"),
        (
            {"instances": [{"prompt": "a", "multi_modal_data": {"smell": "x"}}]},
            "instances[0].multi_modal_data.smell: unknown kind",
        ),
        (
            {"instances": [{"prompt": "a", "multi_modal_data": {"image": 3}}]},
            "instances[0].multi_modal_data.image: must be a URL",
        ),
        (
            {
                "instances": [
                    {"prompt": "a", "suffix": "b", "multi_modal_data": {"image": "http://i"}}
                ]
            },
            "instances[0].suffix: not available with multi_modal_data",
        ),
        ({"instances": [{"prompt": "a", "dynamic-lora": ""}]}, "instances[0].dynamic-lora"),
    ],
)
def test_bad_requests_name_what_is_wrong(schemas: RequestSchemas, body: Any, message: str) -> None:
    assert _error(schemas, body).startswith(message)


def test_at_most_max_instances(schemas: RequestSchemas) -> None:
    body = {"instances": [{"prompt": "a"}] * 3}
    assert _error(schemas, body, max_instances=2).startswith("instances: at most 2 per request")
    assert len(_parse(schemas, body, max_instances=3)) == 3


def test_chat_messages_and_parts_are_bounded_per_request(schemas: RequestSchemas) -> None:
    """Each costs the gateway's loop schema checks (review M11)."""
    part = {"type": "text", "text": "x"}
    half = {"messages": [{"role": "user", "content": [part] * (MAX_CHAT_ITEMS // 2 - 1)}]}
    body = {"@requestFormat": "chatCompletions", "instances": [half, half]}
    assert len(_parse(schemas, body)) == 2  # exactly the bound
    body["instances"].append({"messages": [{"role": "user", "content": "one more"}]})
    assert _error(schemas, body).startswith(
        f"instances: {MAX_CHAT_ITEMS + 1} chat messages and content parts in all; "
        f"at most {MAX_CHAT_ITEMS} per request"
    )


def test_a_bad_part_deep_in_a_long_message_is_named(schemas: RequestSchemas) -> None:
    parts = [{"type": "text", "text": "x"}] * 1000
    parts[700] = 5
    body = {
        "@requestFormat": "chatCompletions",
        "instances": [{"messages": [{"role": "user", "content": parts}]}],
    }
    assert _error(schemas, body) == "instances[0].messages[0].content[700]: must be object"


def test_whole_number_floats_are_integers_as_vertexs_structs_send_them(
    schemas: RequestSchemas,
) -> None:
    """Google's SDK sends instances as protobuf Structs: 64 arrives as 64.0."""
    (text,) = _parse(
        schemas, {"instances": [{"prompt": "x", "max_tokens": 64.0, "n": 2.0, "top_p": 0.5}]}
    )
    assert text.request["max_tokens"] == 64 and isinstance(text.request["max_tokens"], int)
    assert text.request["n"] == 2 and text.sequences == 2 and text.request["top_p"] == 0.5
    assert "must be a positive integer" in _error(
        schemas, {"instances": [{"prompt": "x", "max_tokens": 64.5}]}
    )


def test_parameters_are_defaults_and_instance_fields_win(schemas: RequestSchemas) -> None:
    parsed = _parse(
        schemas,
        {
            "instances": [{"prompt": "x", "max_tokens": 3}, {"prompt": "y"}],
            "parameters": {"max_tokens": 9, "temperature": 0, "raw_response": True},
        },
    )
    a, b = parsed
    assert a == Instance(
        False, COMPLETIONS_ROUTE, {"model": "", "max_tokens": 3, "temperature": 0, "prompt": "x"},
        "x", True,
    )  # fmt: skip
    assert b.request == {"model": "", "max_tokens": 9, "temperature": 0, "prompt": "y"}


def test_sampling_fields_reach_the_engine_request_unchanged(schemas: RequestSchemas) -> None:
    fields = {"max_tokens": 4, "stop": ["x"], "seed": 1, "n": 2, "logprobs": 3, "ignore_eos": True}
    (inst,) = _parse(schemas, {"instances": [{"prompt": "hi", **fields}]})
    assert inst.request == {"model": "", "prompt": "hi", **fields}


def test_a_chat_instance_is_the_chat_request(schemas: RequestSchemas) -> None:
    tools = [{"type": "function", "function": {"name": "f", "parameters": {}}}]
    chat = {"messages": USER, "tools": tools, "tool_choice": "auto", "max_tokens": 3}
    parsed = _parse(
        schemas,
        {
            "@requestFormat": "chatCompletions",
            "instances": [chat, {**chat, "model": "m"}],
            "parameters": {"temperature": 0.5, "raw_response": True},  # raw_response: text only
        },
    )
    first, second = parsed
    assert first.chat and first.route == CHAT_ROUTE
    assert first.request == {"model": "", "temperature": 0.5, **chat}
    assert second.request["model"] == "m"


def test_mixed_instances(schemas: RequestSchemas) -> None:
    body = {"instances": [{"prompt": "a"}, {"@requestFormat": "chatCompletions", "messages": USER}]}
    text, chat = _parse(schemas, body)
    assert (text.chat, chat.chat) == (False, True)


def test_dynamic_lora_names_the_model(schemas: RequestSchemas) -> None:
    (inst,) = _parse(schemas, {"instances": [{"prompt": "a", "dynamic-lora": "sql"}]})
    assert inst.request["model"] == "sql"


def test_multi_modal_data_goes_with_the_raw_prompt_to_the_tokens_in_endpoint(
    schemas: RequestSchemas,
) -> None:
    media = {"image": ["https://a/1.png", "data:image/png;base64,AA"], "audio": "https://a/x.wav"}
    prompt = "<|begin_of_text|><|image|>This is a picture of"
    instance = {"prompt": prompt, "multi_modal_data": media, "max_tokens": 5, "seed": 1}
    (inst,) = _parse(schemas, {"instances": [instance]})
    assert not inst.chat and inst.route == GENERATE_ROUTE and inst.prompt == prompt
    assert inst.request == {  # no chat template: the prompt is tokenized as written
        "model": None,
        "sampling_params": {"max_tokens": 5, "seed": 1},
        "content_parts": [
            {"type": "image_url", "url": "https://a/1.png"},
            {"type": "image_url", "url": "data:image/png;base64,AA"},
            {"type": "audio_url", "url": "https://a/x.wav"},
        ],
        "output_mode": "text",
    }


def test_fields_of_a_completion_only_are_refused_with_multi_modal_data(
    schemas: RequestSchemas,
) -> None:
    instance = {"prompt": "a", "multi_modal_data": {"image": "https://a/1.png"}, "echo": True}
    assert _error(schemas, {"instances": [instance]}) == (
        "instances[0].echo: not available with multi_modal_data"
    )


def test_streaming_and_its_format(schemas: RequestSchemas) -> None:
    parsed = _parse(schemas, {"instances": [{"prompt": "a", "stream": True}]})
    assert parsed[0].stream and parsed[0].stream_format == "sse"
    assert "stream" not in parsed[0].request
    body = {"instances": [{"prompt": "a"}], "parameters": {"stream": True, "stream_format": "nul"}}
    assert _parse(schemas, body)[0].stream_format == "nul"
    chat = {"@requestFormat": "chatCompletions", "messages": USER, "stream": True}
    assert _error(schemas, {"instances": [{**chat, "stream_format": "nul"}]}).startswith(
        "instances[0].stream_format: 'nul' is for text-generation instances only"
    )


# --- responses --------------------------------------------------------------------------


def _text(prompt: str = "p", raw: bool = True, route: str = COMPLETIONS_ROUTE) -> Instance:
    return Instance(False, route, {}, prompt, raw)


CHAT_INSTANCE = Instance(True, CHAT_ROUTE, {})


def _completion(*texts: str) -> dict:
    return {"choices": [{"index": i, "text": t} for i, t in enumerate(texts)]}


def test_framing_follows_google_unless_raw() -> None:
    assert format_text(_text("  hi \n", raw=False), "out") == "Prompt:\nhi\nOutput:\nout"
    assert format_text(_text("hi"), "out") == "out"


def test_predictions_keep_instance_order() -> None:
    insts = [_text(str(i)) for i in range(3)]
    assert predictions(insts, [_completion(f"t{i}") for i in range(3)]) == ["t0", "t1", "t2"]


def test_n_above_one_one_instance_gives_one_entry_per_sequence() -> None:
    assert predictions([_text()], [_completion("a", "b")]) == ["a", "b"]


def test_n_above_one_several_instances_give_a_list_each() -> None:
    answers = [_completion("a", "b"), _completion("c", "d")]
    assert predictions([_text(), _text()], answers) == [["a", "b"], ["c", "d"]]


def test_a_lone_chat_instance_is_the_object_several_a_list() -> None:
    completion = {"object": "chat.completion", "choices": []}
    assert predictions([CHAT_INSTANCE], [completion]) == completion
    assert predictions([CHAT_INSTANCE, _text()], [completion, _completion("x")]) == [
        completion,
        "x",
    ]


def test_a_text_instance_sent_as_chat_reads_the_message() -> None:
    answer = {"choices": [{"message": {"role": "assistant", "content": "cat"}}]}
    assert predictions([_text(route=CHAT_ROUTE)], [answer]) == ["cat"]


def test_stream_deltas() -> None:
    assert stream_delta(_text(), {"choices": [{"text": "ab"}]}) == "ab"
    assert stream_delta(_text(route=CHAT_ROUTE), {"choices": [{"delta": {"content": "c"}}]}) == "c"
    assert stream_delta(_text(), {"choices": [], "usage": {}}) == ""


def test_stream_events() -> None:
    assert text_event("é", "sse") == 'data: {"predictions":["é"]}\n\n'.encode()
    assert text_event("a", "nul") == b'{"predictions":["a"]}\0'
    assert done_event("sse") == b"data: [DONE]\n\n" and done_event("nul") == b""
    event = error_event(504, "late", "sse")
    assert orjson.loads(event.removeprefix(b"data: "))["error"]["code"] == 504


def test_dynamic_lora_needs_lora_and_a_valid_source(schemas: RequestSchemas) -> None:
    body = {"instances": [{"prompt": "a", "dynamic-lora": "gs://bkt/adapters/sql"}]}
    (inst,) = _parse(schemas, body)
    assert inst.request["model"] == "gs://bkt/adapters/sql"
    with pytest.raises(ApiError) as off:
        _parse(schemas, body, lora=None)
    assert off.value.message == (
        "instances[0].dynamic-lora: the engines run without LoRA; "
        "start vgate serve with --enable-lora"
    )
    bad = {"instances": [{"prompt": "a", "dynamic-lora": "../../etc"}]}
    assert _error(schemas, bad).startswith("instances[0].dynamic-lora: adapter '../../etc': give")


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("mm_processor_kwargs", {"num_crops": 64}),
        ("media_io_kwargs", {"video": {"num_frames": -1}}),
        ("kv_transfer_params", {"do_remote_prefill": True}),
        ("vllm_xargs", {"x": 1}),
        ("priority", 5),
        ("request_id", "mine"),
        ("return_prompt_text", True),
        ("chat_template", "{{ messages }}"),
        ("use_beam_search", True),
    ],
)
def test_operator_fields_are_refused_by_name(
    schemas: RequestSchemas, field: str, value: Any
) -> None:
    chat = {"@requestFormat": "chatCompletions", "messages": USER, field: value}
    assert _error(schemas, {"instances": [chat]}) == (
        f"instances[0].{field}: not a field a client may set (an operator's vLLM option)"
    )
    if field in schemas.properties("CompletionRequest"):
        text = {"instances": [{"prompt": "a"}], "parameters": {field: value}}
        assert _error(schemas, text) == (
            f"instances[0].{field} (from parameters): not a field a client may set "
            "(an operator's vLLM option)"
        )


def test_a_model_field_is_checked_as_dynamic_lora_is(schemas: RequestSchemas) -> None:
    bad = {"instances": [{"prompt": "a", "model": "../../etc"}]}
    assert _error(schemas, bad).startswith("instances[0].model: adapter '../../etc': give")
    (inst,) = _parse(schemas, {"instances": [{"prompt": "a", "model": "base"}]}, lora=None)
    assert inst.request["model"] == "base"  # no LoRA: nothing to fetch; vLLM checks the name


def test_adapter_sources_outside_the_allow_list_are_refused(schemas: RequestSchemas) -> None:
    policy = AdapterPolicy(("gs://team/adapters/", "my-org/", "/srv/adapters/"))
    for ok in ("gs://team/adapters/sql", "my-org/chat", "/srv/adapters/a", "loaded-name"):
        (inst,) = _parse(schemas, {"instances": [{"prompt": "a", "dynamic-lora": ok}]}, lora=policy)
        assert inst.request["model"] == ok
    for bad in ("gs://team/other/x", "other-org/x", "/tmp/x"):
        body = {"instances": [{"prompt": "a", "dynamic-lora": bad}]}
        assert "is not allowed here (--allowed-lora-sources)" in _error(schemas, body, lora=policy)
    # One spelling per adapter: vLLM and the cache know adapters by name.
    for alias, canonical in [
        ("/srv/adapters/../../etc", "/etc"),
        ("gs://team/adapters/sql/", "gs://team/adapters/sql"),
        ("gs://team//adapters/sql", "gs://team/adapters/sql"),
    ]:
        body = {"instances": [{"prompt": "a", "dynamic-lora": alias}]}
        assert _error(schemas, body, lora=policy).endswith(f"write it as {canonical!r}")
    # Google's rule by default: gs:// and Hugging Face ids, no local path.
    body = {"instances": [{"prompt": "a", "model": "/etc/adapters"}]}
    assert _error(schemas, body).endswith("is not allowed here (--allowed-lora-sources)")


@pytest.mark.parametrize("field", ["dynamic-lora", "model"])
def test_adapter_names_are_bounded_in_length_and_characters(
    schemas: RequestSchemas, field: str
) -> None:
    """vLLM keeps a lock per name it is asked for, forever: no unbounded names reach it."""
    policy = AdapterPolicy(("gs://bkt/", "my-org/", "/srv/"))
    for name in ("x" * 256, "gs://bkt/" + "a" * 247, "my-org/sql_v1.2", "/srv/a/b+c@d=e~f:g"):
        body = {"instances": [{"prompt": "a", field: name}]}
        (inst,) = _parse(schemas, body, lora=policy)
        assert inst.request["model"] == name
    for name in ("x" * 257, "gs://bkt/" + "a" * 248):
        body = {"instances": [{"prompt": "a", field: name}]}
        assert _error(schemas, body) == (
            f"instances[0].{field}: adapter {name[:32]!r}...: at most 256 characters"
        )
    for name in ("sql adapter", "sql\n", "ünï", "a;b", "a%2Fb"):
        body = {"instances": [{"prompt": "a", field: name}]}
        assert _error(schemas, body) == (
            f"instances[0].{field}: adapter {name!r}: only letters, digits and . _ - / : + = @ ~"
        )
