"""Malformed and hostile predict bodies: never a 5xx, never a hang, the server stays healthy."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.e2e.conftest import Stack
from tests.helpers import descendants, http_json

pytestmark = pytest.mark.e2e

EXAMPLES = 300
# Fields that set how much work a request is: kept small, so that a legitimate
# but huge generation (which would rightly meet the deadline) is not what is tested.
WORK = {"max_tokens": 4, "max_completion_tokens": 4, "n": 2, "min_tokens": 0}

scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.integers(-2, 30)
    | st.floats(allow_nan=False)
    | st.floats(-1, 2)
    | st.text(max_size=40)
    | st.sampled_from(["", "\x00", "\ud7ff\uffff", "{{ 7*7 }}", "../../etc/passwd", "gs://x/y"])
)
# Valid sampling fields, small.
SAMPLING = {
    "max_tokens": st.integers(1, 4),
    "temperature": st.floats(0, 2),
    "top_p": st.floats(0.01, 1),
    "seed": st.integers(0, 2**31),
    "stop": st.lists(st.text(min_size=1, max_size=3), max_size=2),
}
json_values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4)
    ),
    max_leaves=12,
)


def _fields(names: list[str]) -> st.SearchStrategy[dict[str, Any]]:
    control = ["raw_response", "stream", "stream_format", "dynamic-lora", "multi_modal_data"]
    keys = st.sampled_from(names + control) | st.text(max_size=12)
    return st.dictionaries(keys, json_values, max_size=5)


def _bodies(completion: list[str], chat: list[str]) -> st.SearchStrategy[Any]:
    text = st.builds(lambda f, p: {**f, "prompt": p}, _fields(completion), json_values)
    messages = st.lists(
        st.fixed_dictionaries(
            {"role": st.sampled_from(["user", "system", "assistant", "tool", "x"])},
            optional={"content": json_values},
        ),
        max_size=3,
    )
    chat_instance = st.builds(
        lambda f, m: {**f, "@requestFormat": "chatCompletions", "messages": m},
        _fields(chat),
        messages | json_values,
    )
    plausible = st.fixed_dictionaries(
        {"prompt": st.text(max_size=30)},
        optional={
            **SAMPLING,
            "raw_response": st.booleans(),
            "stream": st.booleans(),
            "@requestFormat": st.just("chatCompletions"),
            "messages": messages,
        },
    )
    instance = plausible | text | chat_instance | json_values
    structured = st.fixed_dictionaries(
        {"instances": st.lists(instance, min_size=1, max_size=3) | json_values},
        optional={
            "parameters": _fields(completion) | json_values,
            "@requestFormat": st.sampled_from(["chatCompletions", "x"]) | json_values,
        },
    )
    return structured | json_values


def _valid() -> st.SearchStrategy[dict[str, Any]]:
    """Bodies that must succeed: a third of the draws, so the 200 path is surely tested."""
    text = st.fixed_dictionaries(
        {"prompt": st.text(min_size=1, max_size=30)},
        optional={**SAMPLING, "raw_response": st.booleans()},
    )
    chat = st.fixed_dictionaries(
        {
            "@requestFormat": st.just("chatCompletions"),
            "messages": st.lists(
                st.fixed_dictionaries(
                    {"role": st.just("user"), "content": st.text(min_size=1, max_size=30)}
                ),
                min_size=1,
                max_size=2,
            ),
            "max_tokens": SAMPLING["max_tokens"],
        },
        optional={k: v for k, v in SAMPLING.items() if k != "max_tokens"},
    )
    return st.fixed_dictionaries({"instances": st.lists(text | chat, min_size=1, max_size=3)})


def _bounded(body: Any) -> bytes:
    instances = body.get("instances") if isinstance(body, dict) else None
    for instance in instances if isinstance(instances, list) else []:
        if isinstance(instance, dict):
            instance.update({k: v for k, v in WORK.items() if k in instance})
    return json.dumps(body).encode()  # any size of integer, unlike orjson


def test_hostile_bodies_never_get_a_5xx(stack: Stack) -> None:
    status, _, document = http_json(stack.workers()[0].url + "/openapi.json")
    assert status == 200
    schemas = document["components"]["schemas"]
    completion = sorted(schemas["CompletionRequest"]["properties"])
    chat = sorted(schemas["ChatCompletionRequest"]["properties"])
    gateways = {p.pid for p in descendants(stack.proc.pid) if "gateway.worker" in p.cmdline()}
    answers: dict[int, int] = {}

    def check(data: bytes) -> None:
        status, _, answer = http_json(stack.base + "/predict", data=data, timeout=60)
        answers[status] = answers.get(status, 0) + 1
        assert status != 0, "no answer within 60 s"
        assert status < 500, (status, answer, data[:300])

    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(
        st.one_of(
            _valid().map(_bounded),
            _bodies(completion, chat).map(_bounded),
            st.binary(max_size=200),
        )
    )
    def run(data: bytes) -> None:
        check(data)

    run()
    check(b"[" * 5000 + b"]" * 5000)  # nesting deeper than any parser's stack
    # Both paths were taken, many times (about a third of the draws are valid).
    assert answers.get(200, 0) >= EXAMPLES / 10 and answers.get(400, 0) >= EXAMPLES / 10, answers
    status, answer = stack.request("/predict", {"instances": [{"prompt": "ok", "max_tokens": 2}]})
    assert status == 200, answer
    assert stack.request("/health")[0] == 200
    now = {p.pid for p in descendants(stack.proc.pid) if "gateway.worker" in p.cmdline()}
    assert now == gateways, "a gateway worker died and was restarted"
