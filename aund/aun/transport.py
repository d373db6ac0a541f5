"""AUN layer: the byte streams to a gateway, for its WebSocket and for its HTTP side.

One opener (`open_stream`) serves both, so both behave the same on a real network:
- proxies from the environment as curl and the standard library read them (`HTTPS_PROXY` for
  wss:// and https://, `HTTP_PROXY` for ws:// and http://, `NO_PROXY` exceptions; lower case too),
  reached with HTTP CONNECT (h11 speaks the HTTP), TLS then runs end to end through the tunnel;
- the last address a host name resolved to is remembered (`DnsCache`, a small file in the state
  dir) and used when resolution fails later, keeping the name for SNI, certificate checks and
  `Host` (the official SDK keeps the same fallback);
- TLS is verified against the system CA store (`SSL_CERT_FILE` overrides it);
- the TCP (or TLS) stream is aund's, so it is always closed whoever closes the WebSocket first
  (a connection whose tasks are cancelled right after, as links do on every drop, would otherwise
  keep its file descriptor until garbage collection); the WebSocket on it is `aund.aun.ws`'s.
"""
from __future__ import annotations

import base64
import ipaddress
import json
import os
import socket
import ssl
import time
import urllib.parse
import urllib.request
from collections.abc import Awaitable, Callable
from functools import partial
from pathlib import Path
from typing import Any

import h11
import structlog
import trio

from aund.aun import codes, ws as websocket

log = structlog.get_logger("aund.transport")

PROXY_REPLY_LIMIT = 16 * 1024
#: The largest WebSocket message aund accepts from a gateway. Far above the gateway's limit for one
#: message (1 MB of payload), so that a page or push carrying any message the gateway accepted, with
#: its JSON wrapping and escaping, is received.
MAX_FRAME = 8 * 1024 * 1024
#: The close code of a message larger than MAX_FRAME (RFC 6455 "message too big").
MESSAGE_TOO_BIG = codes.CLOSE_MESSAGE_TOO_BIG


class DnsCache:
    """host -> the last address it resolved to, kept in one JSON file (atomic rewrite, 0600)."""

    MAX_ENTRIES = 4096

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self._entries: dict[str, dict[str, object]] = {}
        if path is not None:
            try:
                data = json.loads(path.read_text("utf-8"))
                if isinstance(data, dict):
                    self._entries = {str(k): v for k, v in data.items() if isinstance(v, dict)}
            except (OSError, ValueError):
                self._entries = {}  # a cache: missing or damaged means empty

    def get(self, host: str) -> str | None:
        entry = self._entries.get(host.lower())
        address = entry.get("ip") if entry else None
        return address if isinstance(address, str) else None

    def remember(self, host: str, address: str) -> None:
        host = host.lower()
        if self.get(host) == address:
            return
        self._entries[host] = {"ip": address, "updated_at": int(time.time())}
        while len(self._entries) > self.MAX_ENTRIES:
            self._entries.pop(next(iter(self._entries)))
        if self.path is None:
            return
        tmp = self.path.with_name(self.path.name + ".tmp")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(self._entries, f)
            os.replace(tmp, self.path)
        except OSError as exc:  # a cache that cannot be written only costs the fallback
            log.warning("dns_cache.write_failed", path=str(self.path), error=exc.strerror or str(exc))


DNS_CACHE = DnsCache(None)  # the daemon points it at its state dir (use_dns_cache)


def use_dns_cache(path: Path | None) -> None:
    global DNS_CACHE
    DNS_CACHE = DnsCache(path)


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


async def _open_tcp(host: str, port: int) -> trio.SocketStream:
    """TCP to host:port; when the name does not resolve, to the address it resolved to last time."""
    if _is_ip(host):
        return await trio.open_tcp_stream(host, port)
    try:
        infos = await trio.socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        cached = DNS_CACHE.get(host)
        if cached is None:
            raise
        log.warning("dns.fallback", host=host, address=cached, error=exc.strerror or str(exc))
        return await trio.open_tcp_stream(cached, port)
    addresses = list(dict.fromkeys(info[4][0] for info in infos))
    stream = await trio.open_tcp_stream(host, port) if len(addresses) > 1 else \
        await trio.open_tcp_stream(addresses[0], port)
    try:
        DNS_CACHE.remember(host, stream.socket.getpeername()[0])
    except OSError:
        pass
    return stream


def proxy_for(scheme: str, host: str) -> str | None:
    """The proxy URL the environment names for a `scheme` (http/https) request to `host`, or None."""
    proxies = urllib.request.getproxies_environment()
    proxy = proxies.get(scheme) or proxies.get("all")
    if not proxy or urllib.request.proxy_bypass_environment(host, proxies):
        return None
    return proxy


async def _tunnel(proxy_url: str, host: str, port: int) -> trio.SocketStream:
    """A TCP stream through an HTTP proxy's CONNECT to host:port."""
    proxy = urllib.parse.urlsplit(proxy_url if "://" in proxy_url else f"http://{proxy_url}")
    if proxy.scheme not in ("http", "") or not proxy.hostname:
        raise OSError(f"unsupported proxy {proxy.scheme}://{proxy.hostname} (only http:// proxies with CONNECT)")
    stream = await _open_tcp(proxy.hostname, proxy.port or 8080)
    try:
        target = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        headers = [("Host", target)]
        if proxy.username:
            cred = f"{urllib.parse.unquote(proxy.username)}:{urllib.parse.unquote(proxy.password or '')}"
            headers.append(("Proxy-Authorization", "Basic " + base64.b64encode(cred.encode()).decode()))
        conn = h11.Connection(h11.CLIENT)
        await stream.send_all(conn.send(h11.Request(method="CONNECT", target=target, headers=headers)))
        received = 0
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                data = await stream.receive_some(4096)
                received += len(data)
                if not data or received > PROXY_REPLY_LIMIT:
                    raise OSError(f"proxy {proxy.hostname} closed or sent too much before answering CONNECT")
                conn.receive_data(data)
                continue
            if isinstance(event, h11.Response):
                if not 200 <= event.status_code < 300:
                    raise OSError(f"proxy {proxy.hostname} refused CONNECT {target}: HTTP {event.status_code} "
                                  f"{event.reason.decode('latin-1')}")
                if conn.trailing_data[0]:
                    raise OSError(f"proxy {proxy.hostname} sent data before the tunnel opened")
                return stream
    except h11.ProtocolError as exc:
        await trio.aclose_forcefully(stream)
        raise OSError(f"proxy {proxy.hostname} answered CONNECT with bad HTTP: {exc}") from None
    except BaseException:
        await trio.aclose_forcefully(stream)
        raise


async def open_stream(host: str, port: int, *, tls: bool) -> trio.abc.Stream:
    """A stream to host:port (through the environment's proxy, with the DNS fallback), TLS-wrapped
    and handshaken when `tls`. Raises OSError, trio.BrokenResourceError (TLS) or socket.gaierror."""
    proxy = proxy_for("https" if tls else "http", host)
    tcp = await (_tunnel(proxy, host, port) if proxy else _open_tcp(host, port))
    if not tls:
        return tcp
    stream = trio.SSLStream(tcp, ssl.create_default_context(), server_hostname=host, https_compatible=True)
    try:
        await stream.do_handshake()
    except BaseException:
        await trio.aclose_forcefully(stream)
        raise
    return stream


def host_header(parts: urllib.parse.SplitResult) -> str:
    host = parts.hostname or ""
    host = f"[{host}]" if ":" in host else host
    return host if parts.port is None else f"{host}:{parts.port}"


async def connect(nursery: trio.Nursery, url: str, *, max_frame: int, timeout: float
                  ) -> tuple[websocket.WebSocket, trio.abc.Stream]:
    """Open `url` (ws:// or wss://), its writer running in `nursery`. Raises OSError,
    trio.TooSlowError, trio.BrokenResourceError or ws.HandshakeError; on failure nothing is left open."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("ws", "wss") or not parts.hostname:
        raise OSError(f"not a WebSocket URL: {url!r}")
    secure = parts.scheme == "wss"
    port = parts.port or (443 if secure else 80)
    resource = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    with trio.fail_after(timeout):
        stream = await open_stream(parts.hostname, port, tls=secure)
        try:
            ws = await websocket.handshake(stream, host_header(parts), resource, max_message=max_frame)
        except BaseException:
            await trio.aclose_forcefully(stream)
            raise
    nursery.start_soon(ws.run_writer)
    return ws, stream


async def close(ws: websocket.WebSocket, stream: trio.abc.Stream, *, grace: float = 1.0) -> None:
    """Close politely within `grace` seconds, then close the stream for certain (even if cancelled)."""
    with trio.CancelScope(shield=True):
        await ws.aclose(timeout=grace)
        await trio.aclose_forcefully(stream)


#: How a link (and a pre-auth RPC) opens a gateway WebSocket: `connector(nursery, url, *, max_frame,
#: timeout)` -> (connection, close). The connection is used as `aund.aun.ws.WebSocket` is
#: (`get_message()`, `send_message(text)` queues, `ping()`; `ws.ConnectionClosed` with the close
#: code once closed); `await close()` closes it for certain. `open_connection` is the real
#: one; `aund.testing.FakeGateway.connect` an in-memory one for tests.
Connector = Callable[..., Awaitable[tuple[Any, Callable[[], Awaitable[None]]]]]


async def open_connection(nursery: trio.Nursery, url: str, *, max_frame: int, timeout: float
                          ) -> tuple[websocket.WebSocket, Callable[[], Awaitable[None]]]:
    """`connect`, with `close` of that connection and its stream as the closer (the default Connector)."""
    ws, stream = await connect(nursery, url, max_frame=max_frame, timeout=timeout)
    return ws, partial(close, ws, stream)


def describe(exc: BaseException) -> str:
    """A reason a person can act on for a failed connect (never an empty string): TLS verification
    failures name what did not verify, name-resolution failures say so, wrapped causes are unwrapped."""
    for _ in range(5):
        if isinstance(exc, ssl.SSLCertVerificationError):
            return (f"TLS certificate not accepted: {exc.verify_message or exc.reason or exc} (checked against the "
                    "system CA store; SSL_CERT_FILE overrides it)")
        if isinstance(exc, ssl.SSLError):
            return f"TLS failed: {exc.reason or exc}"
        if isinstance(exc, socket.gaierror):
            return f"cannot resolve the host name: {exc.strerror or exc}"
        if isinstance(exc, trio.TooSlowError):
            return "timed out"
        cause = exc.__cause__ or exc.__context__
        if cause is None or not (isinstance(exc, (trio.BrokenResourceError, websocket.HandshakeError,
                                                  websocket.ConnectionClosed)) or not str(exc)):
            break
        exc = cause
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused (nothing listens there)"
    text = str(exc)
    return text if text else type(exc).__name__
