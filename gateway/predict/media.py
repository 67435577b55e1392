"""gs:// images, audio and video in predict instances, sent to the engine inline.

vLLM fetches http(s) and data: URLs itself but knows nothing of Cloud
Storage; the gateway reads such objects with the same credentials as the model
download and hands them over as data: URLs. It does so only from the buckets
the operator allows (--allowed-media-buckets; none by default: the container's
service account is not every caller's), at most MAX_MEDIA_ITEMS objects and
MAX_MEDIA_BYTES in all per request, each distinct object read once but counted
once per use: every engine body carries its own copy.
"""

from __future__ import annotations

import asyncio
import base64
import copy
import dataclasses
import mimetypes
from typing import Any

from google.api_core import exceptions as gexc
from google.auth.exceptions import GoogleAuthError
from google.cloud import storage
from google.cloud.storage.retry import DEFAULT_RETRY
from requests import RequestException

from engine.gcs import DownloadError, is_gcs, make_client, split_uri
from gateway.errors import ApiError
from gateway.predict.protocol import MEDIA_PARTS, Instance

MAX_MEDIA_BYTES = 20 * 1024 * 1024  # in all, per request
MAX_MEDIA_ITEMS = 16  # distinct gs:// objects per request
# How long one object may take, retries included: the storage client's default retries
# for 120 s, which a dead storage would cost every media request.
MEDIA_FETCH_S = 30.0


class MediaReader:
    """Reads gs:// media for the engine; one storage client per gateway worker."""

    def __init__(self, allowed_buckets: frozenset[str] = frozenset()) -> None:
        self._client: storage.Client | None = None
        self._allowed = allowed_buckets

    async def inline(self, instances: list[Instance]) -> list[Instance]:
        """The instances with every gs:// media URL replaced by a data: URL.

        The limit holds for what the engines receive: each instance's body carries its
        own copy (`parameters` copies media into every instance), so an object read
        once counts once per use, and so do data: URLs already inline.
        """
        wanted: dict[str, str] = {}  # uri -> where it is first named
        uses: dict[str, int] = {}
        budget = MAX_MEDIA_BYTES
        for i, inst in enumerate(instances):
            for ref in _media_refs(inst.request):
                url = ref.get("url")
                if is_gcs(url):
                    wanted.setdefault(url, f"instances[{i}]")
                    uses[url] = uses.get(url, 0) + 1
                elif isinstance(url, str) and url.startswith("data:"):
                    budget -= _data_bytes(url)
                    if budget < 0:
                        raise ApiError(400, f"instances[{i}]: a data: URL: {_limit()}")
        if not wanted:
            return instances
        if len(wanted) > MAX_MEDIA_ITEMS:
            raise ApiError(
                400,
                f"instances: {len(wanted)} gs:// media objects; at most {MAX_MEDIA_ITEMS} "
                "per request",
            )
        for uri, where in wanted.items():
            self._check(where, uri)
        data: dict[str, str] = {}
        for uri, where in wanted.items():
            # Read once, at most what its uses leave room for (plus one byte, to tell).
            data[uri], size = await self._data_url(where, uri, budget // uses[uri])
            if size * uses[uri] > budget:
                many = f" (it is used {uses[uri]} times, and each use counts)"
                raise ApiError(400, f"{where}: {uri}: {_limit()}{many * (uses[uri] > 1)}")
            budget -= size * uses[uri]
        return [self._inlined(inst, data) for inst in instances]

    @staticmethod
    def _inlined(instance: Instance, data: dict[str, str]) -> Instance:
        if not any(ref.get("url") in data for ref in _media_refs(instance.request)):
            return instance
        request = copy.deepcopy(instance.request)  # the instance's own stays as it was
        for ref in _media_refs(request):
            if ref.get("url") in data:
                ref["url"] = data[ref["url"]]
        return dataclasses.replace(instance, request=request)

    def _check(self, where: str, uri: str) -> None:
        try:
            bucket, _ = split_uri(uri)
        except DownloadError as e:
            raise ApiError(400, f"{where}: {e}") from None
        if bucket not in self._allowed:
            raise ApiError(
                400,
                f"{where}: {uri}: bucket {bucket!r} is not allowed for media "
                "(--allowed-media-buckets)",
            )

    async def _data_url(self, where: str, uri: str, budget: int) -> tuple[str, int]:
        """The object as a data: URL, and its size; of more than `budget` bytes, only
        the first `budget` + 1 are read (the caller refuses it)."""
        bucket, name = split_uri(uri)
        if self._client is None:
            try:
                self._client = await asyncio.to_thread(make_client)
            except (OSError, GoogleAuthError) as e:  # no project, unusable credentials
                raise ApiError(
                    503, f"{where}: {uri}: Cloud Storage is not usable here: {e}"
                ) from None
        try:
            blob = self._client.bucket(bucket).blob(name)
            # One request: at most one byte past the limit, which tells a larger object.
            # (A range has no whole-object checksum to check; the transport is TLS.)
            data = await asyncio.to_thread(
                blob.download_as_bytes,
                end=budget,
                checksum=None,
                timeout=MEDIA_FETCH_S,
                retry=DEFAULT_RETRY.with_timeout(MEDIA_FETCH_S),
            )
        except gexc.NotFound:
            raise ApiError(400, f"{where}: {uri}: no such object") from None
        except (gexc.Forbidden, gexc.Unauthorized):
            raise ApiError(400, f"{where}: {uri}: no permission to read it") from None
        except (gexc.GoogleAPIError, GoogleAuthError, RequestException, OSError) as e:
            # The service, the credentials' refresh or the network failed: not the client.
            raise ApiError(502, f"{where}: {uri}: Cloud Storage error: {e}") from None
        kind = blob.content_type  # from the download's headers
        if kind in (None, "", "application/octet-stream"):  # not set on upload: by the name
            kind = mimetypes.guess_type(name)[0] or "application/octet-stream"
        return f"data:{kind};base64,{base64.b64encode(data).decode()}", len(data)


def _limit() -> str:
    return f"media of a request are at most {MAX_MEDIA_BYTES} bytes in all"


def _data_bytes(url: str) -> int:
    """The bytes a data: URL carries (base64 decoded without decoding it)."""
    header, _, payload = url.partition(",")
    if header.endswith(";base64"):
        return len(payload.rstrip("=")) * 3 // 4
    return len(payload)


def _media_refs(request: dict[str, Any]) -> list[dict[str, Any]]:
    """The {"url": ...} objects of every image, audio and video part.

    Of a chat request's messages, or of a tokens-in request's content parts.
    """
    parts = request.get("content_parts")
    if isinstance(parts, list):
        return [part for part in parts if isinstance(part, dict)]
    messages = request.get("messages")
    return [
        part[part["type"]]
        for message in (messages if isinstance(messages, list) else [])
        if isinstance(message, dict) and isinstance(message.get("content"), list)
        for part in message["content"]
        if isinstance(part, dict)
        and part.get("type") in MEDIA_PARTS.values()
        and isinstance(part.get(part["type"]), dict)
    ]
