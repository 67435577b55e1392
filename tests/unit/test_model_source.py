"""Model references: local dir, Hugging Face id, demo, and the ones refused."""

import pytest

from engine.model_source import ModelSourceError, classify_model, local_model


def test_kinds(tmp_path) -> None:
    assert classify_model(None).kind == "demo"
    assert classify_model("").kind == "demo"
    assert classify_model(str(tmp_path)).kind == "local"
    assert classify_model("meta-llama/Llama-3.1-8B").kind == "hf"
    assert classify_model("gs://bucket/models/llama").kind == "gcs"


def test_a_gcs_model_is_served_from_its_mirror(tmp_path) -> None:
    source = classify_model("gs://bucket/models/llama")
    assert local_model(source, tmp_path) == str(tmp_path / "bucket" / "models" / "llama")


@pytest.mark.parametrize(
    ("reference", "message"),
    [
        ("s3://bucket/model", "unknown scheme"),
        ("/no/such/dir", "no such model directory"),
    ],
)
def test_refused_with_a_reason(reference: str, message: str) -> None:
    with pytest.raises(ModelSourceError, match=message):
        classify_model(reference)
