"""Broker layer: one app connection (``AppConnection``): the hello handshake, the ONE op dispatch table,
per-app quotas, subscription pumps and the coalescing writer. Imports trio, structlog and
client_stub (wire + errors) only; reaches the daemon solely through ``backend.Backend``.

Tasks of one connection (all in its own nursery, so a disconnect cancels every one of them):

- the reader (``_read_loop``): decodes frames, runs synchronous ops inline and spawns a task per
  asynchronous op, so many requests are in flight at once; it takes no new request while the
  outbox is full (an app that does not read its answers stops being read);
- a hello watchdog: no ``hello`` within ``Limits.hello_timeout`` closes the connection;
- the writer (``_write_loop``): drains the bounded ``Outbox``, coalescing every queued frame into
  one ``send_all``;
- one pump per subscription: pulls from the backend's iterator and waits while *this* app's
  outbox is full, so a slow app only ever slows itself. An outbox that stays full for
  ``Limits.stall_timeout`` closes the connection; the events stay in the durable inbox.

Policy: every op that names an AID normalises it first and asks the policy about the normalised
name, which is the one it then uses. After a policy reload the server calls ``enforce()``: what
the app may no longer use is taken away (its sessions are released, its subscriptions end with
``subscription.end`` carrying ``PermissionDenied``, its requests in flight for that AID answer
``PermissionDenied``); ``revoke()`` does all of that for every AID and then closes the connection
with a connection-level ``PermissionDenied`` (the uid is no longer admitted at all).

Error handling: an op raises ``AundError`` subclasses only; they become ``err`` replies and the
connection stays open. A protocol violation (undecodable/oversize frame, a bad frame field, a
request before ``hello``, no common protocol) gets one ``err`` frame, one log line, and closes this
connection. Anything else is a bug: it propagates and the server closes this connection only.
"""
from __future__ import annotations

import base64
import binascii
import collections
import contextlib
import inspect
import itertools
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import structlog
import trio

from aund import params
from aund.aun.budget import holding
from aund.broker.backend import AppIdentity, InboxEvent, LinkLease
from aund.broker.limits import AppStatistics
from client_stub import wire
from client_stub.errors import (
    AundError, InvalidParams, LimitsExceeded, NotReady, PermissionDenied, ProtocolError,
    ResourceNotExistError, RpcTimeout, UnknownOp, error_to_wire,
)

if TYPE_CHECKING:
    from aund.broker.server import BrokerServer

log = structlog.get_logger("aund.broker")

PRE_HELLO_MAX_FRAME = 64 * 1024  # a hello is tiny; nothing bigger is buffered before it
MIN_NEGOTIATED_FRAME = 4096
READ_SIZE = 64 * 1024
WRITE_BATCH = 256 * 1024  # coalesce queued frames up to this many bytes per send_all
CALL_GRACE = 5.0  # the broker gives up on a backend call this long after its own timeout
FLUSH_GRACE = 1.0  # how long queued frames may still go out once the app stopped sending
FLUSH_ON = ("eof", "protocol_violation", "protocol_mismatch")
MAX_LOGGED_KEYS = 256  # per connection: distinct "log once" keys remembered
BROKER_FEATURES = ("subscriptions", "subscription.end", "ack.by_sub", "ack.by_consumer",
                   "session.wait_ready", "event.undeliverable")
SUBSCRIPTION_END_KIND = "subscription.end"
UNDELIVERABLE_KIND = "event.undeliverable"
START_WORDS = ("last_ack", "now")
MAX_HEADERS = 64
# names the sender's SDK or the receiver's view set: an app giving them would forge what they mean
RESERVED_HEADERS = frozenset({"_auth", "from", "to", "sender", "sender_aid", "sender_device_id", "message_id",
                              "group_id", "timestamp", "sdk_lang", "sdk_version", "verified", "encrypted"})
SIGN_MAX_BYTES = 256 * 1024  # identity.sign / verify: data signed in one go (hash larger data first)
AGENT_MD_MAX_CHARS = 64 * 1024  # far above the 4 KiB card: the daemon's check says what is too large
MAX_REVOKED_SESSIONS = 1024  # per connection: session ids remembered as taken away by the policy


class Outbox:
    """Encoded frames waiting for the writer, bounded by bytes (sans-I/O apart from parking).

    ``bytes`` counts frames queued *and* the batch being written, until ``sent()``.
    Event pumps ``wait_room()`` while the box is over ``limit``; replies use ``put_nowait()``, which
    refuses (returns False: close the connection) only past ``hard_limit`` = limit + one frame.
    """

    def __init__(self, limit: int, slack: int) -> None:
        self.limit = limit
        self.hard_limit = limit + slack
        self.bytes = 0
        self._frames: collections.deque[bytes] = collections.deque()
        self._writer = trio.lowlevel.ParkingLot()
        self._room = trio.lowlevel.ParkingLot()

    def __len__(self) -> int:
        return len(self._frames)

    def has_room(self, size: int) -> bool:
        return self.bytes == 0 or self.bytes + size <= self.limit

    def put_nowait(self, data: bytes) -> bool:
        if self.bytes and self.bytes + len(data) > self.hard_limit:
            return False
        self._frames.append(data)
        self.bytes += len(data)
        self._writer.unpark_all()
        return True

    async def wait_room(self, size: int) -> None:
        while not self.has_room(size):
            await self._room.park()

    async def wait_flushed(self) -> None:
        while self.bytes:
            await self._room.park()

    async def next_batch(self) -> bytes:
        while not self._frames:
            await self._writer.park()
        chunks, size = [], 0
        while self._frames and (not chunks or size + len(self._frames[0]) <= WRITE_BATCH):
            chunk = self._frames.popleft()
            chunks.append(chunk)
            size += len(chunk)
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    def sent(self, n: int) -> None:
        self.bytes -= n
        self._room.unpark_all()


@dataclass(eq=False)
class Subscription:
    id: int
    aid: str
    consumer: str
    kinds: tuple[str, ...]
    iterator: Any
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    closed: bool = False
    delivered: int = 0
    end_error: AundError | None = None  # why the broker ended it (the policy no longer allows it)


@dataclass(frozen=True)
class CallBorrower:
    """What holds a global call token: ``CapacityLimiter.statistics().borrowers`` lists these."""

    conn_id: int
    app: str
    pid: int
    call: int


class _Closing(Exception):
    """Internal: stop reading and close this connection (after flushing what is queued)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


# --- argument checks (each raises InvalidParams naming the argument) ---------------------------
_MISSING: Any = params.MISSING


def _get(args: dict[str, Any], name: str, default: Any) -> Any:
    with params.fail_as(params.invalid_params):
        return params.get(args, name, default)


def _str(args: dict[str, Any], name: str, default: Any = _MISSING, *, max_len: int = 256) -> str:
    with params.fail_as(params.invalid_params):
        return params.string(args, name, default, max_len=max_len, empty=False)


def _int(args: dict[str, Any], name: str, default: Any = _MISSING, *, minimum: int = 0) -> int:
    with params.fail_as(params.invalid_params):
        return params.integer(args, name, default, minimum=minimum, maximum=(1 << 63) - 1)


def _bool(args: dict[str, Any], name: str, default: bool) -> bool:
    with params.fail_as(params.invalid_params):
        return params.boolean(args, name, default)


def _timeout(args: dict[str, Any], name: str, maximum: float) -> float | None:
    with params.fail_as(params.invalid_params):
        return params.number(args, name, None, maximum=maximum)


def _map(args: dict[str, Any], name: str, default: Any = _MISSING) -> dict[str, Any]:
    with params.fail_as(params.invalid_params):
        return params.mapping(args, name, default)


def _bytes(args: dict[str, Any], name: str, *, max_len: int, b64: bool = False) -> bytes:
    """Bytes as given (msgpack bin), or a string: UTF-8 text, or base64 when `b64`."""
    value = _get(args, name, _MISSING)
    if isinstance(value, str):
        if b64:
            try:
                value = base64.b64decode(value, validate=True)
            except (binascii.Error, ValueError):
                raise InvalidParams(f"argument {name!r} must be bytes or base64", data={"arg": name}) from None
        else:
            value = value.encode("utf-8")
    if not isinstance(value, bytes) or len(value) > max_len:
        raise InvalidParams(f"argument {name!r} must be bytes (or a string) of at most {max_len} bytes",
                            data={"arg": name})
    return value


def _opt_str(args: dict[str, Any], name: str, *, max_len: int = 256) -> str | None:
    return None if args.get(name) is None else _str(args, name, max_len=max_len)


def _headers(value: Any, arg: str) -> dict[str, str]:
    """Protected headers an app gives (per session or per call): at most MAX_HEADERS names of up to
    256 characters, string values of up to 4096, none of the names aund or the protocol sets."""
    if (not isinstance(value, dict) or len(value) > MAX_HEADERS
            or not all(isinstance(k, str) and 0 < len(k) <= 256 and isinstance(v, str) and len(v) <= 4096
                       for k, v in value.items())):
        raise InvalidParams(f"argument {arg!r} must map at most {MAX_HEADERS} names (up to 256 characters) to "
                            "strings (up to 4096 characters)", data={"arg": arg})
    reserved = sorted(k for k in value if k.strip().lower() in RESERVED_HEADERS)
    if reserved:
        raise InvalidParams(f"argument {arg!r}: header {reserved[0]!r} is set by aund or the protocol, not by apps",
                            data={"arg": arg, "header": reserved[0]})
    return value


STATUS_MAX_LINKS = 2000  # per-link entries one `status` reply may list (~0.5 KiB each; a frame is 1 MiB)


def _status_args(args: dict[str, Any]) -> dict[str, Any]:
    """`status` paging: `links` (how many per-link entries, 0..STATUS_MAX_LINKS), `offset`, `aids`
    (only these AIDs' links); only the ones given (a backend takes its defaults)."""
    out: dict[str, Any] = {}
    if args.get("links") is not None:
        out["links"] = min(_int(args, "links"), STATUS_MAX_LINKS)
    if args.get("offset") is not None:
        out["offset"] = _int(args, "offset")
    if args.get("aids") is not None:
        aids = _get(args, "aids", None)
        if not isinstance(aids, list) or len(aids) > STATUS_MAX_LINKS or not all(isinstance(a, str) for a in aids):
            raise InvalidParams(f"aids must be a list of at most {STATUS_MAX_LINKS} AIDs", data={"arg": "aids"})
        out["aids"] = aids
    return out


def _start(args: dict[str, Any]) -> str | int:
    value = _get(args, "start", "last_ack")
    if value in START_WORDS or (isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 1 << 63):
        return value
    raise InvalidParams('argument \'start\' must be "last_ack", "now" or a cursor (int >= 0)', data={"arg": "start"})


class AppConnection:
    """One connected app: its peer credentials, quotas, sessions, subscriptions and outbox."""

    def __init__(self, server: "BrokerServer", stream: trio.SocketStream, conn_id: int,
                 pid: int, uid: int, gid: int, groups: tuple[int, ...] = ()) -> None:
        self.server = server
        self.backend = server.backend
        self.limits = server.limits
        self.stream = stream
        self.app = AppIdentity(conn_id=conn_id, pid=pid, uid=uid, gid=gid, groups=tuple(groups))
        self.protocol: int | None = None
        self.max_frame = min(PRE_HELLO_MAX_FRAME, self.limits.max_frame)
        self.decoder = wire.FrameDecoder(self.max_frame)
        self.outbox = Outbox(self.limits.outbox_bytes_per_app, self.limits.max_frame)
        self.requests_in_flight = 0
        self.calls_in_flight = 0
        self.sessions: dict[int, LinkLease] = {}
        self.subscriptions: dict[int, Subscription] = {}
        self.close_reason: str | None = None
        self._opening = 0
        self._guards: dict[object, tuple[str, trio.CancelScope]] = {}  # requests in flight per AID
        self._revoked_sessions: dict[int, str] = {}  # session id -> AID, taken away by the policy
        self._revoked = False
        self._ids = itertools.count(1)
        self._logged: set[tuple[str, str]] = set()
        self._nursery: trio.Nursery | None = None
        self.log = log.bind(conn=conn_id, uid=uid, pid=pid)

    def __repr__(self) -> str:
        return (f"<AppConnection conn={self.app.conn_id} pid={self.app.pid} uid={self.app.uid} "
                f"app={self.app.app_name!r} | calls {self.calls_in_flight}, subs {len(self.subscriptions)}, "
                f"sessions {len(self.sessions)}, {self.outbox.bytes} B queued>")

    def statistics(self) -> AppStatistics:
        a = self.app
        return AppStatistics(conn_id=a.conn_id, pid=a.pid, uid=a.uid, gid=a.gid, app=a.app_name,
                             protocol=self.protocol, requests_in_flight=self.requests_in_flight,
                             calls_in_flight=self.calls_in_flight, subscriptions=len(self.subscriptions),
                             sessions=len(self.sessions), bytes_buffered=self.outbox.bytes)

    # --- lifecycle ---------------------------------------------------------------------------------
    async def run(self) -> None:
        """Serve this connection until the app leaves or breaks the protocol, then release everything."""
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                nursery.start_soon(self._write_loop)
                nursery.start_soon(self._hello_watchdog)
                reason = await self._read_loop()
                if self.close_reason is None:
                    self.close_reason = reason
                if reason in FLUSH_ON:  # what is queued (replies, the error) still goes out, briefly
                    with trio.move_on_after(FLUSH_GRACE):
                        await self.outbox.wait_flushed()
                nursery.cancel_scope.cancel()
        finally:
            self._nursery = None  # from here on _release_all releases whatever is still held
            await self._release_all()

    async def _hello_watchdog(self) -> None:
        await trio.sleep(self.limits.hello_timeout)
        if self.protocol is None and self.close_reason is None:
            self._violation(ProtocolError(f"no hello within {self.limits.hello_timeout}s"))
            await self._close_after_flush("hello_timeout")

    def close(self, reason: str) -> None:
        """Close this connection now (cancels its requests, pumps and writer); idempotent."""
        if self.close_reason is None:
            self.close_reason = reason
        if self._nursery is not None:
            self._nursery.cancel_scope.cancel()

    async def _release_all(self) -> None:
        for sub in self.subscriptions.values():
            sub.closed = True
        self.subscriptions.clear()
        handles = list(self.sessions.values())
        self.sessions.clear()
        if not handles:
            return
        with trio.CancelScope(shield=True) as scope:
            scope.deadline = trio.current_time() + self.limits.release_grace
            async with trio.open_nursery() as nursery:
                for handle in handles:
                    nursery.start_soon(self._release_one, handle)
        if scope.cancelled_caught:
            self.log.warning("broker.release_timeout", sessions=len(handles))

    async def _release_one(self, handle: LinkLease) -> None:
        try:
            await self.backend.release_session(self.app, handle)
        except AundError as exc:
            self.log.warning("broker.release_failed", aid=handle.aid, slot_id=handle.slot_id, error=str(exc))

    # --- reading -----------------------------------------------------------------------------------
    async def _read_loop(self) -> str:
        while True:
            try:
                data = await self.stream.receive_some(READ_SIZE)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                return "peer_gone"
            if not data:
                return "eof"
            try:
                self.decoder.feed(data)
                while self.close_reason is None and (frame := self.decoder.next_frame()) is not None:
                    if not self.outbox.has_room(1):
                        # Backpressure: take no more requests while the answers pile up unread.
                        with trio.move_on_after(self.limits.stall_timeout):
                            await self.outbox.wait_room(1)
                        if not self.outbox.has_room(1):
                            self._stalled()
                            return "consumer_stalled"
                    try:
                        req = wire.validate_request(frame)
                    except InvalidParams as exc:  # too deep: the id is valid, answer and go on
                        self._reply_error(frame["id"], exc)
                        continue
                    self._on_request(req)
            except ProtocolError as exc:
                self._violation(exc)
                return "protocol_violation"
            except _Closing as closing:
                return closing.reason

    def _violation(self, exc: ProtocolError, request_id: wire.Id | None = None) -> None:
        self.server.protocol_violations += 1
        self.log.warning("broker.protocol_violation", app=self.app.app_name, error=exc.message)
        self._queue(self._encode_error(request_id, exc))

    def _on_request(self, req: wire.Request) -> None:
        if self.protocol is None:
            if req.op != wire.HELLO_OP:
                raise ProtocolError(f"the first request must be {wire.HELLO_OP!r}, got {req.op!r:.64}")
            self._hello(req)
            return
        entry = DISPATCH.get(req.op)
        if entry is None:
            self._reply_error(req.id, UnknownOp(f"unknown op {req.op!r:.64}", data={"op": req.op[:64]}))
            return
        handler, is_async = entry
        if is_async:
            if self.requests_in_flight >= self.limits.requests_per_app:
                self._reply_error(req.id, self._quota("requests", self.limits.requests_per_app))
                return
            self.requests_in_flight += 1
            assert self._nursery is not None
            self._nursery.start_soon(self._run_async, req, handler)
            return
        try:
            result = handler(self, req.args)
        except AundError as exc:
            self._reply_error(req.id, exc)
        else:
            self._reply(req.id, result)

    async def _run_async(self, req: wire.Request, handler: Callable[..., Any]) -> None:
        started = trio.current_time()
        outcome = "ok"
        try:
            try:
                result = await handler(self, req.args)
            except AundError as exc:
                outcome = type(exc).__name__
                self._reply_error(req.id, exc)
            else:
                self._reply(req.id, result)
        finally:
            self.requests_in_flight -= 1
            self.log.debug("broker.op", op=req.op, outcome=outcome,
                           ms=round((trio.current_time() - started) * 1000, 2))

    def _hello(self, req: wire.Request) -> None:
        try:
            hello = wire.validate_hello(req.args)
            protocol = wire.negotiate_protocol(hello.min_protocol, hello.protocol,
                                               wire.MIN_PROTOCOL_VERSION, wire.PROTOCOL_VERSION)
            wanted = req.args.get("max_frame", self.limits.max_frame)
            if isinstance(wanted, bool) or not isinstance(wanted, int) or wanted < MIN_NEGOTIATED_FRAME:
                raise ProtocolError(f"hello field 'max_frame' must be an int >= {MIN_NEGOTIATED_FRAME}")
        except ProtocolError as exc:
            self._violation(exc, req.id)
            raise _Closing("protocol_mismatch") from None
        self.protocol = protocol
        self.max_frame = min(wanted, self.limits.max_frame)
        self.decoder.max_frame = self.max_frame
        self.outbox.hard_limit = self.outbox.limit + self.max_frame
        self.app = replace(self.app, app_name=hello.app)
        self.log = self.log.bind(app=hello.app)
        info = dict(self.backend.daemon_info())
        features = sorted({*info.get("features", ()), *BROKER_FEATURES})
        self._reply(req.id, {**info, "protocol": protocol, "ops": sorted(DISPATCH), "features": features,
                             "max_frame": self.max_frame, "limits": self.limits.per_app(),
                             "conn_id": self.app.conn_id})

    # --- writing -----------------------------------------------------------------------------------
    async def _write_loop(self) -> None:
        while True:
            batch = await self.outbox.next_batch()
            try:
                await self.stream.send_all(batch)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                self.close("peer_gone")
                return
            self.outbox.sent(len(batch))

    def _queue(self, data: bytes) -> None:
        if self.close_reason is not None:
            return  # closing: nothing more goes out
        if not self.outbox.put_nowait(data):
            self.log.warning("broker.outbox_overflow", bytes_buffered=self.outbox.bytes,
                             limit=self.outbox.hard_limit)
            self.close("outbox_overflow")

    def _encode_error(self, request_id: wire.Id | None, exc: AundError) -> bytes:
        return wire.encode_frame(wire.make_error(request_id, exc), wire.HARD_MAX_FRAME)

    def _reply(self, request_id: wire.Id, result: Any) -> None:
        try:
            data = wire.encode_frame(wire.make_reply(request_id, result), self.max_frame)
        except ProtocolError as exc:
            if "length" not in exc.data:
                raise TypeError(f"op result cannot be encoded: {exc.message}") from None  # a bug
            exc = LimitsExceeded(f"the reply of {exc.data['length']} bytes exceeds max_frame {self.max_frame}",
                                 data={"length": exc.data["length"], "max_frame": self.max_frame})
            data = self._encode_error(request_id, exc)
        self._queue(data)

    def _reply_error(self, request_id: wire.Id, exc: AundError) -> None:
        self._queue(self._encode_error(request_id, exc))

    def _log_once(self, once: tuple[str, str], event: str, **kw: Any) -> None:
        """Log ``event`` only the first time ``once`` happens on this connection."""
        if once in self._logged or len(self._logged) >= MAX_LOGGED_KEYS:
            return
        self._logged.add(once)
        self.log.warning(event, **kw)

    def _quota(self, name: str, limit: int, per: str = "app") -> LimitsExceeded:
        quota = name if per == "app" else f"{name}_per_uid"
        self._log_once(("quota", quota), "broker.limits_exceeded", app=self.app.app_name, quota=quota, limit=limit)
        return LimitsExceeded(f"the {name} quota of {limit} per {per} is reached", data={"quota": quota, "limit": limit})

    def links(self) -> set[tuple[str, str]]:
        """The (AID, slot) links this connection's sessions hold."""
        return {(h.aid, h.slot_id) for h in self.sessions.values()}

    # --- shared checks -----------------------------------------------------------------------------
    def _authorized(self, args: dict[str, Any], name: str = "aid") -> str:
        """The normalised AID in argument ``name``, once the policy allows this app to use it (the
        policy is asked about the normalised name, the one the backend registers and uses)."""
        aid = self.backend.canonical_aid(_str(args, name))
        if self.backend.allowed(self.app, aid):
            return aid
        self._log_once(("denied", aid), "broker.permission_denied", app=self.app.app_name, aid=aid)
        raise self._denied(aid)

    def _denied(self, aid: str) -> PermissionDenied:
        return PermissionDenied(f"uid {self.app.uid} may not use {aid}", data={"aid": aid})

    @contextlib.contextmanager
    def _guard(self, aid: str) -> Iterator[None]:
        """Run a request for ``aid``; if a policy reload takes the AID away meanwhile, the request
        is cancelled and answers PermissionDenied."""
        key, scope = object(), trio.CancelScope()
        self._guards[key] = (aid, scope)
        try:
            with scope:
                yield
        finally:
            del self._guards[key]
        if scope.cancelled_caught:
            raise self._denied(aid)

    def _session(self, args: dict[str, Any]) -> LinkLease:
        sid = _int(args, "session", minimum=1)
        try:
            return self.sessions[sid]
        except KeyError:
            if sid in self._revoked_sessions:
                raise self._denied(self._revoked_sessions[sid]) from None
            raise ResourceNotExistError(f"no open session {sid} on this connection", data={"session": sid}) from None

    # --- policy reload -----------------------------------------------------------------------------
    def enforce(self) -> dict[str, Any]:
        """Take away what the policy no longer allows this app (see the module docstring).
        Returns what was taken (empty when nothing was)."""
        if self._nursery is None:  # not running (yet, or any more): nothing is held by a request
            return {}
        allowed: dict[str, bool] = {}

        def ok(aid: str) -> bool:
            if aid not in allowed:
                allowed[aid] = self.backend.allowed(self.app, aid)
            return allowed[aid]

        sessions = [(sid, h) for sid, h in self.sessions.items() if not ok(h.aid)]
        for sid, handle in sessions:
            del self.sessions[sid]
            self._revoked_sessions[sid] = handle.aid
            while len(self._revoked_sessions) > MAX_REVOKED_SESSIONS:
                del self._revoked_sessions[next(iter(self._revoked_sessions))]
            self._nursery.start_soon(self._release_shielded, handle)
        subs = [sub for sub in self.subscriptions.values() if not ok(sub.aid)]
        for sub in subs:
            del self.subscriptions[sub.id]
            sub.end_error = self._denied(sub.aid)
            sub.scope.cancel()
        requests = [scope for aid, scope in self._guards.values() if not ok(aid)]
        for scope in requests:
            scope.cancel()
        aids = sorted(aid for aid, ok_ in allowed.items() if not ok_)
        if not aids:
            return {}
        taken = {"aids": aids, "sessions": len(sessions), "subscriptions": len(subs), "requests": len(requests)}
        self.log.warning("broker.access_revoked", app=self.app.app_name, scope="aid", **taken)
        return taken

    def revoke(self) -> None:
        """The policy no longer admits this uid: take everything away, tell the app with a
        connection-level PermissionDenied and close the connection (once that went out)."""
        if self._revoked or self.close_reason is not None:
            return
        self._revoked = True
        taken = self.enforce()
        self.log.warning("broker.access_revoked", app=self.app.app_name, scope="connection",
                         sessions=taken.get("sessions", 0), subscriptions=taken.get("subscriptions", 0),
                         requests=taken.get("requests", 0))
        self._queue(self._encode_error(None, PermissionDenied(
            f"uid {self.app.uid} may no longer use aund (the policy was reloaded)",
            data={"uid": self.app.uid, "reason": "policy_reloaded"})))
        if self._nursery is not None:
            self._nursery.start_soon(self._close_after_flush, "policy_revoked")
        else:
            self.close("policy_revoked")

    async def _close_after_flush(self, reason: str) -> None:
        with trio.move_on_after(FLUSH_GRACE):
            await self.outbox.wait_flushed()
        self.close(reason)

    async def _release_shielded(self, handle: LinkLease) -> None:
        with trio.CancelScope(shield=True) as scope:
            scope.deadline = trio.current_time() + self.limits.release_grace
            await self._release_one(handle)

    def _subscription(self, args: dict[str, Any]) -> Subscription:
        sub_id = _int(args, "sub", minimum=1)
        try:
            return self.subscriptions[sub_id]
        except KeyError:
            raise ResourceNotExistError(f"no subscription {sub_id} on this connection", data={"sub": sub_id}) from None

    # --- ops (the dispatch table below maps names to these) ----------------------------------------
    def op_hello(self, args: dict[str, Any]) -> Any:
        raise InvalidParams("hello was already done on this connection")

    def op_ping(self, args: dict[str, Any]) -> dict[str, Any]:
        return {"pong": True}

    def op_status(self, args: dict[str, Any]) -> dict[str, Any]:
        """The backend's status, and the socket's own statistics (apps of other uids left out
        unless the backend's view says this app sees everything)."""
        status = dict(self.backend.status(self.app, **_status_args(args)))
        apps = self.server.statistics().as_dict()
        view = status.get("view")
        if isinstance(view, dict) and not view.get("all", True):
            apps["apps"] = [a for a in apps["apps"] if a["uid"] == self.app.uid]
        status["broker"] = apps
        return status

    async def op_identity_ensure(self, args: dict[str, Any]) -> dict[str, Any]:
        aid = self._authorized(args)
        with self._guard(aid):
            return await self.backend.ensure_identity(aid)

    async def op_identity_show(self, args: dict[str, Any]) -> dict[str, Any]:
        aid = self._authorized(args)
        with self._guard(aid):
            return await self.backend.show_identity(self.app, aid)

    async def op_identity_disable(self, args: dict[str, Any]) -> dict[str, Any]:
        aid = self._authorized(args)
        with self._guard(aid):
            return await self.backend.disable_identity(self.app, aid)

    async def op_identity_enable(self, args: dict[str, Any]) -> dict[str, Any]:
        aid = self._authorized(args)
        with self._guard(aid):
            return await self.backend.enable_identity(self.app, aid)

    async def op_consumer_reset(self, args: dict[str, Any]) -> dict[str, Any]:
        consumer = _str(args, "consumer", max_len=128)
        cursor = _int(args, "cursor", 0)
        aid = self._authorized(args)
        with self._guard(aid):
            return await self.backend.reset_consumer(self.app, aid, consumer, cursor)

    async def op_link_restart(self, args: dict[str, Any]) -> dict[str, Any]:
        slot_id = _str(args, "slot_id", "main", max_len=128)
        aid = self._authorized(args)
        with self._guard(aid):
            return await self.backend.restart_link(self.app, aid, slot_id)

    async def op_agent_md_get(self, args: dict[str, Any]) -> dict[str, Any]:
        aid = self._authorized(args)
        with self._guard(aid):
            return await self.backend.agent_md(self.app, aid)

    async def op_agent_md_set(self, args: dict[str, Any]) -> dict[str, Any]:
        content = _str(args, "content", max_len=AGENT_MD_MAX_CHARS)
        aid = self._authorized(args)
        with self._guard(aid):
            return await self.backend.set_agent_md(self.app, aid, content)

    async def op_identity_sign(self, args: dict[str, Any]) -> dict[str, Any]:
        data = _bytes(args, "data", max_len=SIGN_MAX_BYTES)
        aid = self._authorized(args)
        with self._guard(aid):
            return await self.backend.sign(self.app, aid, data)

    async def op_identity_verify(self, args: dict[str, Any]) -> dict[str, Any]:
        aid, cert = _opt_str(args, "aid"), _opt_str(args, "cert", max_len=16 * 1024)
        if aid is None and cert is None:
            raise InvalidParams("identity.verify needs `aid` or `cert`", data={"arg": "aid"})
        data = _bytes(args, "data", max_len=SIGN_MAX_BYTES)
        signature = _bytes(args, "signature", max_len=1024, b64=True)
        via = self._authorized(args, "via") if _opt_str(args, "via") is not None else None
        return await self.backend.verify(self.app, data, signature, aid=aid, cert_pem=cert,
                                         fingerprint=_opt_str(args, "cert_fingerprint", max_len=80) or "", via=via)

    async def op_peer_resolve(self, args: dict[str, Any]) -> dict[str, Any]:
        aid = _str(args, "aid")
        via = self._authorized(args, "via") if _opt_str(args, "via") is not None else None
        return await self.backend.resolve_peer(self.app, aid, _opt_str(args, "cert_fingerprint", max_len=80) or "",
                                               via)

    async def op_identity_renew(self, args: dict[str, Any]) -> dict[str, Any]:
        rekey = _bool(args, "rekey", False)
        aid = self._authorized(args)
        with self._guard(aid):
            return await self.backend.renew_identity(self.app, aid, rekey=rekey)

    def op_identity_list(self, args: dict[str, Any]) -> dict[str, Any]:
        mine = [i for i in self.backend.list_identities()
                if isinstance(i.get("aid"), str) and self.backend.allowed(self.app, i["aid"])]
        return {"identities": mine}

    async def op_session_open(self, args: dict[str, Any]) -> dict[str, Any]:
        _str(args, "aid")
        slot_id = _str(args, "slot_id", "main", max_len=128)
        options = _map(args, "options", {})
        aid = self._authorized(args)
        if len(self.sessions) + self._opening >= self.limits.sessions_per_app:
            raise self._quota("sessions", self.limits.sessions_per_app)
        link = (aid, slot_id)  # aid is normalised
        mine = self.links()
        if link not in mine and len(mine) >= self.limits.links_per_app:
            raise self._quota("links", self.limits.links_per_app)
        users = set().union(*(a.links() for a in self.server.uid_apps(self.app.uid)))
        if link not in users and len(users) >= self.limits.links_per_uid:
            raise self._quota("links", self.limits.links_per_uid, per="user")
        self._opening += 1
        try:
            with self._guard(aid):
                handle = await self.backend.open_session(self.app, aid, slot_id, options or None)
        finally:
            self._opening -= 1
        if not self.backend.allowed(self.app, aid):  # a reload took it away as the open returned
            await self._release_shielded(handle)
            raise self._denied(aid)
        sid = next(self._ids)
        self.sessions[sid] = handle
        return {"session": sid, "aid": handle.aid, "slot_id": handle.slot_id, "state": handle.state()}

    async def op_session_close(self, args: dict[str, Any]) -> dict[str, Any]:
        handle = self._session(args)
        del self.sessions[args["session"]]
        await self._release_shielded(handle)
        return {}

    async def op_session_wait_ready(self, args: dict[str, Any]) -> dict[str, Any]:
        handle = self._session(args)
        timeout = _timeout(args, "timeout", self.limits.max_call_timeout)
        with self._guard(handle.aid), trio.move_on_after(math.inf if timeout is None else timeout) as scope:
            await handle.wait_ready()
        state = handle.state()
        if scope.cancelled_caught:
            raise NotReady(f"{handle.aid}/{handle.slot_id} is not ready after {timeout}s (state {state})",
                           data={"aid": handle.aid, "slot_id": handle.slot_id, "state": state})
        return {"aid": handle.aid, "slot_id": handle.slot_id, "state": state}

    async def op_call(self, args: dict[str, Any]) -> Any:
        handle = self._session(args)
        method = _str(args, "method")
        params = _map(args, "params", {})
        timeout = _timeout(args, "timeout", self.limits.max_call_timeout)
        background = _bool(args, "background", False)
        if method in handle.header_methods:  # the same bounds as set_protected_headers, whichever way they come
            for key in ("protected_headers", "headers"):
                if params.get(key) is not None:
                    _headers(params[key], f"params.{key}")
        borrower = CallBorrower(self.app.conn_id, self.app.app_name, self.app.pid, next(self._ids))
        with self._counted_call(), self._guard(handle.aid):  # a policy reload may take the AID away meanwhile
            return await self._call(handle, method, params, timeout, background, borrower)

    @contextlib.contextmanager
    def _counted_call(self) -> Iterator[None]:
        """One of this app's `calls` quota (calls and notifications), counted by the server too (a
        graceful stop waits for them)."""
        if self.calls_in_flight >= self.limits.calls_per_app:
            raise self._quota("calls", self.limits.calls_per_app)
        self.calls_in_flight += 1
        self.server.call_began()
        try:
            yield
        finally:
            self.calls_in_flight -= 1
            self.server.call_ended()

    async def _call(self, handle: LinkLease, method: str, params: dict[str, Any], timeout: float | None,
                    background: bool, borrower: CallBorrower) -> Any:
        held: list[Any] = []
        try:
            start = trio.current_time()
            with trio.move_on_after(self.limits.call_queue_timeout if timeout is None else timeout) as queued:
                for stage in self.server.call_stages(self.app.uid, handle.aid):  # AID share, uid share, global
                    waiting = stage[0]
                    await stage[2].acquire_on_behalf_of(borrower)
                    held.append(stage)
            if queued.cancelled_caught:
                raise RpcTimeout(f"{method}: no {waiting} call slot within {queued.deadline - start:.3g}s",
                                 data={"method": method, "queue": waiting})
            remaining = None if timeout is None else max(timeout - (trio.current_time() - start), 0.001)
            guard = (self.limits.max_call_timeout if remaining is None else remaining) + CALL_GRACE
            with trio.move_on_after(guard), holding(self.server.call_limiter):
                return await handle.call(method, params, timeout=remaining, background=background, app=self.app)
            raise RpcTimeout(f"{method}: no answer from the backend within {guard:.3g}s", data={"method": method})
        finally:
            self.server.release_call(held, borrower)  # whatever was acquired, on every path

    async def op_session_notify(self, args: dict[str, Any]) -> dict[str, Any]:
        handle = self._session(args)
        method = _str(args, "method")
        params = _map(args, "params", {})
        ttl_ms = args.get("ttl_ms")
        if ttl_ms is not None:
            ttl_ms = _int(args, "ttl_ms")
        route = {k: _opt_str(args, k) for k in ("to", "group_id", "device_id", "slot_id")}
        timeout = _timeout(args, "timeout", self.limits.max_call_timeout)
        with self._counted_call(), self._guard(handle.aid):
            return await handle.notify(method, params, app=self.app, timeout=timeout, ttl_ms=ttl_ms, **route)

    def op_set_protected_headers(self, args: dict[str, Any]) -> dict[str, Any]:
        handle = self._session(args)
        handle.set_protected_headers(self.app, _headers(_map(args, "headers"), "headers"))
        return {}

    def op_invalidate_prekey_cache(self, args: dict[str, Any]) -> dict[str, Any]:
        handle = self._session(args)
        handle.invalidate_prekey_cache(_str(args, "peer_aid"))
        return {}

    def op_subscribe(self, args: dict[str, Any]) -> dict[str, Any]:
        _str(args, "aid")
        consumer = _str(args, "consumer", max_len=128)
        kinds = _get(args, "kinds", [])
        if not isinstance(kinds, list) or len(kinds) > 64 or not all(isinstance(k, str) and k for k in kinds):
            raise InvalidParams("argument 'kinds' must be a list of event kinds", data={"arg": "kinds"})
        start = _start(args)
        aid = self._authorized(args)
        check_kinds = getattr(self.backend, "check_kinds", None)  # a backend without it accepts any kind
        if check_kinds is not None:
            check_kinds(tuple(kinds))
        check_enabled = getattr(self.backend, "check_enabled", None)  # a disabled AID: refused here, not ended later
        if check_enabled is not None:
            check_enabled(aid)
        if len(self.subscriptions) >= self.limits.subscriptions_per_app:
            raise self._quota("subscriptions", self.limits.subscriptions_per_app)
        iterator = self.backend.subscribe(self.app, aid, tuple(kinds), consumer, start)
        sub = Subscription(next(self._ids), aid, consumer, tuple(kinds), iterator)
        self.subscriptions[sub.id] = sub
        assert self._nursery is not None
        # The reply is queued as soon as this returns, before the pump can queue any event.
        self._nursery.start_soon(self._pump, sub)
        return {"sub": sub.id}

    def op_unsubscribe(self, args: dict[str, Any]) -> dict[str, Any]:
        sub = self._subscription(args)
        del self.subscriptions[sub.id]
        sub.closed = True
        sub.scope.cancel()
        return {}

    async def op_ack(self, args: dict[str, Any]) -> dict[str, Any]:
        cursor = _int(args, "cursor")
        if args.get("sub") is not None:
            sub = self._subscription(args)
            aid, consumer = sub.aid, sub.consumer
        else:
            _str(args, "aid")
            consumer = _str(args, "consumer", max_len=128)
            aid = self._authorized(args)
        with self._guard(aid):
            await self.backend.ack(self.app, aid, consumer, cursor)
        return {"cursor": cursor}

    # --- subscription pumps ------------------------------------------------------------------------
    async def _pump(self, sub: Subscription) -> None:
        error: AundError | None = None
        try:
            with sub.scope:
                async for event in sub.iterator:
                    data = self._encode_event(sub, event)
                    if not self.outbox.has_room(len(data)):
                        with trio.move_on_after(self.limits.stall_timeout):
                            await self.outbox.wait_room(len(data))
                        if not self.outbox.has_room(len(data)):
                            self._stalled()
                            return
                    if sub.closed:
                        return
                    sub.delivered += 1
                    self._queue(data)
        except AundError as exc:
            error = exc
        finally:
            await self._close_iterator(sub)
        if not sub.closed:  # the backend ended it (or failed), or the policy did: tell the app, free the quota
            sub.closed = True
            self.subscriptions.pop(sub.id, None)
            error = error or sub.end_error
            end = {"kind": SUBSCRIPTION_END_KIND, "cursor": None,
                   "data": {"error": None if error is None else error_to_wire(error)}}
            self._queue(wire.encode_frame(wire.make_event(sub.id, end), self.max_frame))

    async def _close_iterator(self, sub: Subscription) -> None:
        aclose = getattr(sub.iterator, "aclose", None)
        if aclose is None:
            return
        with trio.CancelScope(shield=True) as scope:
            scope.deadline = trio.current_time() + self.limits.release_grace
            await aclose()

    def _stalled(self) -> None:
        self.server.stalled_disconnects += 1
        self.log.warning("broker.consumer_stalled", app=self.app.app_name, bytes_buffered=self.outbox.bytes,
                         stall_timeout=self.limits.stall_timeout)
        self.close("consumer_stalled")

    def _encode_event(self, sub: Subscription, event: InboxEvent) -> bytes:
        body = {"kind": event.kind, "data": event.data, "cursor": event.cursor}
        try:
            return wire.encode_frame(wire.make_event(sub.id, body), self.max_frame)
        except ProtocolError as exc:
            reason = "too_large" if "length" in exc.data else "unencodable"
        self._log_once(("undeliverable", reason), "broker.event_undeliverable", app=self.app.app_name,
                       aid=sub.aid, kind=str(event.kind)[:128], cursor=event.cursor, reason=reason)
        stub = {"kind": UNDELIVERABLE_KIND, "cursor": event.cursor,
                "data": {"kind": str(event.kind)[:128], "reason": reason}}
        return wire.encode_frame(wire.make_event(sub.id, stub), self.max_frame)


# The ONE dispatch table: op name -> handler. Plain functions run inline in the reader; coroutine
# functions run as their own task, so slow ops never hold up the connection.
_OPS: dict[str, Callable[..., Any]] = {
    "hello": AppConnection.op_hello,
    "ping": AppConnection.op_ping,
    "status": AppConnection.op_status,
    "identity.ensure": AppConnection.op_identity_ensure,
    "identity.list": AppConnection.op_identity_list,
    "identity.sign": AppConnection.op_identity_sign,
    "identity.verify": AppConnection.op_identity_verify,
    "identity.renew": AppConnection.op_identity_renew,
    "peer.resolve": AppConnection.op_peer_resolve,
    "agent_md.get": AppConnection.op_agent_md_get,
    "agent_md.set": AppConnection.op_agent_md_set,
    "link.restart": AppConnection.op_link_restart,
    "identity.show": AppConnection.op_identity_show,
    "identity.disable": AppConnection.op_identity_disable,
    "identity.enable": AppConnection.op_identity_enable,
    "consumer.reset": AppConnection.op_consumer_reset,
    "session.open": AppConnection.op_session_open,
    "session.close": AppConnection.op_session_close,
    "session.wait_ready": AppConnection.op_session_wait_ready,
    "call": AppConnection.op_call,
    "session.notify": AppConnection.op_session_notify,
    "set_protected_headers": AppConnection.op_set_protected_headers,
    "invalidate_prekey_cache": AppConnection.op_invalidate_prekey_cache,
    "subscribe": AppConnection.op_subscribe,
    "unsubscribe": AppConnection.op_unsubscribe,
    "ack": AppConnection.op_ack,
}
from aund.broker import transfers as _transfers  # noqa: E402  (its ops use this module's helpers)

_OPS.update(_transfers.OPS)  # storage.upload.* / storage.download.* / storage.cancel
DISPATCH: dict[str, tuple[Callable[..., Any], bool]] = {
    name: (fn, inspect.iscoroutinefunction(fn)) for name, fn in _OPS.items()
}
