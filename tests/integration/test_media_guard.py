"""vgate's media connector, the class vLLM loads, against a real loopback HTTP server.

The server counts requests: an internal address refused means it was never contacted.
The e2e vision tests check the same through the whole stack.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.server
import re
from collections.abc import Callable, Iterator

import pytest

from engine.media_guard import InternalAddress, _connector_class, check_url, internal_reason
from engine.workers import ENGINE_ENV_DEFAULTS
from tests.helpers import counting_http_server, loopback_http


@pytest.fixture
def server() -> Iterator[tuple[int, Callable[[], int]]]:
    with counting_http_server() as running:
        yield running


class RawBytes:
    """The media IO vLLM passes: only these two methods are used for a URL."""

    def get_max_bytes(self) -> int | None:
        return None

    def load_bytes(self, data: bytes) -> bytes:
        return data


def _fetch(url: str, allowed: list[str] | None = None) -> bytes:
    connector = _connector_class()(allowed_media_domains=allowed)
    return asyncio.run(connector.load_from_url_async(url, RawBytes(), fetch_timeout=5))


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "127.1.2.3"])
def test_loopback_is_never_contacted(server: tuple[int, Callable[[], int]], host: str) -> None:
    port, hits = server
    with pytest.raises(InternalAddress, match=r"is a loopback address .*--allowed-media-domains"):
        _fetch(f"http://{host}:{port}/image.png")
    assert hits() == 0


def test_a_host_the_operator_allowed_is_fetched(server: tuple[int, Callable[[], int]]) -> None:
    port, hits = server
    assert _fetch(f"http://127.0.0.1:{port}/image.png", ["127.0.0.1"]) == b"bytes"
    assert hits() == 1


def test_the_connection_itself_checks_what_a_name_resolves_to(
    server: tuple[int, Callable[[], int]],
) -> None:
    port, hits = server
    # A name that resolved to a public address at the first check and to an internal one
    # at connect time (DNS rebinding) meets the resolver's check: call past the first.
    connector = _connector_class()()

    async def fetch() -> bytes:
        return await connector.connection.async_get_bytes(
            f"http://localhost:{port}/image.png", timeout=5
        )

    with pytest.raises(Exception, match="loopback address"):
        asyncio.run(fetch())
    assert hits() == 0


@pytest.mark.parametrize(
    ("address", "reason"),
    [
        ("169.254.169.254", "link-local (the metadata server lives there)"),
        ("10.0.0.5", "private or reserved"),
        ("100.64.0.1", "private or reserved"),
        ("0.0.0.0", "private or reserved"),
        ("::1", "loopback"),
        ("::ffff:127.0.0.1", "loopback"),
        ("64:ff9b::a00:1", "private or reserved"),  # NAT64 of 10.0.0.1
        ("2002:a00:1::", "private or reserved"),  # 6to4 of 10.0.0.1
        ("fd00::1", "private or reserved"),
        ("fe80::1%eth0", "link-local (the metadata server lives there)"),
        ("224.0.0.1", "multicast"),
        ("8.8.8.8", None),
        ("2001:4860:4860::8888", None),
    ],
)
def test_internal_addresses(address: str, reason: str | None) -> None:
    assert internal_reason(address) == reason


def test_public_literals_and_allowed_hosts_pass_without_a_lookup() -> None:
    check_url("http://8.8.8.8/x.png", [])
    check_url("http://10.0.0.5/x.png", ["10.0.0.5"])
    private = re.escape("'10.0.0.5' is a private or reserved address")
    with pytest.raises(InternalAddress, match=private):
        check_url("https://10.0.0.5/x.png", [])


@pytest.mark.parametrize("allow", ["0", "1"])
def test_a_redirect_from_an_allowed_host_is_not_followed(
    server: tuple[int, Callable[[], int]], monkeypatch: pytest.MonkeyPatch, allow: str
) -> None:
    """vgate's engines run with VLLM_MEDIA_URL_ALLOW_REDIRECTS=0: an allowed host cannot
    send vLLM on to another. Both hosts allowed, so only the redirect setting decides;
    with "1" (vLLM's default) the target is reached: the count can tell."""
    target_port, hits = server
    handler = type(
        "Redirect",
        (http.server.BaseHTTPRequestHandler,),
        {
            "do_GET": lambda self: (
                self.send_response(302),
                self.send_header("Location", f"http://localhost:{target_port}/image.png"),
                self.send_header("Content-Length", "0"),
                self.end_headers(),
            ),
            "log_message": lambda self, *args: None,
        },
    )
    value = ENGINE_ENV_DEFAULTS["VLLM_MEDIA_URL_ALLOW_REDIRECTS"] if allow == "0" else allow
    monkeypatch.setenv("VLLM_MEDIA_URL_ALLOW_REDIRECTS", value)
    # The 302 itself is no image: whatever the fetch makes of it, the count decides.
    with loopback_http(handler) as port, contextlib.suppress(Exception):
        _fetch(f"http://127.0.0.1:{port}/image.png", ["127.0.0.1", "localhost"])
    assert hits() == (0 if allow == "0" else 1)
