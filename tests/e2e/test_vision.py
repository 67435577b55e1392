"""Images on the real stack, with a real vision-language model (the tiny demo BLIP-2).

A raw text instance with `multi_modal_data` must reach the engine as Google's container sends
it: the prompt exactly as written plus the image, no chat template around it. The engine's own
prompt-token counter shows what it got: the raw prompt's tokens plus the image's.
"""

from __future__ import annotations

import base64
import io
import os
from collections.abc import Iterator

import orjson
import pytest

from engine.demo_vision import NUM_QUERY_TOKENS, ensure_demo_vision_model
from tests.e2e.conftest import Stack, one_replica_stack
from tests.gcs_emulator import client
from tests.helpers import counting_http_server

pytestmark = pytest.mark.e2e

PROMPT = "This is a picture of"
IMAGE_URI = "gs://vertex-models/media/square.png"
LARGE_URI = "gs://vertex-models/media/large.png"  # megabytes: more than a request body may be


def _png(side: int = 32) -> bytes:
    """A PNG; a large side gives noise that does not compress (about 3 bytes a pixel)."""
    from PIL import Image

    out = io.BytesIO()
    if side == 32:
        Image.new("RGB", (32, 32), (200, 40, 40)).save(out, format="PNG")
    else:
        Image.frombytes("RGB", (side, side), os.urandom(side * side * 3)).save(out, format="PNG")
    return out.getvalue()


DATA_URL = "data:image/png;base64," + base64.b64encode(_png()).decode()


@pytest.fixture(scope="module")
def vision(storage: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """`vgate serve` of the demo vision model, one replica; gs:// media from the emulator."""
    bucket = client(storage).lookup_bucket("vertex-models")
    bucket.blob(IMAGE_URI.split("/", 3)[3]).upload_from_string(_png(), content_type="image/png")
    large = _png(1000)
    assert len(large) > 2_000_000  # beyond the 1.5 MB request body limit, inlined as base64
    bucket.blob(LARGE_URI.split("/", 3)[3]).upload_from_string(large, content_type="image/png")
    args = [
        str(ensure_demo_vision_model()), "--gateway-workers", "1", "--max-model-len", "512",
        "--allowed-media-buckets", IMAGE_URI.removeprefix("gs://").split("/", 1)[0],
    ]  # fmt: skip
    work = tmp_path_factory.mktemp("vision")
    with one_replica_stack(work, args, {"STORAGE_EMULATOR_HOST": storage}) as stack:
        yield stack


def _prompt_tokens(stack: Stack, body: dict) -> tuple[int, object]:
    """(prompt tokens the engine took for the request, its answer)."""
    before = stack.total("vllm:prompt_tokens_total")
    status, answer = stack.request("/predict", body)
    assert status == 200, answer
    return int(stack.total("vllm:prompt_tokens_total") - before), answer


@pytest.mark.parametrize("image", [DATA_URL, IMAGE_URI, LARGE_URI])
def test_a_raw_prompt_reaches_the_engine_as_written_plus_the_image(
    vision: Stack, image: str
) -> None:
    status, tokens = vision.request("/tokenize", {"prompt": PROMPT})
    assert status == 200
    instance = {"prompt": PROMPT, "multi_modal_data": {"image": image}, "max_tokens": 3}
    took, answer = _prompt_tokens(vision, {"instances": [instance]})
    assert took == tokens["count"] + NUM_QUERY_TOKENS  # no template, nothing but the image
    assert answer["predictions"][0].startswith(f"Prompt:\n{PROMPT}\nOutput:\n")


def test_chat_image_parts_reach_the_engine(vision: Stack) -> None:
    def chat(*parts: dict) -> dict:
        content = [*parts, {"type": "text", "text": "What is this?"}]
        message = {"role": "user", "content": content}
        return {"@requestFormat": "chatCompletions", "messages": [message], "max_tokens": 2}

    _, plain = _prompt_tokens(vision, {"instances": [chat()]})
    for url in (DATA_URL, IMAGE_URI):
        part = {"type": "image_url", "image_url": {"url": url}}
        _, with_image = _prompt_tokens(vision, {"instances": [chat(part)]})
        prompt_tokens = with_image["predictions"]["usage"]["prompt_tokens"]
        assert prompt_tokens == plain["predictions"]["usage"]["prompt_tokens"] + NUM_QUERY_TOKENS


def test_a_raw_prompt_with_an_image_streams(vision: Stack) -> None:
    instance = {
        "prompt": PROMPT,
        "multi_modal_data": {"image": DATA_URL},
        "max_tokens": 8,
        "ignore_eos": True,
        "stream": True,
    }
    resp = vision.send("/predict", {"instances": [instance]}).getresponse()
    assert resp.status == 200 and resp.getheader("Content-Type", "").startswith("text/event")
    events = [e for e in resp.read().split(b"\n\n") if e]
    assert events[-1] == b"data: [DONE]"
    deltas = [orjson.loads(e.removeprefix(b"data: "))["predictions"][0] for e in events[:-1]]
    assert deltas[0] == f"Prompt:\n{PROMPT}\nOutput:\n" and len(deltas) > 2


def test_more_images_than_the_model_takes_is_a_clear_400(vision: Stack) -> None:
    instance = {"prompt": PROMPT, "multi_modal_data": {"image": [DATA_URL, DATA_URL]}}
    status, answer = vision.request("/predict", {"instances": [instance]})
    assert status == 400, answer
    assert answer["error"]["message"].startswith("instances[0]: At most 1 image(s)")


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost"])
def test_media_urls_never_reach_internal_addresses_on_either_surface(
    vision: Stack, host: str
) -> None:
    # A stand-in for any internal service: the metadata server, the engines' own ports.
    with counting_http_server() as (port, hits):
        _refused_everywhere(vision, f"http://{host}:{port}/image.png")
        assert hits() == 0


def _refused_everywhere(vision: Stack, url: str) -> None:
    part = {"type": "image_url", "image_url": {"url": url}}
    message = {"role": "user", "content": [part, {"type": "text", "text": "What is this?"}]}
    openai = {"model": "", "messages": [message], "max_tokens": 2}
    chat = {"@requestFormat": "chatCompletions", "messages": [message], "max_tokens": 2}
    raw = {"prompt": PROMPT, "multi_modal_data": {"image": url}, "max_tokens": 2}
    for path, body in [
        ("/v1/chat/completions", openai),
        ("/predict", {"instances": [chat]}),
        ("/predict", {"instances": [raw]}),
    ]:
        status, answer = vision.request(path, body)
        assert status == 400, (path, answer)
        assert "is a loopback address" in answer["error"]["message"], answer
