"""What both client front ends share, without I/O (layer: client_stub; msgpack and the stdlib only).

The constants, ``Event``, the sans-IO ``_Core`` (request ids, pending replies, hello, event
routing), ``_SinkState`` (one subscription's queue), ``_SubState`` (where an events iterator
resumes) and the argument builders of the ops. ``client_stub/_async/client.py`` is written over
them once; ``client_stub/_sync/client.py`` is generated from it (``scripts/unasync.py``).
"""
from __future__ import annotations

import collections
import itertools
import os
import sys
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
TYPE_CHECKING = False  # typing is for checkers only: apps should not pay for importing it
if TYPE_CHECKING:
    from typing import Any

from client_stub import localsock, wire
from client_stub.errors import (
    AundError, DaemonUnavailable, LimitsExceeded, ProtocolError, error_from_wire,
    error_to_wire,
)

ENV_SOCKET = localsock.ENV_SOCKET
SYSTEM_SOCKET = localsock.SYSTEM_SOCKET
default_socket_path = localsock.default_socket_path
DEFAULT_CONNECT_TIMEOUT = 5.0
DEFAULT_TIMEOUT = 30.0        # client-side wait for an ordinary op's reply
ENSURE_WAIT = 90.0            # identity.ensure may register with the gateway (agent_md.set: start a link)
CALL_MARGIN = 10.0            # client-side wait for a call = its timeout + this
DEFAULT_CALL_WAIT = 75.0      # ... for a call without a timeout (daemon default + queue + margin)
EVENT_QUEUE_MAX = 1024        # events buffered per iterator before it resubscribes
RECONNECT_ATTEMPTS = 10
BACKOFF_BASE, BACKOFF_MAX = 0.1, 2.0
READ_SIZE = 64 * 1024
BROKEN_WAIT = 2.0             # after a failed send: how long the reader gets to report why
SUBSCRIPTION_END_KIND = "subscription.end"
PERMISSION_HINT = "this user may not open aund's socket: ask the admin for access (group or policy)"

_warned_protocol = False


def _default_app_name() -> str:
    name = Path(sys.argv[0]).name if sys.argv and sys.argv[0] else ""
    return (name or "python")[:128]


def _unavailable(path: Path, exc: BaseException | None = None, what: str = "cannot connect to") -> DaemonUnavailable:
    reason = "" if exc is None else f" ({exc.strerror or type(exc).__name__})" if isinstance(exc, OSError) \
        else f" ({type(exc).__name__})"
    hint = PERMISSION_HINT if isinstance(exc, PermissionError) else None
    err = DaemonUnavailable(socket_path=str(path), hint=hint)
    err.message = f"{what} aund at {path}{reason}; {err.hint}"
    return err


def _untrusted(path: Path, exc: localsock.UnsafeSocketPath) -> DaemonUnavailable:
    err = DaemonUnavailable(socket_path=str(path), hint=localsock.UNSAFE_HINT)
    err.message = f"refusing to talk to aund at {path}: {exc}"
    return err


def _copy(exc: AundError) -> AundError:
    """A fresh instance of ``exc`` (one exception object must not be raised in several places)."""
    return error_from_wire(error_to_wire(exc))


def _backoff(attempt: int) -> float:
    jitter = 0.5 + int.from_bytes(os.urandom(2), "big") / 65535  # 0.5-1.5x, without importing random
    return min(BACKOFF_MAX, BACKOFF_BASE * (2 ** attempt)) * jitter


class Event:
    """One event: ``kind``, ``data`` and ``cursor``; ``ack()`` acknowledges it and every earlier one.

    Durable events (messages) have an int cursor; live link events (``state_change`` ...) have
    ``cursor`` None, and their ``ack()`` does nothing.

    With ``AsyncClient``, ``ack()`` returns a coroutine: ``await ev.ack()``.
    """

    __slots__ = ("kind", "data", "cursor", "_acker")

    def __init__(self, kind: str, data: Any, cursor: int | None, acker: Callable[[int | None], Any]) -> None:
        self.kind, self.data, self.cursor, self._acker = kind, data, cursor, acker

    def ack(self) -> Any:
        return self._acker(self.cursor)

    def __repr__(self) -> str:
        return f"Event(kind={self.kind!r}, cursor={self.cursor!r}, data={self.data!r:.80})"


# --- the sans-IO core ------------------------------------------------------------------------------
class _SinkState:
    """Events of one subscription waiting for its iterator: bounded; past the bound it only
    remembers that it overflowed (the iterator then resubscribes after the last event it gave out)."""

    def __init__(self, maxlen: int | None = None) -> None:
        self.events: collections.deque[dict[str, Any]] = collections.deque()
        self.maxlen = EVENT_QUEUE_MAX if maxlen is None else maxlen
        self.overflowed = False
        self.lost = False
        self.ended = False
        self.end_error: AundError | None = None

    def _wake(self) -> None:
        raise NotImplementedError

    def deliver(self, event: dict[str, Any]) -> None:
        if self.overflowed:
            return
        if len(self.events) >= self.maxlen:
            self.overflowed = True
        else:
            self.events.append(event)
        self._wake()

    def end(self, error: AundError | None) -> None:
        self.ended, self.end_error = True, error
        self._wake()

    def connection_lost(self) -> None:
        self.lost = True
        self._wake()

    def ready(self) -> bool:
        return bool(self.events) or self.overflowed or self.lost or self.ended

    def pop(self) -> tuple[dict[str, Any] | None, bool, bool, bool]:
        """(the next event or None, ended, overflowed, lost): the flags read together with the
        queue they follow (the blocking sink takes its lock for this)."""
        raw = self.events.popleft() if self.events else None
        return raw, self.ended, self.overflowed, self.lost


class _Core:
    """Request/reply bookkeeping of one connection (no I/O): the front ends feed it received
    bytes and send the bytes it returns. Waiters are futures (``_thread_io.Waiter`` or
    ``asyncio.Future``); sinks are ``_SinkState``s."""

    def __init__(self, app: str) -> None:
        self.app = app
        self.decoder = wire.FrameDecoder(wire.DEFAULT_MAX_FRAME)
        self.max_frame = wire.DEFAULT_MAX_FRAME
        self.hello: dict[str, Any] | None = None
        self.error: AundError | None = None  # set once: the connection is gone
        self._ids = itertools.count(1)
        self._pending: dict[int, Any] = {}
        self._hello_id: int | None = None
        self._sub_requests: dict[int, _SinkState] = {}
        self._sinks: dict[Any, _SinkState] = {}

    def hello_request(self, waiter: Any) -> bytes:
        if self.error is not None:
            raise _copy(self.error)
        self._hello_id = next(self._ids)
        self._pending[self._hello_id] = waiter
        return wire.encode_frame(wire.make_hello(self._hello_id, self.app))

    def request(self, op: str, args: dict[str, Any], waiter: Any, sink: _SinkState | None = None) -> tuple[int, bytes]:
        """Register ``waiter`` and return (id, frame bytes); a ``subscribe`` passes its ``sink``,
        which is attached the moment the reply arrives (before any event of it)."""
        if self.error is not None:
            raise _copy(self.error)
        request_id = next(self._ids)
        try:
            data = wire.encode_frame(wire.make_request(request_id, op, args), self.max_frame)
        except ProtocolError as exc:
            if "length" in exc.data:
                raise LimitsExceeded(f"{op}: the request is larger than max_frame {self.max_frame}",
                                     data=exc.data) from None
            raise
        self._pending[request_id] = waiter
        if sink is not None:
            self._sub_requests[request_id] = sink
        return request_id, data

    def forget(self, request_id: int) -> None:
        self._pending.pop(request_id, None)
        self._sub_requests.pop(request_id, None)

    def drop_sink(self, sub: Any) -> None:
        self._sinks.pop(sub, None)

    def receive(self, data: bytes) -> None:
        """Feed received bytes; resolves waiters and delivers events.

        Errors: ProtocolError if the daemon sent something undecodable (close the connection).
        """
        self.decoder.feed(data)
        while (frame := self.decoder.next_frame()) is not None:
            msg = wire.validate_reply(frame)
            if isinstance(msg, wire.Event):
                self._on_event(msg)
            elif msg.id is None:  # a connection-level error: the daemon closes next
                self.lost(msg.exception())
            elif isinstance(msg, wire.ErrorReply):
                self._resolve(msg.id, None, msg.exception())
            else:
                self._resolve(msg.id, msg.result, None)

    def _resolve(self, request_id: Any, result: Any, exc: AundError | None) -> None:
        waiter = self._pending.pop(request_id, None)
        sink = self._sub_requests.pop(request_id, None)
        if exc is None and request_id == self._hello_id:
            self._on_hello(result)
        if exc is None and sink is not None and isinstance(result, dict) and "sub" in result:
            self._sinks[result["sub"]] = sink
        if waiter is None or waiter.done():
            return
        if exc is None:
            waiter.set_result(result)
        else:
            waiter.set_exception(exc)

    def _on_hello(self, result: Any) -> None:
        global _warned_protocol
        if not isinstance(result, dict):
            return
        max_frame = result.get("max_frame")
        if isinstance(max_frame, int) and not isinstance(max_frame, bool) and 0 < max_frame <= wire.HARD_MAX_FRAME:
            self.max_frame = self.decoder.max_frame = max_frame
        self.hello = result
        protocol = result.get("protocol")
        if isinstance(protocol, int) and protocol < wire.PROTOCOL_VERSION and not _warned_protocol:
            _warned_protocol = True
            warnings.warn(f"aund speaks local protocol {protocol}, this client {wire.PROTOCOL_VERSION}; "
                          f"upgrade aund to use newer features", RuntimeWarning, stacklevel=2)

    def _on_event(self, msg: wire.Event) -> None:
        sink = self._sinks.get(msg.sub)
        if sink is None:
            return  # after unsubscribe, or a subscription this core does not know
        if msg.event.get("kind") == SUBSCRIPTION_END_KIND:
            del self._sinks[msg.sub]
            data = msg.event.get("data")
            error = data.get("error") if isinstance(data, dict) else None
            sink.end(None if error is None else error_from_wire(error))
        else:
            sink.deliver(msg.event)

    def lost(self, exc: AundError) -> None:
        """The connection is gone: fail every waiter (each with its own copy of ``exc``)."""
        if self.error is not None:
            return
        self.error = exc
        pending, self._pending = self._pending, {}
        self._sub_requests.clear()
        for waiter in pending.values():
            if not waiter.done():
                waiter.set_exception(_copy(exc))
        sinks, self._sinks = self._sinks, {}
        for sink in sinks.values():
            sink.connection_lost()


class _SubState:
    """Where an events iterator (re)subscribes, and which events it already gave out."""

    def __init__(self, aid: str, consumer: str, kinds: tuple[str, ...], start: str | int) -> None:
        if start not in ("last_ack", "now") and (isinstance(start, bool) or not isinstance(start, int)):
            raise ValueError('start must be "last_ack", "now" or an int cursor')
        self.aid, self.consumer, self.kinds, self.start = aid, consumer, tuple(kinds), start
        self.last_yielded: int | None = None
        self.acked = False
        self.sub: Any = None

    def subscribe_args(self, reason: str) -> dict[str, Any]:
        """``reason``: "first", "overflow" (same connection) or "reconnect"."""
        if reason == "first" or self.last_yielded is None:
            start = self.start
        elif reason == "overflow":
            start = self.last_yielded
        elif self.acked or self.start == "last_ack":
            start = "last_ack"
        else:
            start = self.last_yielded
        return {"aid": self.aid, "consumer": self.consumer, "kinds": list(self.kinds), "start": start}

    def take(self, raw: dict[str, Any]) -> tuple[str, Any, int] | None:
        """The (kind, data, cursor) to yield, or None for a duplicate already yielded."""
        cursor = raw.get("cursor")
        if isinstance(cursor, int) and self.last_yielded is not None and cursor <= self.last_yielded:
            return None
        if isinstance(cursor, int):
            self.last_yielded = cursor
        return raw.get("kind"), raw.get("data"), cursor  # type: ignore[return-value]

    def ack_args(self, cursor: int) -> dict[str, Any]:
        self.acked = True
        return {"aid": self.aid, "consumer": self.consumer, "cursor": cursor}


def _call_args(sid: int, method: str, params: Mapping[str, Any] | None, timeout: float | None,
               background: bool) -> tuple[dict[str, Any], float]:
    args: dict[str, Any] = {"session": sid, "method": method, "params": dict(params or {}),
                            "background": bool(background)}
    if timeout is not None:
        args["timeout"] = timeout
    return args, (DEFAULT_CALL_WAIT if timeout is None else timeout + CALL_MARGIN)


def _open_args(aid: str, slot_id: str, options: dict[str, Any]) -> dict[str, Any]:
    args: dict[str, Any] = {"aid": aid, "slot_id": slot_id}
    if options:
        args["options"] = options
    return args


def _notify_args(sid: int, method: str, params: Mapping[str, Any] | None, route: dict[str, Any],
                 timeout: float | None) -> tuple[dict[str, Any], float]:
    args: dict[str, Any] = {"session": sid, "method": method, "params": dict(params or {}),
                            **{k: v for k, v in route.items() if v is not None}}
    if timeout is not None:
        args["timeout"] = timeout
    return args, (DEFAULT_CALL_WAIT if timeout is None else timeout + CALL_MARGIN)


def _verify_args(data: bytes | str, signature: bytes | str, aid: str | None, cert: str | None,
                 cert_fingerprint: str | None, via: str | None) -> dict[str, Any]:
    args = {"data": data, "signature": signature, "aid": aid, "cert": cert, "cert_fingerprint": cert_fingerprint,
            "via": via}
    return {k: v for k, v in args.items() if v is not None}


def _resolve_args(aid: str, cert_fingerprint: str | None, via: str | None) -> dict[str, Any]:
    return {k: v for k, v in (("aid", aid), ("cert_fingerprint", cert_fingerprint), ("via", via)) if v is not None}


def _ready_wait(timeout: float | None) -> float | None:
    return None if timeout is None else timeout + CALL_MARGIN
