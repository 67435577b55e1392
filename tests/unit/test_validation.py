"""Engine requests checked against vLLM's own schema, plus the ranges vLLM checks in code."""

import pytest

from gateway.predict.validation import CHAT, COMPLETION, RequestSchemas, path_text

USER = [{"role": "user", "content": "hi"}]


@pytest.mark.parametrize(
    ("kind", "request_", "problem"),
    [
        (
            COMPLETION,
            {"prompt": "a", "max_tokens": 0},
            ("max_tokens", "must be a positive integer"),
        ),
        (
            COMPLETION,
            {"prompt": "a", "max_tokens": "9"},
            ("max_tokens", "must be a positive integer"),
        ),
        (
            COMPLETION,
            {"prompt": "a", "max_tokens": True},
            ("max_tokens", "must be a positive integer"),
        ),
        (
            COMPLETION,
            {"prompt": "a", "temperature": -0.1},
            ("temperature", "must be a number >= 0"),
        ),
        (COMPLETION, {"prompt": "a", "top_p": 0}, ("top_p", "must be a number in (0, 1]")),
        (COMPLETION, {"prompt": "a", "n": 0}, ("n", "must be a positive integer")),
        (COMPLETION, {"prompt": "a", "foo": 1}, ("foo", "unknown field")),
        (
            COMPLETION,
            {"prompt": "a", "maxtokens": 1},
            ("maxtokens", "unknown field (did you mean 'max_tokens'?)"),
        ),
        (COMPLETION, {"prompt": "a", "stop": [1]}, ("stop[0]", "must be string")),
        (COMPLETION, {"prompt": "a", "stop": 5}, ("stop", "must be string or array or null")),
        (COMPLETION, {"prompt": "a", "ignore_eos": "yes"}, ("ignore_eos", "must be boolean")),
        (COMPLETION, {"prompt": "a", "logit_bias": {"1": "x"}}, ("logit_bias.1", "must be number")),
        (CHAT, {"messages": "x"}, ("messages", "must be array")),
        (CHAT, {"messages": [5]}, ("messages[0]", "must be object")),
        (
            CHAT,
            {"messages": [{"role": "user", "content": 5}]},
            ("messages[0].content", "must be string or array"),
        ),
        (CHAT, {"messages": USER, "logprobs": 3}, ("logprobs", "must be boolean or null")),
        (CHAT, {"messages": USER, "tools": "x"}, ("tools", "must be array or null")),
        (
            CHAT,
            {"messages": USER, "tools": [{"type": "function"}]},
            ("tools[0]", "'function' is a required property"),
        ),
    ],
)
def test_problems_name_the_field_and_what_is_wrong(
    schemas: RequestSchemas, kind: str, request_: dict, problem: tuple[str, str]
) -> None:
    assert schemas.problem(kind, request_) == problem


def test_out_of_range_values_vllm_declares_are_refused(schemas: RequestSchemas) -> None:
    path, message = schemas.problem(COMPLETION, {"prompt": "a", "seed": 2**70})
    assert path == "seed" and "maximum" in message


@pytest.mark.parametrize(
    ("kind", "request_"),
    [
        (
            COMPLETION,
            {
                "model": "",
                "prompt": "a",
                "max_tokens": 4,
                "stop": ["x"],
                "seed": 1,
                "logprobs": 2,
                "ignore_eos": True,
                "top_k": -1,
                "min_p": 0.1,
                "repetition_penalty": 1.1,
                "presence_penalty": None,
            },
        ),
        (
            CHAT,
            {
                "model": "",
                "messages": [
                    {"role": "system", "content": "be brief"},
                    {
                        "role": "user",
                        "content": [
                            {"type": "text", "text": "what is this?"},
                            {
                                "type": "image_url",
                                "image_url": {"url": "https://example.com/a.png"},
                            },
                        ],
                    },
                ],
                "max_tokens": 5,
                "logprobs": True,
                "top_logprobs": 2,
                "response_format": {"type": "json_object"},
                "tool_choice": "auto",
                "tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}],
            },
        ),
    ],
)
def test_valid_requests_pass(schemas: RequestSchemas, kind: str, request_: dict) -> None:
    assert schemas.problem(kind, request_) is None


def test_messages_never_echo_a_large_value_whole(schemas: RequestSchemas) -> None:
    _, message = schemas.problem(COMPLETION, {"prompt": "a", "stop": ["x" * 1000] * 9})
    assert len(message) < 250


def test_path_text() -> None:
    assert path_text(["messages", 0, "content"]) == "messages[0].content"
    assert path_text([]) == ""
