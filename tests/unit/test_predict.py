"""Predict translation and validation: pure functions, no server."""

import pytest

from gateway.errors import ApiError
from gateway.predict.protocol import TextInstance, parse_body, parse_instances
from gateway.predict.serving import completion_request, format_text, predictions


def _error(body: bytes) -> str:
    with pytest.raises(ApiError) as info:
        parse_instances(parse_body(body))
    assert info.value.status == 400
    return info.value.message


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"{", "not valid JSON"),
        (b"[1]", "must be a JSON object"),
        (b"{}", "instances: required"),
        (b'{"instances": {"prompt": "a"}}', "instances: must be a list"),
        (b'{"instances": []}', "instances: must not be empty"),
        (b'{"instances": ["a"]}', "instances[0]: must be an object"),
        (b'{"instances": [{"prompt": "a"}, {}]}', "instances[1].prompt: required"),
        (b'{"instances": [{"prompt": 3}]}', "instances[0].prompt: must be a string"),
        (b'{"instances": [{"prompt": "a", "raw_response": 1}]}', "instances[0].raw_response"),
        (b'{"instances": [{"prompt": "a"}], "parameters": []}', "parameters: must be an object"),
    ],
)
def test_bad_requests_name_what_is_wrong(body: bytes, message: str) -> None:
    assert message in _error(body)


def test_parameters_are_defaults_and_instance_fields_win() -> None:
    (a, b) = parse_instances(
        parse_body(
            b'{"instances": [{"prompt": "x", "max_tokens": 3}, {"prompt": "y"}],'
            b' "parameters": {"max_tokens": 9, "temperature": 0, "raw_response": true}}'
        )
    )
    assert a == TextInstance("x", True, {"max_tokens": 3, "temperature": 0})
    assert b == TextInstance("y", True, {"max_tokens": 9, "temperature": 0})


def test_sampling_fields_reach_the_engine_request_unchanged() -> None:
    inst = TextInstance("hi", False, {"max_tokens": 4, "stop": ["x"], "seed": 1, "n": 2})
    assert completion_request(inst) == {
        "model": "",
        "prompt": "hi",
        "max_tokens": 4,
        "stop": ["x"],
        "seed": 1,
        "n": 2,
    }


def test_framing_follows_google_unless_raw() -> None:
    assert format_text(TextInstance("  hi \n"), "out") == "Prompt:\nhi\nOutput:\nout"
    assert format_text(TextInstance("hi", raw_response=True), "out") == "out"


def _completion(*texts: str) -> dict:
    return {"choices": [{"index": i, "text": t} for i, t in enumerate(texts)]}


def test_predictions_keep_instance_order() -> None:
    insts = [TextInstance(str(i), raw_response=True) for i in range(3)]
    assert predictions(insts, [_completion(f"t{i}") for i in range(3)]) == ["t0", "t1", "t2"]


def test_n_above_one_one_instance_gives_one_entry_per_sequence() -> None:
    insts = [TextInstance("p", raw_response=True)]
    assert predictions(insts, [_completion("a", "b")]) == ["a", "b"]


def test_n_above_one_several_instances_give_a_list_each() -> None:
    insts = [TextInstance("p", raw_response=True)] * 2
    assert predictions(insts, [_completion("a", "b"), _completion("c", "d")]) == [
        ["a", "b"],
        ["c", "d"],
    ]
