"""gs:// media in predict instances, read from a real Cloud Storage API (the emulator)."""

from __future__ import annotations

import asyncio
import base64
import os
import socket
from collections.abc import Iterator

import pytest

from gateway.errors import ApiError
from gateway.predict import media
from gateway.predict.media import MediaReader
from gateway.predict.protocol import CHAT_ROUTE, Instance
from tests.gcs_emulator import client, emulator

PNG = base64.b64decode(
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8BQDwAEhQGAhKmMIQAAAABJRU5ErkJggg=="
)


@pytest.fixture(scope="module")
def image_uri() -> Iterator[str]:
    with emulator() as url:
        bucket = client(url).create_bucket("media")
        bucket.blob("cats/cat.png").upload_from_string(PNG, content_type="image/png")
        yield "gs://media/cats/cat.png"


ALLOWED = frozenset({"media"})


def _instance(*urls: str) -> Instance:
    parts = [{"type": "image_url", "image_url": {"url": u}} for u in urls]
    content = [*parts, {"type": "text", "text": "what is this?"}]
    return Instance(True, CHAT_ROUTE, {"messages": [{"role": "user", "content": content}]})


def _urls(instance: Instance) -> list[str]:
    content = instance.request["messages"][0]["content"]
    return [p["image_url"]["url"] for p in content if p["type"] == "image_url"]


def test_gs_media_goes_inline_and_other_urls_stay(image_uri: str) -> None:
    original = _instance(image_uri, "https://example.com/dog.png")
    (done,) = asyncio.run(MediaReader(ALLOWED).inline([original]))
    inline, kept = _urls(done)
    assert inline == "data:image/png;base64," + base64.b64encode(PNG).decode()
    assert kept == "https://example.com/dog.png"
    assert _urls(original)[0] == image_uri  # the parsed request is not changed in place


def test_a_missing_object_is_a_400_that_names_it(image_uri: str) -> None:
    missing = image_uri.replace("cat.png", "nope.png")
    with pytest.raises(ApiError) as info:
        asyncio.run(MediaReader(ALLOWED).inline([_instance("https://x/y.png"), _instance(missing)]))
    assert info.value.status == 400
    assert info.value.message == f"instances[1]: {missing}: no such object"


def test_instances_without_gs_media_are_untouched() -> None:
    plain = Instance(False, "/v1/completions", {"prompt": "hi"})
    assert asyncio.run(MediaReader().inline([plain])) == [plain]


def test_media_over_the_limit_in_all_is_a_400(image_uri: str, monkeypatch) -> None:
    copy = image_uri.replace("cat.png", "copy.png")
    client_ = client(os.environ["STORAGE_EMULATOR_HOST"])
    client_.bucket("media").blob("cats/copy.png").upload_from_string(PNG, content_type="image/png")
    monkeypatch.setattr(media, "MAX_MEDIA_BYTES", 2 * len(PNG) - 1)
    with pytest.raises(ApiError) as info:  # each fits; both do not
        asyncio.run(MediaReader(ALLOWED).inline([_instance(image_uri), _instance(copy)]))
    assert info.value.status == 400
    assert info.value.message == (
        f"instances[1]: {copy}: media of a request are at most {2 * len(PNG) - 1} bytes in all"
    )
    monkeypatch.setattr(media, "MAX_MEDIA_BYTES", 2 * len(PNG))  # exactly at the limit: fine
    done = asyncio.run(MediaReader(ALLOWED).inline([_instance(image_uri), _instance(copy)]))
    assert all(_urls(d)[0].startswith("data:image/png;base64,") for d in done)


def test_one_object_named_many_times_is_read_once_and_counted_per_use(
    image_uri: str, monkeypatch
) -> None:
    reads = []
    monkeypatch.setattr(media, "MAX_MEDIA_BYTES", 6 * len(PNG))  # 3 instances x 2 parts
    real = MediaReader._data_url

    async def counted(self: MediaReader, where: str, uri: str, allowance: int) -> object:
        reads.append(uri)
        return await real(self, where, uri, allowance)

    monkeypatch.setattr(MediaReader, "_data_url", counted)
    done = asyncio.run(MediaReader(ALLOWED).inline([_instance(image_uri, image_uri)] * 3))
    assert {url for d in done for url in _urls(d)} == {
        "data:image/png;base64," + base64.b64encode(PNG).decode()
    }
    assert reads == [image_uri]


def test_one_object_in_every_instance_counts_once_per_instance(image_uri: str, monkeypatch) -> None:
    """`parameters.messages` (or multi_modal_data) is copied into each of 64 instances, and
    each engine body carries the object inlined: 64 copies count against the limit."""
    limit = 64 * len(PNG) - 1  # one copy is far below it, 64 are one byte over
    monkeypatch.setattr(media, "MAX_MEDIA_BYTES", limit)
    with pytest.raises(ApiError) as info:
        asyncio.run(MediaReader(ALLOWED).inline([_instance(image_uri)] * 64))
    assert info.value.status == 400
    assert info.value.message == (
        f"instances[0]: {image_uri}: media of a request are at most {limit} bytes in all "
        "(it is used 64 times, and each use counts)"
    )
    monkeypatch.setattr(media, "MAX_MEDIA_BYTES", 64 * len(PNG))
    done = asyncio.run(MediaReader(ALLOWED).inline([_instance(image_uri)] * 64))
    assert len(done) == 64


def test_inline_data_urls_copied_into_instances_count_too(monkeypatch) -> None:
    url = "data:image/png;base64," + base64.b64encode(PNG).decode()
    monkeypatch.setattr(media, "MAX_MEDIA_BYTES", 64 * len(PNG) - 1)
    with pytest.raises(ApiError) as info:
        asyncio.run(MediaReader().inline([_instance(url)] * 64))
    assert info.value.status == 400
    assert info.value.message == (
        f"instances[63]: a data: URL: media of a request are at most {64 * len(PNG) - 1} "
        "bytes in all"
    )
    monkeypatch.setattr(media, "MAX_MEDIA_BYTES", 64 * len(PNG))
    assert len(asyncio.run(MediaReader().inline([_instance(url)] * 64))) == 64


def test_only_allowed_buckets_and_a_bounded_count(image_uri: str, monkeypatch) -> None:
    with pytest.raises(ApiError) as info:
        asyncio.run(MediaReader().inline([_instance(image_uri)]))  # none allowed by default
    assert info.value.message == (
        f"instances[0]: {image_uri}: bucket 'media' is not allowed for media "
        "(--allowed-media-buckets)"
    )
    monkeypatch.setattr(media, "MAX_MEDIA_ITEMS", 2)
    many = [_instance(f"gs://media/cats/{i}.png") for i in range(3)]
    with pytest.raises(ApiError) as info:
        asyncio.run(MediaReader(ALLOWED).inline(many))
    assert info.value.message == "instances: 3 gs:// media objects; at most 2 per request"


def test_unusable_cloud_storage_is_the_services_error_not_a_500(monkeypatch) -> None:
    """Review L13: credentials without a project, or a storage that does not answer,
    were exceptions no handler expected (a 500 for every gs:// media request)."""

    def no_project() -> None:
        raise OSError("Project was not passed and could not be determined from the environment")

    monkeypatch.setattr(media, "make_client", no_project)
    with pytest.raises(ApiError) as refused:
        asyncio.run(MediaReader(ALLOWED).inline([_instance("gs://media/a.png")]))
    assert refused.value.status == 503 and "could not be determined" in str(refused.value)

    monkeypatch.undo()
    monkeypatch.setattr(media, "MEDIA_FETCH_S", 2.0)  # the retries' bound, made short
    with socket.socket() as s:  # a port nothing listens on: the network fails
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", dead)
    with pytest.raises(ApiError) as failed:
        asyncio.run(MediaReader(ALLOWED).inline([_instance("gs://media/a.png")]))
    assert failed.value.status == 502 and "Cloud Storage error" in str(failed.value)
