"""Apps' client for aund (layer: client_stub; imports msgpack, the stdlib and client_stub only).

Two front ends with the same names and shapes, over ONE sans-IO core (``_Core``: request ids,
pending replies, hello, event routing; ``_SubState``: where a subscription resumes):

    with Client() as aund:                          async with AsyncClient() as aund:
        aund.ensure_identity(aid)                       await aund.ensure_identity(aid)
        s = aund.session(aid, slot_id="main")           s = aund.session(aid, slot_id="main")
        s.wait_ready(timeout=10)                        await s.wait_ready(timeout=10)
        s.call("message.send", {...})                   await s.call("message.send", {...})
        for ev in s.events(consumer="bot"):             async for ev in s.events(consumer="bot"):
            handle(ev.kind, ev.data); ev.ack()              handle(ev.kind, ev.data); await ev.ack()

``Client`` is a blocking socket plus one reader thread that routes replies by request id, so it
may be used from several threads at once (one thread per ``EventStream``). ``AsyncClient`` is the
asyncio twin (one reader task). Neither keeps a nursery or task group in a context manager.

Socket path: the first argument, else ``$AUND_SOCKET``, else ``/run/aund/aund.sock`` as root,
else ``$XDG_RUNTIME_DIR/aund/aund.sock``, else ``~/.local/state/aund/run/aund.sock`` (falling back to
the system socket if only that exists): ``client_stub.localsock``. Before connecting the stub checks
who could have made the socket's directory, and after connecting who listens (``SO_PEERCRED``):
an untrusted directory or a listener that is not root, you or the directory's owner is refused
with ``DaemonUnavailable`` (the rule is in ``client_stub.localsock``).

Connections: a request made after the daemon connection dropped reconnects once (connect
timeout 5 s); requests that were in flight when it dropped raise ``DaemonUnavailable``. Sessions
re-open themselves on the new connection. An events iterator reconnects with bounded retries and
capped exponential backoff, resuming from the consumer's last ack (at least once); within one
iterator an event is yielded at most once (cursors only grow).

Errors: every method raises ``client_stub.errors`` classes: ``DaemonUnavailable`` (socket missing,
refused, lost; carries ``socket_path`` and ``hint``), ``RpcTimeout`` (no reply within the
client-side wait), and whatever the daemon sent (``PermissionDenied``, ``LimitsExceeded``,
``InvalidParams``, ``NotReady``, ``GatewayError`` ...). Using a closed client raises RuntimeError.
"""
from __future__ import annotations

import collections
import itertools
import os
import socket
import sys
import threading
import time
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
TYPE_CHECKING = False  # typing is for checkers only: apps should not pay for importing it
if TYPE_CHECKING:
    from typing import Any

from client_stub import localsock, wire
from client_stub.errors import (
    AundError, DaemonUnavailable, LimitsExceeded, ProtocolError, RpcTimeout, error_from_wire,
    error_to_wire,
)

__all__ = ["Client", "AsyncClient", "Session", "AsyncSession", "EventStream", "AsyncEventStream",
           "Event", "default_socket_path"]

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


class _LazyAsyncio:
    """``asyncio`` imported on first use: blocking apps and the CLI never pay its ~60 ms import."""

    def __getattr__(self, name: str) -> Any:
        import asyncio as module

        return getattr(module, name)


asyncio: Any = _LazyAsyncio()


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


class _Core:
    """Request/reply bookkeeping of one connection (no I/O): the front ends feed it received
    bytes and send the bytes it returns. Waiters are futures (``_ThreadWaiter`` or
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


# --- blocking front end ----------------------------------------------------------------------------
class _ThreadWaiter:
    """The reply slot of one blocking request (a minimal thread-safe future)."""

    __slots__ = ("_done", "_result", "_exc")

    def __init__(self) -> None:
        self._done = threading.Event()
        self._result: Any = None
        self._exc: BaseException | None = None

    def done(self) -> bool:
        return self._done.is_set()

    def set_result(self, result: Any) -> None:
        self._result = result
        self._done.set()

    def set_exception(self, exc: BaseException) -> None:
        self._exc = exc
        self._done.set()

    def result(self, timeout: float | None) -> Any:
        """The result; raises the exception set, or TimeoutError after ``timeout`` seconds."""
        if not self._done.wait(timeout):
            raise TimeoutError
        if self._exc is not None:
            raise self._exc
        return self._result


class _ThreadSink(_SinkState):
    def __init__(self) -> None:
        super().__init__()
        self.cond = threading.Condition(threading.Lock())

    def _wake(self) -> None:
        self.cond.notify_all()

    def deliver(self, event: dict[str, Any]) -> None:
        with self.cond:
            super().deliver(event)

    def end(self, error: AundError | None) -> None:
        with self.cond:
            super().end(error)

    def connection_lost(self) -> None:
        with self.cond:
            super().connection_lost()

    def wait(self, timeout: float | None) -> bool:
        with self.cond:
            return self.cond.wait_for(self.ready, timeout)


class _ThreadConn:
    """One socket to aund and its reader thread."""

    def __init__(self, path: Path, app: str, connect_timeout: float) -> None:
        self.path = path
        self.core = _Core(app)
        self.lock = threading.Lock()       # guards core
        self.send_lock = threading.Lock()  # one frame at a time on the socket
        try:
            owner = localsock.check_socket_dir(path)
        except localsock.UnsafeSocketPath as exc:
            raise _untrusted(path, exc) from None
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(connect_timeout)
        try:
            sock.connect(str(path))
        except (OSError, socket.timeout) as exc:
            sock.close()
            raise _unavailable(path, exc) from None
        try:
            localsock.check_peer(sock, path, owner)
        except localsock.UnsafeSocketPath as exc:
            sock.close()
            raise _untrusted(path, exc) from None
        sock.settimeout(None)
        self.sock = sock
        waiter = _ThreadWaiter()
        data = self.core.hello_request(waiter)  # registered before the reader can see a hang-up
        self.reader = threading.Thread(target=self._read_loop, name="aund-client-reader", daemon=True)
        self.reader.start()
        try:
            self._send(data)  # if it fails, the reader fails the waiter with the daemon's reason
            try:
                self.hello = waiter.result(connect_timeout)
            except TimeoutError:
                raise _unavailable(path, what="no hello reply within %ss from" % connect_timeout) from None
        except BaseException:
            self.close()
            raise

    @property
    def dead(self) -> bool:
        return self.core.error is not None

    def _read_loop(self) -> None:
        error: AundError | None = None
        try:
            while True:
                data = self.sock.recv(READ_SIZE)
                if not data:
                    break
                with self.lock:
                    self.core.receive(data)
        except ProtocolError as exc:
            error = exc
        except OSError:
            pass
        finally:
            with self.lock:
                self.core.lost(error or _unavailable(self.path, what="lost the connection to"))

    def _send(self, data: bytes) -> bool:
        """False if the socket is broken; the reader then fails every waiter with the reason
        (e.g. the daemon's ``err`` frame explaining why it hung up)."""
        try:
            with self.send_lock:
                self.sock.sendall(data)
        except OSError:
            return False
        return True

    def request(self, op: str, args: dict[str, Any], wait: float | None, sink: _SinkState | None = None) -> Any:
        waiter = _ThreadWaiter()
        with self.lock:
            request_id, data = self.core.request(op, args, waiter, sink)
        sent = self._send(data)
        try:
            return waiter.result(wait if sent else BROKEN_WAIT)
        except TimeoutError:
            if not sent:
                raise _unavailable(self.path, what="lost the connection to") from None
            raise RpcTimeout(f"{op}: no reply from aund within {wait}s", data={"op": op}) from None
        finally:
            with self.lock:
                self.core.forget(request_id)

    def close(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        if self.reader is not threading.current_thread():
            self.reader.join(5.0)
        self.sock.close()


class Client:
    """Blocking client; safe to share between threads. See the module docstring.

    ``socket_path``: default ``default_socket_path()``; ``app``: the name in ``hello`` (default
    the program name); ``connect_timeout``: socket connect + hello; ``timeout``: the wait for an
    ordinary op's reply (calls wait their own timeout + a margin).
    """

    def __init__(self, socket_path: str | os.PathLike[str] | None = None, *, app: str | None = None,
                 connect_timeout: float = DEFAULT_CONNECT_TIMEOUT, timeout: float = DEFAULT_TIMEOUT,
                 reconnect_attempts: int = RECONNECT_ATTEMPTS) -> None:
        self.socket_path = Path(socket_path) if socket_path is not None else default_socket_path()
        self.app = app or _default_app_name()
        self.connect_timeout, self.timeout = connect_timeout, timeout
        self.reconnect_attempts = reconnect_attempts
        self._conn: _ThreadConn | None = None
        self._lock = threading.Lock()
        self._closed = False

    def __repr__(self) -> str:
        state = "closed" if self._closed else "connected" if self._conn and not self._conn.dead else "idle"
        return f"<Client {self.socket_path} {state}>"

    def connect(self) -> "Client":
        """Connect and say hello now (otherwise the first request does). Errors: DaemonUnavailable."""
        self._connection()
        return self

    def __enter__(self) -> "Client":
        return self.connect()

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    def close(self) -> None:
        """Close the connection; the daemon releases every session and subscription of it."""
        with self._lock:
            self._closed = True
            conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()

    @property
    def hello(self) -> dict[str, Any]:
        """The daemon's hello reply (versions, ops, features, limits) of the current connection."""
        return self._connection().hello

    def _connection(self) -> _ThreadConn:
        with self._lock:
            if self._closed:
                raise RuntimeError("this aund Client is closed")
            if self._conn is None or self._conn.dead:
                if self._conn is not None:
                    self._conn.close()
                    self._conn = None
                self._conn = _ThreadConn(self.socket_path, self.app, self.connect_timeout)
            return self._conn

    def request(self, op: str, args: dict[str, Any] | None = None, *, timeout: float | None = None) -> Any:
        """Send any op and return its result (``timeout``: the client-side wait, default ``self.timeout``)."""
        return self._connection().request(op, args or {}, self.timeout if timeout is None else timeout)

    def ping(self) -> float:
        """Round-trip time to the daemon, in seconds."""
        t0 = time.monotonic()
        self.request("ping")
        return time.monotonic() - t0

    def status(self) -> dict[str, Any]:
        return self.request("status")

    def ensure_identity(self, aid: str) -> dict[str, Any]:
        """Load the AID, registering it only if absent: ``{aid, cert_fingerprint, ...}``."""
        return self.request("identity.ensure", {"aid": aid}, timeout=max(self.timeout, ENSURE_WAIT))

    def list_identities(self) -> list[dict[str, Any]]:
        """The identities this app may use."""
        return self.request("identity.list")["identities"]

    def agent_md(self, aid: str) -> dict[str, Any]:
        """The AID's published agent.md: ``{aid, content, etag}`` (``ResourceNotExistError`` if none)."""
        return self.request("agent_md.get", {"aid": aid})

    def show_identity(self, aid: str) -> dict[str, Any]:
        """Certificate (fingerprint, subject, issuer, validity), device id, gateways, links, inbox
        depth and this user's durable consumers (name, cursor) of an identity aund holds."""
        return self.request("identity.show", {"aid": aid})

    def disable_identity(self, aid: str) -> dict[str, Any]:
        """Make aund stop holding ``aid`` (kept across restarts, nothing deleted): its links close,
        sessions and subscriptions are refused with ``PermissionDenied`` (``data.reason``
        "identity_disabled"): ``{aid, disabled, changed, links_closed}``."""
        return self.request("identity.disable", {"aid": aid})

    def enable_identity(self, aid: str) -> dict[str, Any]:
        """Hold a disabled ``aid`` again (held and configured links start again):
        ``{aid, disabled, changed, connecting}``."""
        return self.request("identity.enable", {"aid": aid})

    def reset_consumer(self, aid: str, consumer: str, cursor: int = 0) -> dict[str, Any]:
        """Set this user's consumer of ``aid`` to ``cursor`` (0: read everything again)."""
        return self.request("consumer.reset", {"aid": aid, "consumer": consumer, "cursor": cursor})

    def restart_link(self, aid: str, slot_id: str = "main") -> dict[str, Any]:
        """Start the (AID, slot) link again if it stopped for good (kicked by another instance,
        refused): ``{aid, slot_id, restarted, state}``; a running link is left as it is."""
        return self.request("link.restart", {"aid": aid, "slot_id": slot_id})

    def set_agent_md(self, aid: str, text: str) -> dict[str, Any]:
        """Replace the AID's agent.md with ``text`` (markdown with YAML front matter; the daemon signs
        it with the AID key): ``{aid, etag, content}``. ``InvalidParams`` (``data.field``) for a
        document that does not validate; the published one then stays."""
        return self.request("agent_md.set", {"aid": aid, "content": text}, timeout=max(self.timeout, ENSURE_WAIT))

    def sign(self, aid: str, data: bytes | str) -> dict[str, Any]:
        """Sign ``data`` with the AID key (the hash its curve calls for; the key stays in aund):
        ``{aid, signature (DER bytes), signature_b64, cert_fingerprint, algorithm}``."""
        return self.request("identity.sign", {"aid": aid, "data": data})

    def verify(self, data: bytes | str, signature: bytes | str, *, aid: str | None = None, cert: str | None = None,
               cert_fingerprint: str | None = None, via: str | None = None) -> dict[str, Any]:
        """Check ``signature`` (bytes or base64) over ``data`` with the verified certificate of
        ``aid`` (the one ``cert_fingerprint`` names, else its current one) or ``cert`` (PEM):
        ``{valid, aid, cert_fingerprint}``. An untrusted or revoked certificate raises."""
        return self.request("identity.verify", _verify_args(data, signature, aid, cert, cert_fingerprint, via),
                            timeout=max(self.timeout, ENSURE_WAIT))

    def resolve_peer(self, aid: str, cert_fingerprint: str | None = None, via: str | None = None) -> dict[str, Any]:
        """A peer's certificate, verified (chain to a trusted root, CN, CRL/OCSP), and its gateway:
        ``{aid, cert, cert_fingerprint, public_key, serial, issuer, not_before, not_after, gateway}``."""
        return self.request("peer.resolve", _resolve_args(aid, cert_fingerprint, via),
                            timeout=max(self.timeout, ENSURE_WAIT))

    def renew_identity(self, aid: str, *, rekey: bool = False) -> dict[str, Any]:
        """A new certificate for the AID now (aund also renews by itself before expiry); ``rekey``:
        a new key too. Old keys and certificates are kept: ``{aid, cert_fingerprint, old_cert_fingerprint, ...}``."""
        return self.request("identity.renew", {"aid": aid, "rekey": rekey}, timeout=max(self.timeout, ENSURE_WAIT))

    def session(self, aid: str, slot_id: str = "main", options: Mapping[str, Any] | None = None) -> "Session":
        """A handle on the daemon's link for (aid, slot_id); opened on first use. ``options`` are
        the SDK's ``connect()`` options a link takes (``delivery_mode``: "fanout" | "queue",
        ``queue_routing``, ``affinity_ttl_ms``); options that conflict with the running link raise
        ``InvalidParams``."""
        return Session(self, aid, slot_id, options)


class Session:
    """An app's hold on (aid, slot_id); re-opened by itself after a reconnect."""

    def __init__(self, client: Client, aid: str, slot_id: str = "main",
                 options: Mapping[str, Any] | None = None) -> None:
        self.client, self.aid, self.slot_id = client, aid, slot_id
        self.options = dict(options or {})
        self.info: dict[str, Any] = {}
        self._conn: _ThreadConn | None = None
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"<Session {self.aid}/{self.slot_id} session={self.info.get('session')}>"

    def __enter__(self) -> "Session":
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    def _open(self) -> tuple[_ThreadConn, int]:
        conn = self.client._connection()
        with self._lock:
            if self._conn is not conn:
                self.info = conn.request("session.open", _open_args(self.aid, self.slot_id, self.options),
                                         self.client.timeout)
                self._conn = conn
            return conn, self.info["session"]

    def open(self) -> dict[str, Any]:
        """Open now (otherwise the first op does): ``{session, aid, slot_id, state}``."""
        self._open()
        return self.info

    def wait_ready(self, timeout: float | None = None) -> dict[str, Any]:
        """Wait until the link is ready: ``{aid, slot_id, state}``.

        Errors: NotReady once ``timeout`` passed; GatewayUnavailable if the link failed for good.
        """
        conn, sid = self._open()
        args = {"session": sid} if timeout is None else {"session": sid, "timeout": timeout}
        return conn.request("session.wait_ready", args, _ready_wait(timeout))

    def call(self, method: str, params: Mapping[str, Any] | None = None, timeout: float | None = None,
             background: bool = False) -> Any:
        """One gateway RPC as this AID. Errors: RpcTimeout, GatewayError, LimitsExceeded, ..."""
        conn, sid = self._open()
        args, wait = _call_args(sid, method, params, timeout, background)
        return conn.request("call", args, wait)

    def notify(self, method: str, params: Mapping[str, Any] | None = None, *, to: str | None = None,
               group_id: str | None = None, device_id: str | None = None, slot_id: str | None = None,
               ttl_ms: int | None = None, timeout: float | None = None) -> dict[str, Any]:
        """A notification (no answer, no delivery guarantee, online peers only), as the SDK's
        ``notify``: ``event/app.*`` to ``to`` (optionally one ``device_id``/``slot_id``) or to a
        ``group_id``'s members, or ``notification/...`` to the gateway. Returns once it is sent."""
        conn, sid = self._open()
        route = {"to": to, "group_id": group_id, "device_id": device_id, "slot_id": slot_id, "ttl_ms": ttl_ms}
        args, wait = _notify_args(sid, method, params, route, timeout)
        return conn.request("session.notify", args, wait)

    @property
    def storage(self) -> Any:
        """This AID's AUN Storage through aund (client_stub.storage.Storage)."""
        from client_stub.storage import Storage
        return Storage(self)

    def set_protected_headers(self, headers: Mapping[str, str]) -> None:
        conn, sid = self._open()
        conn.request("set_protected_headers", {"session": sid, "headers": dict(headers)}, self.client.timeout)

    def invalidate_prekey_cache(self, peer_aid: str) -> None:
        conn, sid = self._open()
        conn.request("invalidate_prekey_cache", {"session": sid, "peer_aid": peer_aid}, self.client.timeout)

    def events(self, consumer: str, kinds: tuple[str, ...] | list[str] = ("message.received",),
               start: str | int = "last_ack") -> "EventStream":
        """Iterate this AID's events as ``consumer`` (subscribes on first ``next()``)."""
        return EventStream(self.client, _SubState(self.aid, consumer, tuple(kinds), start))

    def close(self) -> None:
        """Let go of the link (the daemon keeps on-demand links a while for reuse)."""
        with self._lock:
            conn, self._conn = self._conn, None
        if conn is not None and not conn.dead:
            try:
                conn.request("session.close", {"session": self.info["session"]}, self.client.timeout)
            except DaemonUnavailable:
                pass


class EventStream:
    """Blocking iterator of ``Event``s for one consumer; use from one thread; ``close()`` when done."""

    def __init__(self, client: Client, state: _SubState) -> None:
        self.client, self.state = client, state
        self._conn: _ThreadConn | None = None
        self._sink: _ThreadSink | None = None
        self._closed = False

    def __iter__(self) -> "EventStream":
        return self

    def __enter__(self) -> "EventStream":
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    def open(self) -> "EventStream":
        """Subscribe now rather than on the first ``get()`` (matters with ``start="now"``)."""
        if self._sink is None and not self._closed:
            self._subscribe("first" if self.state.sub is None else "reconnect")
        return self

    def __next__(self) -> Event:
        event = self.get()
        if event is None:
            raise StopIteration
        return event

    def get(self, timeout: float | None = None) -> Event | None:
        """The next event; None if the stream ended (closed) or ``timeout`` passed without one.

        Errors: the error that ended the subscription on the daemon's side; DaemonUnavailable once
        reconnecting failed ``client.reconnect_attempts`` times in a row.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self._closed:
            if self._sink is None:
                self._subscribe("first" if self.state.sub is None else "reconnect")
            sink = self._sink
            assert sink is not None
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            if not sink.wait(remaining):
                return None
            with sink.cond:  # the flags are read together with the queue they follow
                raw = sink.events.popleft() if sink.events else None
                ended, overflowed, lost = sink.ended, sink.overflowed, sink.lost
            if raw is not None:
                taken = self.state.take(raw)
                if taken is not None:
                    return Event(*taken, acker=self._ack)
            elif ended:
                self._sink = None
                self._closed = True
                if sink.end_error is not None:
                    raise sink.end_error
            elif overflowed:
                self._drop()
                self._subscribe("overflow")
            elif lost:
                self._sink = None
        return None

    def _subscribe(self, reason: str) -> None:
        attempts = 0
        while True:
            try:
                conn = self.client._connection()
                sink = _ThreadSink()
                result = conn.request("subscribe", self.state.subscribe_args(reason), self.client.timeout, sink)
                self._conn, self._sink, self.state.sub = conn, sink, result["sub"]
                return
            except DaemonUnavailable:
                if attempts >= self.client.reconnect_attempts:
                    raise
                time.sleep(_backoff(attempts))
                attempts += 1
                reason = "reconnect" if reason == "overflow" else reason

    def _drop(self) -> None:
        conn, sub = self._conn, self.state.sub
        self._sink = None
        if conn is None or conn.dead:
            return
        with conn.lock:
            conn.core.drop_sink(sub)
        try:
            conn.request("unsubscribe", {"sub": sub}, self.client.timeout)
        except AundError:
            pass  # gone already (connection or subscription): nothing left to release

    def _ack(self, cursor: int | None) -> None:
        if cursor is not None:  # live (non-durable) events have no cursor: nothing to ack
            self.client.request("ack", self.state.ack_args(cursor))

    def close(self) -> None:
        """Unsubscribe (the consumer's acks stay with the daemon)."""
        if not self._closed:
            self._closed = True
            if self._sink is not None:
                self._drop()


# --- asyncio front end -----------------------------------------------------------------------------
class _AsyncSink(_SinkState):
    def __init__(self) -> None:
        super().__init__()
        self.flag = asyncio.Event()

    def _wake(self) -> None:
        self.flag.set()

    async def wait(self) -> None:
        while not self.ready():
            self.flag.clear()
            await self.flag.wait()


class _AsyncConn:
    """One socket to aund and its reader task (all on one event loop)."""

    def __init__(self, path: Path, app: str) -> None:
        self.path = path
        self.core = _Core(app)
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None
        self.task: asyncio.Task[None] | None = None
        self.hello: dict[str, Any] = {}

    @classmethod
    async def open(cls, path: Path, app: str, connect_timeout: float) -> "_AsyncConn":
        self = cls(path, app)
        try:
            owner = localsock.check_socket_dir(path)
        except localsock.UnsafeSocketPath as exc:
            raise _untrusted(path, exc) from None
        try:
            self.reader, self.writer = await asyncio.wait_for(asyncio.open_unix_connection(str(path)),
                                                              connect_timeout)
        except (OSError, TimeoutError) as exc:
            raise _unavailable(path, exc) from None
        try:
            localsock.check_peer(self.writer.get_extra_info("socket"), path, owner)
        except localsock.UnsafeSocketPath as exc:
            await self.close()
            raise _untrusted(path, exc) from None
        waiter = asyncio.get_running_loop().create_future()
        data = self.core.hello_request(waiter)  # registered before the reader can see a hang-up
        self.task = asyncio.get_running_loop().create_task(self._read_loop())
        try:
            await self._send(data)  # on failure the reader fails the waiter
            try:
                self.hello = await asyncio.wait_for(waiter, connect_timeout)
            except TimeoutError:
                raise _unavailable(path, what="no hello reply within %ss from" % connect_timeout) from None
        except BaseException:
            await self.close()
            raise
        return self

    @property
    def dead(self) -> bool:
        return self.core.error is not None

    async def _read_loop(self) -> None:
        assert self.reader is not None
        error: AundError | None = None
        try:
            while True:
                data = await self.reader.read(READ_SIZE)
                if not data:
                    break
                self.core.receive(data)
        except ProtocolError as exc:
            error = exc
        except OSError:
            pass
        finally:
            self.core.lost(error or _unavailable(self.path, what="lost the connection to"))

    async def _send(self, data: bytes) -> bool:
        """As ``_ThreadConn._send``."""
        assert self.writer is not None
        try:
            self.writer.write(data)
            await self.writer.drain()
        except OSError:
            return False
        return True

    async def request(self, op: str, args: dict[str, Any], wait: float | None, sink: _SinkState | None = None) -> Any:
        waiter = asyncio.get_running_loop().create_future()
        request_id, data = self.core.request(op, args, waiter, sink)
        sent = await self._send(data)
        try:
            return await asyncio.wait_for(waiter, wait if sent else BROKEN_WAIT)
        except TimeoutError:
            if not sent:
                raise _unavailable(self.path, what="lost the connection to") from None
            raise RpcTimeout(f"{op}: no reply from aund within {wait}s", data={"op": op}) from None
        finally:
            self.core.forget(request_id)

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            try:
                await self.writer.wait_closed()
            except OSError:
                pass
        if self.task is not None:
            self.task.cancel()
            try:
                await self.task
            except asyncio.CancelledError:
                pass


class AsyncClient:
    """The asyncio twin of ``Client`` (same arguments, same methods as coroutines)."""

    def __init__(self, socket_path: str | os.PathLike[str] | None = None, *, app: str | None = None,
                 connect_timeout: float = DEFAULT_CONNECT_TIMEOUT, timeout: float = DEFAULT_TIMEOUT,
                 reconnect_attempts: int = RECONNECT_ATTEMPTS) -> None:
        self.socket_path = Path(socket_path) if socket_path is not None else default_socket_path()
        self.app = app or _default_app_name()
        self.connect_timeout, self.timeout = connect_timeout, timeout
        self.reconnect_attempts = reconnect_attempts
        self._conn: _AsyncConn | None = None
        self._lock: asyncio.Lock | None = None
        self._closed = False

    def __repr__(self) -> str:
        state = "closed" if self._closed else "connected" if self._conn and not self._conn.dead else "idle"
        return f"<AsyncClient {self.socket_path} {state}>"

    async def connect(self) -> "AsyncClient":
        await self._connection()
        return self

    async def __aenter__(self) -> "AsyncClient":
        return await self.connect()

    async def __aexit__(self, *exc_info: Any) -> None:
        await self.close()

    async def close(self) -> None:
        self._closed = True
        conn, self._conn = self._conn, None
        if conn is not None:
            await conn.close()

    @property
    def hello(self) -> dict[str, Any]:
        if self._conn is None:
            raise RuntimeError("not connected yet: await connect() first")
        return self._conn.hello

    async def _connection(self) -> _AsyncConn:
        if self._lock is None:
            self._lock = asyncio.Lock()
        async with self._lock:
            if self._closed:
                raise RuntimeError("this aund AsyncClient is closed")
            if self._conn is None or self._conn.dead:
                if self._conn is not None:
                    await self._conn.close()
                    self._conn = None
                self._conn = await _AsyncConn.open(self.socket_path, self.app, self.connect_timeout)
            return self._conn

    async def request(self, op: str, args: dict[str, Any] | None = None, *, timeout: float | None = None) -> Any:
        conn = await self._connection()
        return await conn.request(op, args or {}, self.timeout if timeout is None else timeout)

    async def ping(self) -> float:
        t0 = time.monotonic()
        await self.request("ping")
        return time.monotonic() - t0

    async def status(self) -> dict[str, Any]:
        return await self.request("status")

    async def ensure_identity(self, aid: str) -> dict[str, Any]:
        return await self.request("identity.ensure", {"aid": aid}, timeout=max(self.timeout, ENSURE_WAIT))

    async def list_identities(self) -> list[dict[str, Any]]:
        return (await self.request("identity.list"))["identities"]

    async def agent_md(self, aid: str) -> dict[str, Any]:
        return await self.request("agent_md.get", {"aid": aid})

    async def show_identity(self, aid: str) -> dict[str, Any]:
        return await self.request("identity.show", {"aid": aid})

    async def disable_identity(self, aid: str) -> dict[str, Any]:
        return await self.request("identity.disable", {"aid": aid})

    async def enable_identity(self, aid: str) -> dict[str, Any]:
        return await self.request("identity.enable", {"aid": aid})

    async def reset_consumer(self, aid: str, consumer: str, cursor: int = 0) -> dict[str, Any]:
        return await self.request("consumer.reset", {"aid": aid, "consumer": consumer, "cursor": cursor})

    async def restart_link(self, aid: str, slot_id: str = "main") -> dict[str, Any]:
        return await self.request("link.restart", {"aid": aid, "slot_id": slot_id})

    async def set_agent_md(self, aid: str, text: str) -> dict[str, Any]:
        return await self.request("agent_md.set", {"aid": aid, "content": text}, timeout=max(self.timeout, ENSURE_WAIT))

    async def sign(self, aid: str, data: bytes | str) -> dict[str, Any]:
        return await self.request("identity.sign", {"aid": aid, "data": data})

    async def verify(self, data: bytes | str, signature: bytes | str, *, aid: str | None = None,
                     cert: str | None = None, cert_fingerprint: str | None = None,
                     via: str | None = None) -> dict[str, Any]:
        return await self.request("identity.verify", _verify_args(data, signature, aid, cert, cert_fingerprint, via),
                                  timeout=max(self.timeout, ENSURE_WAIT))

    async def resolve_peer(self, aid: str, cert_fingerprint: str | None = None,
                           via: str | None = None) -> dict[str, Any]:
        return await self.request("peer.resolve", _resolve_args(aid, cert_fingerprint, via),
                                  timeout=max(self.timeout, ENSURE_WAIT))

    async def renew_identity(self, aid: str, *, rekey: bool = False) -> dict[str, Any]:
        return await self.request("identity.renew", {"aid": aid, "rekey": rekey},
                                  timeout=max(self.timeout, ENSURE_WAIT))

    def session(self, aid: str, slot_id: str = "main", options: Mapping[str, Any] | None = None) -> "AsyncSession":
        return AsyncSession(self, aid, slot_id, options)


class AsyncSession:
    """The asyncio twin of ``Session``."""

    def __init__(self, client: AsyncClient, aid: str, slot_id: str = "main",
                 options: Mapping[str, Any] | None = None) -> None:
        self.client, self.aid, self.slot_id = client, aid, slot_id
        self.options = dict(options or {})
        self.info: dict[str, Any] = {}
        self._conn: _AsyncConn | None = None
        self._lock = asyncio.Lock()

    def __repr__(self) -> str:
        return f"<AsyncSession {self.aid}/{self.slot_id} session={self.info.get('session')}>"

    async def __aenter__(self) -> "AsyncSession":
        return self

    async def __aexit__(self, *exc_info: Any) -> None:
        await self.close()

    async def _open(self) -> tuple[_AsyncConn, int]:
        conn = await self.client._connection()
        async with self._lock:
            if self._conn is not conn:
                self.info = await conn.request("session.open", _open_args(self.aid, self.slot_id, self.options),
                                               self.client.timeout)
                self._conn = conn
            return conn, self.info["session"]

    async def open(self) -> dict[str, Any]:
        await self._open()
        return self.info

    async def wait_ready(self, timeout: float | None = None) -> dict[str, Any]:
        conn, sid = await self._open()
        args = {"session": sid} if timeout is None else {"session": sid, "timeout": timeout}
        return await conn.request("session.wait_ready", args, _ready_wait(timeout))

    async def call(self, method: str, params: Mapping[str, Any] | None = None, timeout: float | None = None,
                   background: bool = False) -> Any:
        conn, sid = await self._open()
        args, wait = _call_args(sid, method, params, timeout, background)
        return await conn.request("call", args, wait)

    async def notify(self, method: str, params: Mapping[str, Any] | None = None, *, to: str | None = None,
                     group_id: str | None = None, device_id: str | None = None, slot_id: str | None = None,
                     ttl_ms: int | None = None, timeout: float | None = None) -> dict[str, Any]:
        conn, sid = await self._open()
        route = {"to": to, "group_id": group_id, "device_id": device_id, "slot_id": slot_id, "ttl_ms": ttl_ms}
        args, wait = _notify_args(sid, method, params, route, timeout)
        return await conn.request("session.notify", args, wait)

    @property
    def storage(self) -> Any:
        """The awaitable twin of ``Session.storage`` (client_stub.storage.AsyncStorage)."""
        from client_stub.storage import AsyncStorage
        return AsyncStorage(self)

    async def set_protected_headers(self, headers: Mapping[str, str]) -> None:
        conn, sid = await self._open()
        await conn.request("set_protected_headers", {"session": sid, "headers": dict(headers)}, self.client.timeout)

    async def invalidate_prekey_cache(self, peer_aid: str) -> None:
        conn, sid = await self._open()
        await conn.request("invalidate_prekey_cache", {"session": sid, "peer_aid": peer_aid}, self.client.timeout)

    def events(self, consumer: str, kinds: tuple[str, ...] | list[str] = ("message.received",),
               start: str | int = "last_ack") -> "AsyncEventStream":
        return AsyncEventStream(self.client, _SubState(self.aid, consumer, tuple(kinds), start))

    async def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None and not conn.dead:
            try:
                await conn.request("session.close", {"session": self.info["session"]}, self.client.timeout)
            except DaemonUnavailable:
                pass


class AsyncEventStream:
    """The asyncio twin of ``EventStream`` (``async for``; ``await stream.aclose()``)."""

    def __init__(self, client: AsyncClient, state: _SubState) -> None:
        self.client, self.state = client, state
        self._conn: _AsyncConn | None = None
        self._sink: _AsyncSink | None = None
        self._closed = False

    def __aiter__(self) -> "AsyncEventStream":
        return self

    async def __aenter__(self) -> "AsyncEventStream":
        return self

    async def __aexit__(self, *exc_info: Any) -> None:
        await self.aclose()

    async def open(self) -> "AsyncEventStream":
        """Subscribe now rather than on the first ``get()`` (matters with ``start="now"``)."""
        if self._sink is None and not self._closed:
            await self._subscribe("first" if self.state.sub is None else "reconnect")
        return self

    async def __anext__(self) -> Event:
        event = await self.get()
        if event is None:
            raise StopAsyncIteration
        return event

    async def get(self, timeout: float | None = None) -> Event | None:
        """As ``EventStream.get``."""
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        while not self._closed:
            if self._sink is None:
                await self._subscribe("first" if self.state.sub is None else "reconnect")
            sink = self._sink
            assert sink is not None
            try:
                await asyncio.wait_for(sink.wait(), None if deadline is None else max(0.0, deadline - loop.time()))
            except TimeoutError:
                return None
            if sink.events:
                taken = self.state.take(sink.events.popleft())
                if taken is not None:
                    return Event(*taken, acker=self._ack)
            elif sink.ended:
                self._sink = None
                self._closed = True
                if sink.end_error is not None:
                    raise sink.end_error
            elif sink.overflowed:
                await self._drop()
                await self._subscribe("overflow")
            elif sink.lost:
                self._sink = None
        return None

    async def _subscribe(self, reason: str) -> None:
        attempts = 0
        while True:
            try:
                conn = await self.client._connection()
                sink = _AsyncSink()
                result = await conn.request("subscribe", self.state.subscribe_args(reason), self.client.timeout, sink)
                self._conn, self._sink, self.state.sub = conn, sink, result["sub"]
                return
            except DaemonUnavailable:
                if attempts >= self.client.reconnect_attempts:
                    raise
                await asyncio.sleep(_backoff(attempts))
                attempts += 1
                reason = "reconnect" if reason == "overflow" else reason

    async def _drop(self) -> None:
        conn, sub = self._conn, self.state.sub
        self._sink = None
        if conn is None or conn.dead:
            return
        conn.core.drop_sink(sub)
        try:
            await conn.request("unsubscribe", {"sub": sub}, self.client.timeout)
        except AundError:
            pass

    async def _ack(self, cursor: int | None) -> None:
        if cursor is not None:  # live (non-durable) events have no cursor: nothing to ack
            await self.client.request("ack", self.state.ack_args(cursor))

    async def aclose(self) -> None:
        if not self._closed:
            self._closed = True
            if self._sink is not None:
                await self._drop()
