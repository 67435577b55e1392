"""vLLM media connector plugin: http(s) media never reach an internal address.

vLLM's API server fetches `image_url`, `video_url` and `audio_url` parts itself.
Its own guards are a host allow-list (`--allowed-media-domains`, empty = any
host), no redirects (`VLLM_MEDIA_URL_ALLOW_REDIRECTS=0`, which vgate sets) and a
size cap; none keeps a client from naming `http://169.254.169.254/`, an address
in the VPC or the engine's own loopback port. This connector, registered in
vLLM's `MEDIA_CONNECTOR_REGISTRY` and chosen with `VLLM_MEDIA_CONNECTOR=vgate`,
refuses such URLs before fetching and checks again at connect time, on the
addresses the connection really uses (so a name that resolves differently the
second time gets nowhere). Hosts named in `--allowed-media-domains` are the
operator's choice and are not checked.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from typing import Any
from urllib.parse import urlsplit

CONNECTOR = "vgate"
NAT64 = ipaddress.ip_network("64:ff9b::/96")


class InternalAddress(ValueError):
    """A media URL whose host is, or resolves to, a non-public address."""


def internal_reason(address: str) -> str | None:
    """Why this address is not a public one, or None when it is."""
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address):
        embedded = ip.ipv4_mapped or ip.sixtofour
        if embedded is None and ip in NAT64:
            embedded = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
        if embedded is not None:
            return internal_reason(str(embedded))
    if ip.is_loopback:
        return "loopback"
    if ip.is_link_local:
        return "link-local (the metadata server lives there)"
    if ip.is_multicast:
        return "multicast"
    if not ip.is_global:
        return "private or reserved"
    return None


def check_addresses(host: str, addresses: list[str]) -> None:
    for address in addresses:
        reason = internal_reason(address)
        if reason:
            raise InternalAddress(
                f"media URL host {host!r} is a {reason} address ({address}); only public "
                "hosts may be fetched, or the operator's --allowed-media-domains"
            )


def check_url(url: str, allowed_hosts: list[str]) -> None:
    """Refuse an http(s) URL whose host is an internal address or resolves to one."""
    host = urlsplit(url).hostname
    if not host or host in allowed_hosts:
        return
    try:
        infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except OSError as e:
        raise InternalAddress(f"media URL host {host!r} cannot be resolved: {e}") from None
    check_addresses(host, [info[4][0] for info in infos])


def register() -> None:
    """The `vllm.general_plugins` entry point: adds the connector; engines choose it by env."""
    from vllm.multimodal.media.connector import MEDIA_CONNECTOR_REGISTRY

    if CONNECTOR not in MEDIA_CONNECTOR_REGISTRY.name2class:
        MEDIA_CONNECTOR_REGISTRY.register(CONNECTOR)(_connector_class())


def _connector_class() -> type:
    """vLLM's and aiohttp's classes are imported here, in the engine only."""
    import aiohttp
    from vllm.connections import HTTPConnection
    from vllm.multimodal.media.connector import MediaConnector

    class CheckingResolver(aiohttp.ThreadedResolver):
        """Every address a connection may use is checked (aiohttp skips it for IP literals)."""

        def __init__(self, allowed_hosts: list[str]) -> None:
            super().__init__()
            self.allowed_hosts = allowed_hosts

        async def resolve(self, host: str, port: int = 0, family: Any = socket.AF_INET) -> Any:
            resolved = await super().resolve(host, port, family)
            if host not in self.allowed_hosts:
                check_addresses(host, [r["host"] for r in resolved])
            return resolved

    class CheckedConnection(HTTPConnection):
        def __init__(self, allowed_hosts: list[str]) -> None:
            super().__init__()
            self.allowed_hosts = allowed_hosts

        async def get_async_client(self) -> aiohttp.ClientSession:
            if self._async_client is None:
                resolver = CheckingResolver(self.allowed_hosts)
                connector = aiohttp.TCPConnector(resolver=resolver)
                self._async_client = aiohttp.ClientSession(connector=connector, trust_env=True)
            return self._async_client

        def get_response(self, url: str, **kwargs: Any) -> Any:
            check_url(url, self.allowed_hosts)  # the synchronous path: checked before, only
            return super().get_response(url, **kwargs)

    connections: dict[tuple[str, ...], CheckedConnection] = {}

    class CheckingMediaConnector(MediaConnector):
        """vLLM makes one per request; they share one connection pool per allow-list."""

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            hosts = tuple(self.allowed_media_domains)
            if hosts not in connections:
                connections[hosts] = CheckedConnection(list(hosts))
            self.connection = connections[hosts]

        def load_from_url(self, url: str, *args: Any, **kwargs: Any) -> Any:
            if url[:4].lower() == "http":
                check_url(url, self.allowed_media_domains)
            return super().load_from_url(url, *args, **kwargs)

        async def load_from_url_async(self, url: str, *args: Any, **kwargs: Any) -> Any:
            if url[:4].lower() == "http":
                await asyncio.to_thread(check_url, url, self.allowed_media_domains)
            return await super().load_from_url_async(url, *args, **kwargs)

    return CheckingMediaConnector
