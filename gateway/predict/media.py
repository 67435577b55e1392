"""gs:// images, audio and video in predict instances, sent to the engine inline.

vLLM fetches http(s) and data: URLs itself but knows nothing of Cloud
Storage; the gateway reads such objects with the same credentials as the model
download and hands them over as data: URLs.
"""

from __future__ import annotations

import asyncio
import base64
import copy
import dataclasses
import mimetypes
from typing import Any

from google.api_core import exceptions as gexc
from google.cloud import storage

from engine.gcs import DownloadError, is_gcs, make_client, split_uri
from gateway.errors import ApiError
from gateway.predict.protocol import MEDIA_PARTS, Instance

MAX_MEDIA_BYTES = 20 * 1024 * 1024


class MediaReader:
    """Reads gs:// media for the engine; one storage client per gateway worker."""

    def __init__(self) -> None:
        self._client: storage.Client | None = None

    async def inline(self, instances: list[Instance]) -> list[Instance]:
        """The instances with every gs:// media URL replaced by a data: URL."""
        return [await self._inline(i, inst) for i, inst in enumerate(instances)]

    async def _inline(self, index: int, instance: Instance) -> Instance:
        if not any(is_gcs(ref.get("url")) for ref in _media_refs(instance.request)):
            return instance
        request = copy.deepcopy(instance.request)  # the instance's own stays as it was
        for ref in _media_refs(request):
            if is_gcs(ref.get("url")):
                ref["url"] = await self._data_url(f"instances[{index}]", ref["url"])
        return dataclasses.replace(instance, request=request)

    async def _data_url(self, where: str, uri: str) -> str:
        try:
            bucket, name = split_uri(uri)
        except DownloadError as e:
            raise ApiError(400, f"{where}: {e}") from None
        if self._client is None:
            self._client = await asyncio.to_thread(make_client)
        blob = self._client.bucket(bucket).blob(name)
        try:
            # One request: at most one byte past the limit, which tells a larger object.
            # (A range has no whole-object checksum to check; the transport is TLS.)
            data = await asyncio.to_thread(
                blob.download_as_bytes, end=MAX_MEDIA_BYTES, checksum=None
            )
        except gexc.NotFound:
            raise ApiError(400, f"{where}: {uri}: no such object") from None
        except (gexc.Forbidden, gexc.Unauthorized):
            raise ApiError(400, f"{where}: {uri}: no permission to read it") from None
        except gexc.GoogleAPIError as e:
            raise ApiError(502, f"{where}: {uri}: Cloud Storage error: {e}") from None
        if len(data) > MAX_MEDIA_BYTES:
            raise ApiError(400, f"{where}: {uri} is larger than {MAX_MEDIA_BYTES} bytes")
        kind = blob.content_type  # from the download's headers
        if kind in (None, "", "application/octet-stream"):  # not set on upload: by the name
            kind = mimetypes.guess_type(name)[0] or "application/octet-stream"
        return f"data:{kind};base64,{base64.b64encode(data).decode()}"


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
