"""AUN layer: the gateway's HTTP side (discovery, PKI, agent.md).

HTTP/1.1 spoken by h11 over `transport.open_stream`, so HTTP requests take the same path as the
WebSocket: the environment's proxy, the DNS fallback, TLS verified against the system store.
One request per connection (these are rare: discovery, a chain, a CRL, a certificate), at most
`MAX_BODY` bytes of body, redirects followed for GET and HEAD (at most `MAX_REDIRECTS`).
"""
from __future__ import annotations

import socket
import urllib.parse

import h11
import trio

from aund.aun import transport
from aund.errors import GatewayUnavailable

HTTP_TIMEOUT = 5.0
MAX_BODY = 4 << 20
MAX_REDIRECTS = 3
USER_AGENT = "aund"


def http_base(gateway_url: str) -> str:
    """ws(s)://host:port/path -> http(s)://host:port (the gateway's HTTP side)."""
    parts = urllib.parse.urlsplit(gateway_url)
    return f"{'https' if parts.scheme == 'wss' else 'http'}://{parts.netloc}"


async def _once(method: str, url: str, headers: list[tuple[str, str]], body: bytes, max_body: int
                ) -> tuple[int, dict[str, str], bytes]:
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise GatewayUnavailable(f"{method} {url}: not an http(s) URL")
    tls = parts.scheme == "https"
    stream = await transport.open_stream(parts.hostname, parts.port or (443 if tls else 80), tls=tls)
    try:
        conn = h11.Connection(h11.CLIENT)
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        given = {name.lower() for name, _ in headers}
        all_headers = [*([] if "host" in given else [("Host", transport.host_header(parts))]),
                       ("User-Agent", USER_AGENT), ("Connection", "close"), *headers]
        if body or method in ("PUT", "POST"):
            all_headers.append(("Content-Length", str(len(body))))
        data = conn.send(h11.Request(method=method, target=target, headers=all_headers))
        if body:
            data += conn.send(h11.Data(data=body))
        data += conn.send(h11.EndOfMessage())
        await stream.send_all(data)
        status, response_headers, chunks, size = 0, {}, [], 0
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                conn.receive_data(await stream.receive_some(65536))
            elif isinstance(event, h11.Response):
                status = event.status_code
                response_headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in event.headers}
            elif isinstance(event, h11.Data):
                size += len(event.data)
                if size > max_body:
                    raise GatewayUnavailable(f"{method} {url}: the answer is larger than {max_body} bytes")
                chunks.append(event.data)
            elif isinstance(event, (h11.EndOfMessage, h11.ConnectionClosed)):
                return status, response_headers, b"".join(chunks)
    except h11.ProtocolError as exc:
        raise GatewayUnavailable(f"{method} {url}: bad HTTP from the server: {exc}") from None
    finally:
        await trio.aclose_forcefully(stream)


async def http_request(method: str, url: str, *, headers: list[tuple[str, str]] | None = None, body: bytes = b"",
                       timeout: float = HTTP_TIMEOUT, max_body: int = MAX_BODY) -> tuple[int, dict[str, str], bytes]:
    """(status, lower-cased headers, body of at most `max_body` bytes). Raises GatewayUnavailable when the server cannot be
    reached or does not answer in time; an HTTP error status is returned, not raised."""
    try:
        with trio.fail_after(timeout):
            for _ in range(MAX_REDIRECTS + 1):
                status, response_headers, data = await _once(method, url, list(headers or ()), body, max_body)
                location = response_headers.get("location")
                if status in (301, 302, 303, 307, 308) and location and method in ("GET", "HEAD"):
                    url = urllib.parse.urljoin(url, location)
                    continue
                return status, response_headers, data
            raise GatewayUnavailable(f"{method} {url}: more than {MAX_REDIRECTS} redirects")
    except trio.TooSlowError:
        raise GatewayUnavailable(f"{method} {url}: no answer within {timeout:.0f} s") from None
    except (OSError, trio.BrokenResourceError, socket.gaierror) as exc:
        raise GatewayUnavailable(f"{method} {url}: {transport.describe(exc)}") from None


async def http_get(url: str, timeout: float = HTTP_TIMEOUT) -> tuple[int, bytes]:
    """GET: (status, body); raises GatewayUnavailable when the server cannot be reached."""
    status, _, body = await http_request("GET", url, timeout=timeout)
    return status, body
