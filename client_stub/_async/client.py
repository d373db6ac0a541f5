"""The client front end, written once (layer: client_stub): ``AsyncClient`` in
``client_stub/_async/client.py`` is the source, ``Client`` in ``client_stub/_sync/client.py`` is
generated from it by ``scripts/unasync.py`` (edit the source, then run the script; the test suite
fails on a stale copy).

The I/O that really differs (a reader task or a reader thread, futures or thread waiters, which
locks) is ``client_stub._asyncio_io``, which the generator swaps for ``client_stub._thread_io``.
Apps import from ``client_stub`` or ``client_stub.client``, whose docstring is the guide.
"""
from __future__ import annotations

import os
import time
from collections.abc import Mapping
from pathlib import Path
TYPE_CHECKING = False  # typing is for checkers only: apps should not pay for importing it
if TYPE_CHECKING:
    from typing import Any

from client_stub import _asyncio_io as _io
from client_stub import localsock
from client_stub._core import (
    BROKEN_WAIT, DEFAULT_CONNECT_TIMEOUT, DEFAULT_TIMEOUT, ENSURE_WAIT, READ_SIZE, RECONNECT_ATTEMPTS, Event,
    _backoff, _call_args, _Core, _default_app_name, _notify_args, _open_args, _ready_wait, _resolve_args,
    _SinkState, _SubState, _unavailable, _untrusted, _verify_args, default_socket_path,
)
from client_stub.errors import AundError, DaemonUnavailable, ProtocolError, RpcTimeout


class _AsyncConn:
    """One socket to aund and its reader (``_AsyncConn``: a task; ``_ThreadConn``: a thread)."""

    def __init__(self, path: Path, app: str, stream: _io.Stream) -> None:
        self.path = path
        self.core = _Core(app)
        self.lock = _io.core_lock()  # guards core (a reader thread feeds it)
        self.stream = stream
        self.hello: dict[str, Any] = {}

    @classmethod
    async def open(cls, path: Path, app: str, connect_timeout: float) -> _AsyncConn:
        """Connect, check who listens, say hello. Errors: DaemonUnavailable."""
        try:
            owner = localsock.check_socket_dir(path)
        except localsock.UnsafeSocketPath as exc:
            raise _untrusted(path, exc) from None
        try:
            stream = await _io.connect_unix(path, connect_timeout)
        except OSError as exc:
            raise _unavailable(path, exc) from None
        self = cls(path, app, stream)
        try:
            localsock.check_peer(stream.socket, path, owner)
        except localsock.UnsafeSocketPath as exc:
            await self.close()
            raise _untrusted(path, exc) from None
        waiter = _io.new_waiter()
        data = self.core.hello_request(waiter)  # registered before the reader can see a hang-up
        stream.start_reader(self._read_loop)
        try:
            await self._send(data)  # if it fails, the reader fails the waiter with the daemon's reason
            try:
                self.hello = await _io.wait(waiter, connect_timeout)
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
        error: AundError | None = None
        try:
            while True:
                data = await self.stream.receive(READ_SIZE)
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

    async def _send(self, data: bytes) -> bool:
        """False if the socket is broken; the reader then fails every waiter with the reason
        (e.g. the daemon's ``err`` frame explaining why it hung up)."""
        try:
            await self.stream.send_all(data)
        except OSError:
            return False
        return True

    async def request(self, op: str, args: dict[str, Any], wait: float | None, sink: _SinkState | None = None) -> Any:
        waiter = _io.new_waiter()
        with self.lock:
            request_id, data = self.core.request(op, args, waiter, sink)
        sent = await self._send(data)
        try:
            return await _io.wait(waiter, wait if sent else BROKEN_WAIT)
        except TimeoutError:
            if not sent:
                raise _unavailable(self.path, what="lost the connection to") from None
            raise RpcTimeout(f"{op}: no reply from aund within {wait}s", data={"op": op}) from None
        finally:
            with self.lock:
                self.core.forget(request_id)

    def drop_sink(self, sub: Any) -> None:
        with self.lock:
            self.core.drop_sink(sub)

    async def close(self) -> None:
        await self.stream.close()


class AsyncClient:
    """A client of aund: ``Client`` blocks and is safe to share between threads; ``AsyncClient``
    has the same arguments and methods, as coroutines, on one event loop. See ``client_stub.client``.

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
        self._conn: _AsyncConn | None = None
        self._lock = _io.new_lock()
        self._closed = False

    def __repr__(self) -> str:
        state = "closed" if self._closed else "connected" if self._conn and not self._conn.dead else "idle"
        return f"<{type(self).__name__} {self.socket_path} {state}>"

    async def connect(self) -> AsyncClient:
        """Connect and say hello now (otherwise the first request does). Errors: DaemonUnavailable."""
        await self._connection()
        return self

    async def __aenter__(self) -> AsyncClient:
        return await self.connect()

    async def __aexit__(self, *exc_info: Any) -> None:
        await self.close()

    async def close(self) -> None:
        """Close the connection; the daemon releases every session and subscription of it."""
        async with self._lock:
            self._closed = True
            conn, self._conn = self._conn, None
        if conn is not None:
            await conn.close()

    @property
    def hello(self) -> dict[str, Any]:
        """The daemon's hello reply (versions, ops, features, limits) of the current connection
        (``Client`` connects for it; ``AsyncClient`` raises RuntimeError before ``connect()``)."""
        return _io.hello(self)

    async def _connection(self) -> _AsyncConn:
        async with self._lock:
            if self._closed:
                raise RuntimeError(f"this aund {type(self).__name__} is closed")
            if self._conn is None or self._conn.dead:
                if self._conn is not None:
                    await self._conn.close()
                    self._conn = None
                self._conn = await _AsyncConn.open(self.socket_path, self.app, self.connect_timeout)
            return self._conn

    async def request(self, op: str, args: dict[str, Any] | None = None, *, timeout: float | None = None) -> Any:
        """Send any op and return its result (``timeout``: the client-side wait, default ``self.timeout``)."""
        conn = await self._connection()
        return await conn.request(op, args or {}, self.timeout if timeout is None else timeout)

    async def ping(self) -> float:
        """Round-trip time to the daemon, in seconds."""
        t0 = time.monotonic()
        await self.request("ping")
        return time.monotonic() - t0

    async def status(self) -> dict[str, Any]:
        return await self.request("status")

    async def ensure_identity(self, aid: str) -> dict[str, Any]:
        """Load the AID, registering it only if absent: ``{aid, cert_fingerprint, ...}``."""
        return await self.request("identity.ensure", {"aid": aid}, timeout=max(self.timeout, ENSURE_WAIT))

    async def list_identities(self) -> list[dict[str, Any]]:
        """The identities this app may use."""
        return (await self.request("identity.list"))["identities"]

    async def agent_md(self, aid: str) -> dict[str, Any]:
        """The AID's published agent.md: ``{aid, content, etag}`` (``ResourceNotExistError`` if none)."""
        return await self.request("agent_md.get", {"aid": aid})

    async def show_identity(self, aid: str) -> dict[str, Any]:
        """Certificate (fingerprint, subject, issuer, validity), device id, gateways, links, inbox
        depth and this user's durable consumers (name, cursor) of an identity aund holds."""
        return await self.request("identity.show", {"aid": aid})

    async def disable_identity(self, aid: str) -> dict[str, Any]:
        """Make aund stop holding ``aid`` (kept across restarts, nothing deleted): its links close,
        sessions and subscriptions are refused with ``PermissionDenied`` (``data.reason``
        "identity_disabled"): ``{aid, disabled, changed, links_closed}``."""
        return await self.request("identity.disable", {"aid": aid})

    async def enable_identity(self, aid: str) -> dict[str, Any]:
        """Hold a disabled ``aid`` again (held and configured links start again):
        ``{aid, disabled, changed, connecting}``."""
        return await self.request("identity.enable", {"aid": aid})

    async def reset_consumer(self, aid: str, consumer: str, cursor: int = 0) -> dict[str, Any]:
        """Set this user's consumer of ``aid`` to ``cursor`` (0: read everything again)."""
        return await self.request("consumer.reset", {"aid": aid, "consumer": consumer, "cursor": cursor})

    async def restart_link(self, aid: str, slot_id: str = "main") -> dict[str, Any]:
        """Start the (AID, slot) link again if it stopped for good (kicked by another instance,
        refused): ``{aid, slot_id, restarted, state}``; a running link is left as it is."""
        return await self.request("link.restart", {"aid": aid, "slot_id": slot_id})

    async def set_agent_md(self, aid: str, text: str) -> dict[str, Any]:
        """Replace the AID's agent.md with ``text`` (markdown with YAML front matter; the daemon signs
        it with the AID key): ``{aid, etag, content}``. ``InvalidParams`` (``data.field``) for a
        document that does not validate; the published one then stays."""
        return await self.request("agent_md.set", {"aid": aid, "content": text},
                                  timeout=max(self.timeout, ENSURE_WAIT))

    async def sign(self, aid: str, data: bytes | str) -> dict[str, Any]:
        """Sign ``data`` with the AID key (the hash its curve calls for; the key stays in aund):
        ``{aid, signature (DER bytes), signature_b64, cert_fingerprint, algorithm}``."""
        return await self.request("identity.sign", {"aid": aid, "data": data})

    async def verify(self, data: bytes | str, signature: bytes | str, *, aid: str | None = None,
                     cert: str | None = None, cert_fingerprint: str | None = None,
                     via: str | None = None) -> dict[str, Any]:
        """Check ``signature`` (bytes or base64) over ``data`` with the verified certificate of
        ``aid`` (the one ``cert_fingerprint`` names, else its current one) or ``cert`` (PEM):
        ``{valid, aid, cert_fingerprint}``. An untrusted or revoked certificate raises."""
        return await self.request("identity.verify", _verify_args(data, signature, aid, cert, cert_fingerprint, via),
                                  timeout=max(self.timeout, ENSURE_WAIT))

    async def resolve_peer(self, aid: str, cert_fingerprint: str | None = None,
                           via: str | None = None) -> dict[str, Any]:
        """A peer's certificate, verified (chain to a trusted root, CN, CRL/OCSP), and its gateway:
        ``{aid, cert, cert_fingerprint, public_key, serial, issuer, not_before, not_after, gateway}``."""
        return await self.request("peer.resolve", _resolve_args(aid, cert_fingerprint, via),
                                  timeout=max(self.timeout, ENSURE_WAIT))

    async def renew_identity(self, aid: str, *, rekey: bool = False) -> dict[str, Any]:
        """A new certificate for the AID now (aund also renews by itself before expiry); ``rekey``:
        a new key too. Old keys and certificates are kept: ``{aid, cert_fingerprint, old_cert_fingerprint, ...}``."""
        return await self.request("identity.renew", {"aid": aid, "rekey": rekey},
                                  timeout=max(self.timeout, ENSURE_WAIT))

    def session(self, aid: str, slot_id: str = "main", options: Mapping[str, Any] | None = None) -> AsyncSession:
        """A handle on the daemon's link for (aid, slot_id); opened on first use. ``options`` are
        the SDK's ``connect()`` options a link takes (``delivery_mode``: "fanout" | "queue",
        ``queue_routing``, ``affinity_ttl_ms``); options that conflict with the running link raise
        ``InvalidParams``."""
        return AsyncSession(self, aid, slot_id, options)


class AsyncSession:
    """An app's hold on (aid, slot_id); re-opened by itself after a reconnect."""

    def __init__(self, client: AsyncClient, aid: str, slot_id: str = "main",
                 options: Mapping[str, Any] | None = None) -> None:
        self.client, self.aid, self.slot_id = client, aid, slot_id
        self.options = dict(options or {})
        self.info: dict[str, Any] = {}
        self._conn: _AsyncConn | None = None
        self._lock = _io.new_lock()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.aid}/{self.slot_id} session={self.info.get('session')}>"

    async def __aenter__(self) -> AsyncSession:
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
        """Open now (otherwise the first op does): ``{session, aid, slot_id, state}``."""
        await self._open()
        return self.info

    async def wait_ready(self, timeout: float | None = None) -> dict[str, Any]:
        """Wait until the link is ready: ``{aid, slot_id, state}``.

        Errors: NotReady once ``timeout`` passed; GatewayUnavailable if the link failed for good.
        """
        conn, sid = await self._open()
        args = {"session": sid} if timeout is None else {"session": sid, "timeout": timeout}
        return await conn.request("session.wait_ready", args, _ready_wait(timeout))

    async def call(self, method: str, params: Mapping[str, Any] | None = None, timeout: float | None = None,
                   background: bool = False) -> Any:
        """One gateway RPC as this AID. Errors: RpcTimeout, GatewayError, LimitsExceeded, ..."""
        conn, sid = await self._open()
        args, wait = _call_args(sid, method, params, timeout, background)
        return await conn.request("call", args, wait)

    async def notify(self, method: str, params: Mapping[str, Any] | None = None, *, to: str | None = None,
                     group_id: str | None = None, device_id: str | None = None, slot_id: str | None = None,
                     ttl_ms: int | None = None, timeout: float | None = None) -> dict[str, Any]:
        """A notification (no answer, no delivery guarantee, online peers only), as the SDK's
        ``notify``: ``event/app.*`` to ``to`` (optionally one ``device_id``/``slot_id``) or to a
        ``group_id``'s members, or ``notification/...`` to the gateway. Returns once it is sent."""
        conn, sid = await self._open()
        route = {"to": to, "group_id": group_id, "device_id": device_id, "slot_id": slot_id, "ttl_ms": ttl_ms}
        args, wait = _notify_args(sid, method, params, route, timeout)
        return await conn.request("session.notify", args, wait)

    @property
    def storage(self) -> Any:
        """This AID's AUN Storage through aund (``client_stub.storage``: ``Storage`` for a
        ``Session``, ``AsyncStorage`` with the same methods as coroutines for an ``AsyncSession``)."""
        from client_stub._async.storage import AsyncStorage
        return AsyncStorage(self)

    async def set_protected_headers(self, headers: Mapping[str, str]) -> None:
        conn, sid = await self._open()
        await conn.request("set_protected_headers", {"session": sid, "headers": dict(headers)}, self.client.timeout)

    async def invalidate_prekey_cache(self, peer_aid: str) -> None:
        conn, sid = await self._open()
        await conn.request("invalidate_prekey_cache", {"session": sid, "peer_aid": peer_aid}, self.client.timeout)

    def events(self, consumer: str, kinds: tuple[str, ...] | list[str] = ("message.received",),
               start: str | int = "last_ack") -> AsyncEventStream:
        """Iterate this AID's events as ``consumer`` (subscribes on the first event asked for)."""
        return AsyncEventStream(self.client, _SubState(self.aid, consumer, tuple(kinds), start))

    async def close(self) -> None:
        """Let go of the link (the daemon keeps on-demand links a while for reuse)."""
        async with self._lock:
            conn, self._conn = self._conn, None
        if conn is not None and not conn.dead:
            try:
                await conn.request("session.close", {"session": self.info["session"]}, self.client.timeout)
            except DaemonUnavailable:
                pass


class AsyncEventStream:
    """``Event``s for one consumer: ``EventStream`` is an iterator (use it from one thread,
    ``close()`` when done); ``AsyncEventStream`` the async one (``async for``, ``await aclose()``)."""

    def __init__(self, client: AsyncClient, state: _SubState) -> None:
        self.client, self.state = client, state
        self._conn: _AsyncConn | None = None
        self._sink: _io.Sink | None = None
        self._closed = False

    def __aiter__(self) -> AsyncEventStream:
        return self

    async def __aenter__(self) -> AsyncEventStream:
        return self

    async def __aexit__(self, *exc_info: Any) -> None:
        await self.aclose()

    async def open(self) -> AsyncEventStream:
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
        """The next event; None if the stream ended (closed) or ``timeout`` passed without one.

        Errors: the error that ended the subscription on the daemon's side; DaemonUnavailable once
        reconnecting failed ``client.reconnect_attempts`` times in a row.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self._closed:
            if self._sink is None:
                await self._subscribe("first" if self.state.sub is None else "reconnect")
            sink = self._sink
            assert sink is not None
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            if not await sink.wait(remaining):
                return None
            raw, ended, overflowed, lost = sink.pop()
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
                await self._drop()
                await self._subscribe("overflow")
            elif lost:
                self._sink = None
        return None

    async def _subscribe(self, reason: str) -> None:
        attempts = 0
        while True:
            try:
                conn = await self.client._connection()
                sink = _io.Sink()
                result = await conn.request("subscribe", self.state.subscribe_args(reason), self.client.timeout, sink)
                self._conn, self._sink, self.state.sub = conn, sink, result["sub"]
                return
            except DaemonUnavailable:
                if attempts >= self.client.reconnect_attempts:
                    raise
                await _io.sleep(_backoff(attempts))
                attempts += 1
                reason = "reconnect" if reason == "overflow" else reason

    async def _drop(self) -> None:
        conn, sub = self._conn, self.state.sub
        self._sink = None
        if conn is None or conn.dead:
            return
        conn.drop_sink(sub)
        try:
            await conn.request("unsubscribe", {"sub": sub}, self.client.timeout)
        except AundError:
            pass  # gone already (connection or subscription): nothing left to release

    async def _ack(self, cursor: int | None) -> None:
        if cursor is not None:  # live (non-durable) events have no cursor: nothing to ack
            await self.client.request("ack", self.state.ack_args(cursor))

    async def aclose(self) -> None:
        """Unsubscribe (the consumer's acks stay with the daemon)."""
        if not self._closed:
            self._closed = True
            if self._sink is not None:
                await self._drop()
