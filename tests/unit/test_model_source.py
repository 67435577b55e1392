"""Model references: local dir, Hugging Face id, demo, and the ones refused."""

import pytest

from engine.model_source import ModelSourceError, classify_model


def test_kinds(tmp_path) -> None:
    assert classify_model(None).kind == "demo"
    assert classify_model("").kind == "demo"
    assert classify_model(str(tmp_path)).kind == "local"
    assert classify_model("meta-llama/Llama-3.1-8B").kind == "hf"


@pytest.mark.parametrize(
    ("reference", "message"),
    [
        ("gs://bucket/model", "not supported by this release yet"),
        ("s3://bucket/model", "unknown scheme"),
        ("/no/such/dir", "no such model directory"),
    ],
)
def test_refused_with_a_reason(reference: str, message: str) -> None:
    with pytest.raises(ModelSourceError, match=message):
        classify_model(reference)
