"""AUN layer: a thin WebSocket client (RFC 6455) on wsproto over a trio stream the caller owns.

Why not trio-websocket: it runs its own reader task per connection (two wake-ups per inbound
frame with ours) and writes every frame under a lock; together 200-250 us of CPU per round trip.
Here:
- no reader task of its own: whoever calls `get_message` (the link's one reader) reads the
  stream and feeds wsproto; pings are answered and pongs matched on that path;
- one writer task per connection (`run_writer`, started by the opener): senders only queue
  frames already framed by wsproto (`send_message` never awaits the socket), the writer drains
  everything queued into one `send_all`; above `HIGH_WATER` queued bytes senders wait;
- a message larger than `max_message` (characters of a text message, bytes of a binary one) closes
  with 1009, a protocol error with 1002, bad UTF-8 in
  a text message with 1007 (wsproto's codes); every end raises our `ConnectionClosed(code, reason)`
  (1006: the stream ended or broke without a closing handshake);
- `aclose` runs the closing handshake within a timeout; the stream itself is the opener's to close.

Only the client side: the devnet's server is hypercorn's.
"""
from __future__ import annotations

import os
from typing import Any

import trio
from wsproto.connection import Connection, ConnectionState, ConnectionType
from wsproto.events import AcceptConnection, BytesMessage, CloseConnection, Ping, Pong, RejectConnection, \
    RejectData, Request, TextMessage
from wsproto.handshake import H11Handshake
from wsproto.utilities import LocalProtocolError, RemoteProtocolError

from aund.aun import codes

#: Largest message accepted when the caller names no limit.
MAX_MESSAGE = 16 * 1024 * 1024
#: Queued outbound bytes above which `send_message` waits for the writer.
HIGH_WATER = 1024 * 1024
RECEIVE_SIZE = 64 * 1024
#: Largest HTTP answer to the opening handshake (status line, headers and a refusal's body).
HANDSHAKE_LIMIT = 64 * 1024
CLOSE_TIMEOUT = 1.0

ABNORMAL = 1006
MESSAGE_TOO_BIG = codes.CLOSE_MESSAGE_TOO_BIG


class ConnectionClosed(Exception):
    """The WebSocket is closed; `code` as RFC 6455 names it (1006: no closing handshake)."""

    def __init__(self, code: int, reason: str = "") -> None:
        super().__init__(f"WebSocket closed: {code}{' ' + reason if reason else ''}")
        self.code, self.reason = code, reason


class HandshakeError(Exception):
    """The server refused the opening handshake (`status` and `headers` of its answer), or its
    answer was not a WebSocket upgrade (`status` None)."""

    def __init__(self, message: str, status: int | None = None,
                 headers: list[tuple[bytes, bytes]] | None = None, body: bytes = b"") -> None:
        super().__init__(message)
        self.status, self.headers, self.body = status, list(headers or ()), body


async def handshake(stream: trio.abc.Stream, host: str, resource: str, *,
                    subprotocols: tuple[str, ...] = (), extra_headers: list[tuple[bytes, bytes]] | None = None,
                    max_message: int = MAX_MESSAGE, high_water: int = HIGH_WATER) -> "WebSocket":
    """The client's opening handshake on `stream` (Host `host`, target `resource`). Raises
    HandshakeError; stream errors (trio.BrokenResourceError, OSError) pass through. The stream
    is left open either way."""
    hs = H11Handshake(ConnectionType.CLIENT)
    await stream.send_all(hs.send(Request(host=host, target=resource, subprotocols=list(subprotocols),
                                          extra_headers=list(extra_headers or ()))))
    received = 0
    rejected: RejectConnection | None = None
    body = bytearray()
    while True:
        data = await stream.receive_some(RECEIVE_SIZE)
        received += len(data)
        if received > HANDSHAKE_LIMIT:
            raise HandshakeError(f"the handshake answer is larger than {HANDSHAKE_LIMIT} bytes",
                                 rejected.status_code if rejected else None, rejected.headers if rejected else None)
        try:
            hs.receive_data(data or None)
            events = list(hs.events())
        except (RemoteProtocolError, LocalProtocolError) as exc:
            raise HandshakeError(f"bad handshake answer: {exc}") from None
        for event in events:
            if isinstance(event, AcceptConnection):
                conn = hs.connection
                assert conn is not None
                return WebSocket(stream, conn, subprotocol=event.subprotocol, max_message=max_message,
                                 high_water=high_water)
            if isinstance(event, RejectConnection):
                rejected = event
                if not event.has_body:
                    raise _rejected(event, b"")
            elif isinstance(event, RejectData):
                body += event.data
                if event.body_finished and rejected is not None:
                    raise _rejected(rejected, bytes(body))
        if not data:
            if rejected is not None:
                raise _rejected(rejected, bytes(body))
            raise HandshakeError("the server closed the connection during the handshake")


def _rejected(event: RejectConnection, body: bytes) -> HandshakeError:
    return HandshakeError(f"the server refused the WebSocket: HTTP {event.status_code}", event.status_code,
                          event.headers, body)


class WebSocket:
    """One open client WebSocket. `get_message` from one task at a time (the reader); `send_message`,
    `ping` from any; `run_writer` runs in the opener's nursery for the connection's life."""

    def __init__(self, stream: trio.abc.Stream, conn: Connection, *, subprotocol: str | None = None,
                 max_message: int = MAX_MESSAGE, high_water: int = HIGH_WATER) -> None:
        self.stream, self._conn, self.subprotocol = stream, conn, subprotocol
        self.max_message, self.high_water = max_message, high_water
        self.closed: ConnectionClosed | None = None
        self._queue: list[bytes] = []
        self._queued = 0
        self._wake = trio.Event()    # something queued (or the writer must stop)
        self._space = trio.Event()   # the writer took the queue
        self._flushed = trio.Event()  # the queue is empty and written
        self._flushed.set()
        self._peer_closed = trio.Event()
        self._reading = False
        self._parts: list[Any] = []
        self._size = 0
        self._text = False
        self._pings: dict[bytes, trio.Event] = {}
        self.writes = 0               # send_all calls (statistics)

    # --- writing ------------------------------------------------------------------------------
    def _put(self, data: bytes) -> None:
        self._queue.append(data)
        self._queued += len(data)
        self._flushed = trio.Event() if self._flushed.is_set() else self._flushed
        self._wake.set()

    async def send_message(self, message: str | bytes) -> None:
        """Queue one message (str: text, bytes: binary) for the writer; waits only while more than
        `high_water` bytes are queued. Raises ConnectionClosed.

        Below the mark it does not yield (no checkpoint, on purpose): frames a task sends back to
        back then leave in one write, and a send costs no scheduler step of its own."""
        while self._queued >= self.high_water and self.closed is None:
            await self._space.wait()
        if self.closed is not None:
            raise self.closed
        self._put(self._conn.send(TextMessage(data=message) if isinstance(message, str)
                                  else BytesMessage(data=message)))

    async def run_writer(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """The connection's one writer: everything queued since the last write in one `send_all`."""
        task_status.started()
        while True:
            await self._wake.wait()
            self._wake = trio.Event()
            if self._queue:
                data = b"".join(self._queue) if len(self._queue) > 1 else self._queue[0]
                self._queue.clear()
                self._queued = 0
                self._space.set()
                self._space = trio.Event()
                try:
                    await self.stream.send_all(data)
                    self.writes += 1
                except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                    self._end(ABNORMAL, "the stream broke while writing")
                    self._peer_closed.set()
            if not self._queue:
                self._flushed.set()
            if self.closed is not None and not self._queue:
                return

    # --- reading ------------------------------------------------------------------------------
    async def get_message(self) -> str | bytes:
        """The next whole message (fragments joined). Raises ConnectionClosed once closed (after a
        close of ours, only once the peer's answer to it was read)."""
        if self._reading:
            raise RuntimeError("get_message is the reader's: one task at a time")
        self._reading = True
        try:
            while True:
                message = self._next_event()
                if message is not None:
                    return message
                if self.closed is not None and (self._peer_closed.is_set()
                                                or self._conn.state is not ConnectionState.LOCAL_CLOSING):
                    raise self.closed
                if not await self._receive():
                    raise self.closed  # type: ignore[misc]
        finally:
            self._reading = False

    async def _receive(self) -> bool:
        """Feed wsproto what the stream has; False once the stream ended (closed 1006 unless closed)."""
        try:
            data = await self.stream.receive_some(RECEIVE_SIZE)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            data = b""
        if not data:
            if self._conn.state is not ConnectionState.CLOSED:
                self._conn.receive_data(None)
            self._end(ABNORMAL, "the connection ended without a closing handshake")
            self._peer_closed.set()
            return False
        self._conn.receive_data(data)
        return True

    def _next_event(self) -> str | bytes | None:
        """The next whole message wsproto has (None: none yet); answers pings, matches pongs,
        handles a close. Messages that arrive after a close of ours are dropped."""
        for event in self._conn.events():
            if isinstance(event, (TextMessage, BytesMessage)):
                if self.closed is not None:
                    continue
                self._size += len(event.data)
                if self._size > self.max_message:
                    self._fail(MESSAGE_TOO_BIG, f"message larger than {self.max_message} bytes")
                    continue
                self._text = isinstance(event, TextMessage)
                self._parts.append(event.data)
                if event.message_finished:
                    parts, self._parts, self._size = self._parts, [], 0
                    if len(parts) == 1:
                        return parts[0]
                    return "".join(parts) if self._text else b"".join(parts)
            elif isinstance(event, Ping):
                if self._conn.state is ConnectionState.OPEN:
                    self._put(self._conn.send(event.response()))
            elif isinstance(event, Pong):
                waiter = self._pings.pop(bytes(event.payload), None)
                if waiter is not None:
                    waiter.set()
            elif isinstance(event, CloseConnection):
                state = self._conn.state
                if state is ConnectionState.REMOTE_CLOSING:  # the peer closed: answer it
                    self._put(self._conn.send(event.response()))
                    self._end(event.code, event.reason or "")
                elif state is ConnectionState.OPEN:  # wsproto found a protocol error (1002, 1007)
                    self._fail(event.code, event.reason or "")
                else:
                    self._end(event.code, event.reason or "")
                if self._conn.state is ConnectionState.CLOSED:
                    self._peer_closed.set()
        return None

    def _fail(self, code: int, reason: str) -> None:
        """Close from our side because of what the peer sent."""
        self._parts, self._size = [], 0
        if self._conn.state is ConnectionState.OPEN:
            self._put(self._conn.send(CloseConnection(code=code, reason=reason[:120])))
        self._end(code, reason)
        self._peer_closed.set()  # no answer awaited: the peer broke the protocol

    def _end(self, code: int, reason: str) -> None:
        if self.closed is None:
            self.closed = ConnectionClosed(code, reason)
        self._space.set()
        self._wake.set()
        for waiter in self._pings.values():
            waiter.set()
        self._pings.clear()

    # --- ping, close --------------------------------------------------------------------------
    async def ping(self, payload: bytes | None = None) -> None:
        """Send a ping and wait for its pong (read by the reader). Raises ConnectionClosed."""
        if self.closed is not None:
            await trio.lowlevel.checkpoint()
            raise self.closed
        payload = payload if payload is not None else os.urandom(4)
        if payload in self._pings:
            raise ValueError("a ping with this payload is already waiting")
        waiter = self._pings[payload] = trio.Event()
        self._put(self._conn.send(Ping(payload=payload)))
        try:
            await waiter.wait()
        finally:
            self._pings.pop(payload, None)  # a ping given up on (the heartbeat's timeout)
        if self.closed is not None:
            raise self.closed

    async def aclose(self, code: int = 1000, reason: str = "", *, timeout: float = CLOSE_TIMEOUT) -> None:
        """The closing handshake: send our close, wait up to `timeout` for the peer's (read by the
        reader if one is reading, else here). Never raises; the stream stays the opener's."""
        with trio.move_on_after(timeout):
            if self.closed is None and self._conn.state is ConnectionState.OPEN:
                self._put(self._conn.send(CloseConnection(code=code, reason=reason)))
            self._end(code, reason or "closed by us")
            await self._flushed.wait()
            while not self._peer_closed.is_set() and self._conn.state is ConnectionState.LOCAL_CLOSING:
                if self._reading:
                    await self._peer_closed.wait()
                elif await self._receive():
                    self._next_event()
