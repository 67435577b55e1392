"""/v1/models as callers see it: no adapter a client named, no local path."""

from gateway.models import public_models

ENGINE_ANSWER = {
    "object": "list",
    "data": [
        {"id": "gs://models/llama", "object": "model", "root": "/tmp/vgate-models/models/llama"},
        {
            "id": "sql",
            "object": "model",
            "root": "/srv/adapters/sql",
            "parent": "gs://models/llama",
        },
        {
            "id": "gs://tenant-bucket/secret-lora",
            "object": "model",
            "root": "/tmp/vgate-lora/adapters/0ef8",
            "parent": "gs://models/llama",
        },
    ],
}


def test_the_operators_models_and_adapters_without_their_paths() -> None:
    answer = public_models([ENGINE_ANSWER], frozenset({"sql"}))
    assert answer["object"] == "list"
    assert [(m["id"], m["root"]) for m in answer["data"]] == [
        ("gs://models/llama", "gs://models/llama"),
        ("sql", "sql"),
    ]
    assert answer["data"][1]["parent"] == "gs://models/llama"


def test_every_engines_list_as_one_in_the_served_order_and_stamped_once() -> None:
    beta = {"object": "list", "data": [{"id": "beta", "object": "model", "created": 7}]}
    alpha = {
        "object": "list",
        "data": [
            {"id": "alpha", "object": "model", "created": 9},
            {"id": "tuned", "object": "model", "parent": "alpha", "created": 9},
        ],
    }
    first = public_models([beta, alpha, alpha], frozenset(), ["alpha", "beta"], created=5)
    again = public_models([alpha, beta], frozenset(), ["alpha", "beta"], created=5)
    assert first == again
    assert [(m["id"], m["created"]) for m in first["data"]] == [
        ("alpha", 5),
        ("beta", 5),
        ("tuned", 5),
    ]
