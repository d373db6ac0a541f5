"""AUN layer: opening a gateway WebSocket whose TCP (or TLS) stream aund owns, so that the socket
is always closed, whoever closes the WebSocket first and however the peer behaves.

trio-websocket's client waits for the server to close TCP after the closing handshake; a
connection whose tasks are cancelled right after (as links do on every drop) would otherwise keep
its file descriptor until garbage collection.
"""
from __future__ import annotations

import ssl
import urllib.parse

import trio
import trio_websocket

#: The largest WebSocket message aund accepts from a gateway. Far above the gateway's limit for one
#: message (1 MB of payload), so that a page or push carrying any message the gateway accepted, with
#: its JSON wrapping and escaping, is received; larger pages shrink on the 1009 close (aund.aun.messaging).
MAX_FRAME = 8 * 1024 * 1024
#: The close code of a message larger than MAX_FRAME (RFC 6455 "message too big").
MESSAGE_TOO_BIG = 1009


async def connect(nursery: trio.Nursery, url: str, *, max_frame: int, timeout: float,
                  message_queue_size: int = 64) -> tuple[trio_websocket.WebSocketConnection, trio.abc.Stream]:
    """Open `url` (ws:// or wss://). Raises OSError, trio.TooSlowError or trio_websocket.HandshakeError;
    on failure nothing is left open."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("ws", "wss") or not parts.hostname:
        raise OSError(f"not a WebSocket URL: {url!r}")
    secure = parts.scheme == "wss"
    port = parts.port or (443 if secure else 80)
    resource = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    host_header = parts.hostname if parts.port is None else f"{parts.hostname}:{parts.port}"
    with trio.fail_after(timeout):
        if secure:
            stream: trio.abc.Stream = await trio.open_ssl_over_tcp_stream(
                parts.hostname, port, ssl_context=ssl.create_default_context())
        else:
            stream = await trio.open_tcp_stream(parts.hostname, port)
        try:
            ws = await trio_websocket.wrap_client_stream(nursery, stream, host_header, resource,
                                                         max_message_size=max_frame,
                                                         message_queue_size=message_queue_size)
        except BaseException:
            await trio.aclose_forcefully(stream)
            raise
    return ws, stream


async def close(ws: trio_websocket.WebSocketConnection, stream: trio.abc.Stream, *, grace: float = 1.0) -> None:
    """Close politely within `grace` seconds, then close the stream for certain (even if cancelled)."""
    with trio.CancelScope(shield=True):
        with trio.move_on_after(grace):
            await ws.aclose()
        await trio.aclose_forcefully(stream)
