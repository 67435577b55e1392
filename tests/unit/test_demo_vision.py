"""The demo vision model: byte-identical builds, read as BLIP-2 by transformers' own loaders."""

from pathlib import Path

from engine.demo_vision import IMAGE_TOKEN_ID, NUM_QUERY_TOKENS, write_demo_vision_model


def test_two_builds_are_byte_identical(tmp_path: Path) -> None:
    a, b = write_demo_vision_model(tmp_path / "a"), write_demo_vision_model(tmp_path / "b")
    names = sorted(p.name for p in a.iterdir())
    assert names == sorted(p.name for p in b.iterdir())
    assert all((a / n).read_bytes() == (b / n).read_bytes() for n in names)


def test_transformers_reads_it_as_blip2_with_its_image_tokens(tmp_path: Path) -> None:
    from PIL import Image
    from transformers import AutoConfig, AutoProcessor

    model = write_demo_vision_model(tmp_path / "m")
    config = AutoConfig.from_pretrained(model)
    assert config.model_type == "blip-2" and config.num_query_tokens == NUM_QUERY_TOKENS
    processor = AutoProcessor.from_pretrained(model)
    out = processor(images=Image.new("RGB", (32, 32)), text="a picture of", return_tensors="pt")
    ids = out["input_ids"][0].tolist()
    assert ids[:NUM_QUERY_TOKENS] == [IMAGE_TOKEN_ID] * NUM_QUERY_TOKENS
    assert tuple(out["pixel_values"].shape[-2:]) == (32, 32)
