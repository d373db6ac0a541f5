"""AUN layer: one gateway link per (AID, slot_id), always connected while it runs.

A `Link` owns: the supervisor loop (authenticate -> WebSocket -> challenge -> `auth.connect` ->
post-connect resync -> ready; on a drop, backoff with jitter and reconnect, failing over through
the gateway candidates), one reader task that always drains the socket and routes replies to
waiters and events to `on_event`, the heartbeat (WebSocket pings), the token refresh loop, the
RPC budget and the pull gate.

What it may not do: import the broker, the inbox, or anything app-facing. It reports through
the `on_event` / `on_state` callbacks, which must not block.

Error handling (what `call` raises): RpcTimeout (queue or reply timeout; retryable),
GatewayUnavailable (not connected, or the connection dropped while waiting; retryable unless
the link failed for good), the mapped gateway error (see `aund.errors.map_remote_error`).
"""
from __future__ import annotations

import enum
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, Protocol

import structlog
import trio
from cryptography.hazmat.primitives.asymmetric import ec

from aund.aun import auth, budget as budget_mod, codes, jsonrpc as rpc, methods, signing, transport
from aund.aun import ws as websocket
from aund.aun.budget import PullGate, RpcBudget
from aund.aun.looplag import LoopLag
from aund.errors import AuthError, AundError, GatewayError, GatewayUnavailable, InvalidParams, \
    PermissionDenied, RpcTimeout, map_remote_error

log = structlog.get_logger("aund.link")

SDK_CAPABILITIES = {"e2ee": True, "group_e2ee": True, "supported_p2p_e2ee": ["e2ee_v2"],
                    "supported_group_e2ee": ["group_e2ee_v2"], "inline_realtime_payload_v1": True,
                    "p2p_peer_pull_v1": True, "agent_md_validation_v1": True}
#: Close codes after which the official SDK never reconnects (4012 is the retryable one).
NO_RECONNECT_CODES = codes.NO_RECONNECT
INTERNAL_ONLY = methods.INTERNAL_ONLY


class LinkState(str, enum.Enum):
    NO_IDENTITY = "no_identity"
    STANDBY = "standby"
    AUTHENTICATED = "authenticated"
    CONNECTING = "connecting"
    READY = "ready"
    RETRY_BACKOFF = "retry_backoff"
    RECONNECTING = "reconnecting"
    CONNECTION_FAILED = "connection_failed"
    CLOSED = "closed"


class Credentials(Protocol):
    """What a link needs of an identity; the daemon adapts the identity store to it."""

    aid: str
    private_key: ec.EllipticCurvePrivateKey
    cert_pem: str
    cert_fingerprint: str

    async def load_tokens(self) -> auth.Tokens | None: ...

    async def save_tokens(self, tokens: auth.Tokens) -> None: ...


@dataclass(frozen=True)
class LinkConfig:
    gateways: tuple[str, ...]
    device_id: str
    slot_id: str = "default"
    kind: str = "long"
    call_timeout: float = 35.0
    connect_timeout: float = 10.0
    heartbeat_interval: float = 30.0
    pong_timeout: float = 10.0
    backoff_initial: float = 1.0
    backoff_after_server_close: float = 16.0
    backoff_max: float = 64.0
    drop_spread: float = 0.0            # + U(0, this) s on the first retry after the gateway closed the link
    refresh_before: float = 1800.0
    refresh_check: float = 30.0
    max_frame: int = transport.MAX_FRAME
    rpc_in_flight: int = 16
    rpc_background: int = 8
    pull_namespaces: int = 4
    delivery_mode: str = "fanout"
    delivery_routing: str = ""          # queue only: round_robin | sender_affinity
    affinity_ttl_ms: int = 0            # queue + sender_affinity only


#: The SDK's `connect()` options a daemon-held link takes per (AID, slot), and the defaults.
DEFAULT_CONNECT_OPTIONS = {"delivery_mode": "fanout", "delivery_routing": "", "affinity_ttl_ms": 0}
_FIXED_OPTIONS = {  # taken only with the value aund always uses, with the reason
    "connection_kind": ("long", "aund keeps every link connected (a short connection would be closed by the "
                                "gateway and receive no pushes)"),
    "background_sync": (True, "aund always syncs every message into its durable inbox"),
    "auto_reconnect": (True, "aund always reconnects its links"),
}


def connect_options(raw: dict[str, Any] | None) -> dict[str, Any]:
    """LinkConfig fields for the SDK-style connect `raw` options, checked as the SDK checks them:
    `delivery_mode` ("fanout" | "queue", or {mode, routing, affinity_ttl_ms}), `queue_routing`
    ("round_robin" | "sender_affinity"), `affinity_ttl_ms`; `connection_kind`, `background_sync`
    and `auto_reconnect` only with aund's own values. InvalidParams names `options.<key>`."""
    raw = dict(raw or {})
    for key, (fixed, why) in _FIXED_OPTIONS.items():
        if key in raw and raw.pop(key) != fixed:
            raise InvalidParams(f"options.{key}: only {fixed!r} ({why})", data={"arg": f"options.{key}"})
    mode_raw = raw.pop("delivery_mode", "fanout")
    mode_raw = dict(mode_raw) if isinstance(mode_raw, dict) else {"mode": mode_raw}
    if "queue_routing" in raw:
        mode_raw["routing"] = raw.pop("queue_routing")
    if "affinity_ttl_ms" in raw:
        mode_raw["affinity_ttl_ms"] = raw.pop("affinity_ttl_ms")
    if raw:
        known = ", ".join(sorted({"delivery_mode", "queue_routing", "affinity_ttl_ms", *_FIXED_OPTIONS}))
        name = sorted(raw)[0]
        raise InvalidParams(f"options.{name} is not a connect option aund takes per link (known: {known})",
                            data={"arg": f"options.{name}"})
    mode = str(mode_raw.get("mode") or "fanout").strip().lower()
    if mode not in ("fanout", "queue"):
        raise InvalidParams("options.delivery_mode must be 'fanout' or 'queue'", data={"arg": "options.delivery_mode"})
    routing = str(mode_raw.get("routing") or ("round_robin" if mode == "queue" else "")).strip().lower()
    if mode == "fanout":
        routing = ""
    elif routing not in ("round_robin", "sender_affinity"):
        raise InvalidParams("options.queue_routing must be 'round_robin' or 'sender_affinity'",
                            data={"arg": "options.queue_routing"})
    ttl = mode_raw.get("affinity_ttl_ms", 0) if mode == "queue" else 0
    if isinstance(ttl, bool) or not isinstance(ttl, int) or not 0 <= ttl <= 86_400_000:
        raise InvalidParams("options.affinity_ttl_ms must be an integer of milliseconds (0 .. 1 day)",
                            data={"arg": "options.affinity_ttl_ms"})
    return {"delivery_mode": mode, "delivery_routing": routing, "affinity_ttl_ms": ttl}


class Backoff:
    """The SDK's reconnect schedule: base 1 s (16 s after a server-side close code), doubling to the
    maximum, each sleep `base + U(0,1) * min(base, max - base)`; reset after a successful connect.

    `spread` (default 0: the SDK's schedule) widens the first sleep after a drop with a close code
    (1006 when the gateway vanished, 1012 or 4012 when it restarts) by U(0, spread): thousands of
    links dropped at the same instant then come back spread over that window, not all at once."""

    def __init__(self, initial: float, after_server_close: float, maximum: float,
                 rng: Callable[[], float] = random.random, spread: float = 0.0) -> None:
        self.initial, self.after_server_close, self.maximum, self.rng = initial, after_server_close, maximum, rng
        self.spread = spread
        self.base = initial
        self._spread_next = 0.0

    def reset(self) -> None:
        self.base = self.initial

    def on_drop(self, close_code: int | None) -> None:
        # 1009 is our own close of a too-large message: the next page is smaller, retry soon
        local = (None, 1000, 1006, transport.MESSAGE_TOO_BIG)
        self.base = self.initial if close_code in local else self.after_server_close
        self.base = min(max(self.base, self.initial), self.maximum)
        self._spread_next = self.spread if close_code not in (None, 1000, transport.MESSAGE_TOO_BIG) else 0.0

    def next_delay(self) -> float:
        delay = self.base + self.rng() * min(self.base, self.maximum - self.base)
        if self._spread_next:
            delay += self.rng() * self._spread_next
            self._spread_next = 0.0
        self.base = min(self.base * 2, self.maximum)
        return delay


def refresh_delay(expires_at: float, now: float, refresh_before: float) -> float:
    """Seconds until a token expiring at `expires_at` should be refreshed (0 = now)."""
    return max(0.0, expires_at - refresh_before - now)


class _Dropped(Exception):
    """The connection ended; `code` is the WebSocket close code if one was received."""

    def __init__(self, reason: str, code: int | None = None) -> None:
        super().__init__(reason)
        self.code = code


class _Fatal(Exception):
    """Stop reconnecting: the gateway refused us for good or kicked us."""


@dataclass
class _Pending:
    event: trio.Event = field(default_factory=trio.Event)
    result: dict[str, Any] | None = None
    error: AundError | None = None


class _Socket:
    """The link's socket: one open, authenticated WebSocket and the calls waiting on it."""

    def __init__(self, ws: websocket.WebSocket, url: str) -> None:
        self.ws, self.url = ws, url
        self.pending: dict[str, _Pending] = {}
        self.close_code: int | None = None
        self.kicked: dict[str, Any] | None = None
        self.ended = trio.Event()

    def end(self, code: int | None) -> None:
        """Mark the connection over (closed by the peer, or judged dead by us)."""
        if self.close_code is None:
            self.close_code = code
        self.ended.set()

    def fail_all(self, error: AundError) -> None:
        for waiter in self.pending.values():
            if not waiter.event.is_set():
                waiter.error = error
                waiter.event.set()
        self.pending.clear()


@dataclass(frozen=True)
class LinkStatistics:
    aid: str
    slot_id: str
    state: str
    gateway: str
    connected_at: float | None
    last_connected_at: float | None
    connects: int
    reconnects: int
    last_error: str
    in_flight: int
    queued: int
    background_in_flight: int
    max_in_flight: int
    max_background_in_flight: int
    pulls_executed: int
    pulls_coalesced: int
    rpcs: int  # RPCs started on this link since the daemon started


class Link:
    def __init__(self, creds: Credentials, config: LinkConfig, trust: auth.GatewayTrust, *,
                 global_budget: budget_mod.CallBudget | None = None,
                 on_event: Callable[["Link", str, dict[str, Any]], None] | None = None,
                 on_state: Callable[["Link", LinkState, dict[str, Any]], None] | None = None,
                 on_connected: Callable[["Link"], Awaitable[None]] | None = None,
                 on_admission_refused: Callable[["Link", AuthError, str, dict[str, Any]], Awaitable[bool]]
                 | None = None,
                 rng: Callable[[], float] = random.random,
                 connector: transport.Connector | None = None,
                 connect_gate: trio.CapacityLimiter | None = None,
                 loop_lag: LoopLag | None = None) -> None:
        """`connector` opens the gateway WebSockets (the link's and the pre-auth ones of refresh and
        login); default the network's (`transport.open_connection`), a test passes a fake's.
        `connect_gate` (shared by a daemon's links) bounds the handshakes in progress at once: a
        token from authentication to the `auth.connect` answer. `loop_lag`: a heartbeat that
        timed out while the trio loop itself ran late is not held against the gateway."""
        if not config.gateways:
            raise ValueError("a link needs at least one gateway URL")
        self.creds, self.config, self.trust = creds, config, trust
        self.aid = creds.aid
        self.global_budget = global_budget
        self.connector = connector or transport.open_connection
        self.on_event, self.on_state, self.on_connected = on_event, on_state, on_connected
        self.on_admission_refused = on_admission_refused  # publish what a -32003 asks for; True: retry
        self.budget = RpcBudget(config.rpc_in_flight, config.rpc_background)
        self.pulls = PullGate(config.pull_namespaces)
        self.backoff = Backoff(config.backoff_initial, config.backoff_after_server_close, config.backoff_max, rng,
                               spread=config.drop_spread)
        self.connect_gate, self.loop_lag = connect_gate, loop_lag
        self._gate_token: object | None = None
        self.state = LinkState.STANDBY
        self._session: _Socket | None = None
        self._session_open = False  # authenticated socket, post-connect work may call
        self._ready = trio.Event()
        self._state_changed = trio.Event()
        self._closing = False
        self._running = False
        self._stopped = trio.Event()
        self._cancel = trio.CancelScope()
        self._gateway_index = 0
        self._tokens: auth.Tokens | None = None
        self.connected_at: float | None = None
        self.last_connected_at: float | None = None
        self.connects = 0
        self.reconnects = 0
        self.last_error = ""
        self.failure: AundError | None = None
        self.log = log.bind(aid=self.aid, slot=config.slot_id)

    def __repr__(self) -> str:
        b = self.budget.statistics()
        return f"<Link {self.aid}/{self.config.slot_id} {self.state.value} | rpc {b.in_flight} active, " \
               f"{b.queued_foreground + b.queued_background} queued>"

    # --- state -----------------------------------------------------------------------------------
    def _set_state(self, state: LinkState, **info: Any) -> None:
        if state == self.state:
            return
        old, self.state = self.state, state
        if state == LinkState.READY:
            self._ready.set()
        elif old == LinkState.READY:
            self._ready = trio.Event()
        self._state_changed.set()
        self._state_changed = trio.Event()
        self.log.info("link.state", old=old.value, new=state.value, **info)
        if self.on_state is not None:
            self.on_state(self, state, {"old": old.value, **info})

    @property
    def gateway(self) -> str:
        return self.config.gateways[self._gateway_index % len(self.config.gateways)]

    async def wait_ready(self) -> None:
        """Wait until ready; raises GatewayUnavailable (not retryable) if the link failed or closed."""
        while self.state != LinkState.READY:
            if self.state in (LinkState.CONNECTION_FAILED, LinkState.CLOSED):
                raise GatewayUnavailable(f"link {self.aid}/{self.config.slot_id} is {self.state.value}: "
                                         f"{self.last_error}", retryable=False,
                                         data={"state": self.state.value})
            await self._state_changed.wait()

    @property
    def is_ready(self) -> bool:
        return self.state == LinkState.READY

    @property
    def access_token(self) -> str:
        """The current access token (for the gateway's HTTP side: agent.md); never logged."""
        return self._tokens.access_token if self._tokens is not None else ""

    @property
    def session_open(self) -> bool:
        """An authenticated socket is up (post-connect work may call before the link is ready)."""
        return self._session_open

    async def wait_stopped(self) -> None:
        """Return once the supervisor has ended (closed, or failed for good)."""
        await self._stopped.wait()

    def statistics(self) -> LinkStatistics:
        b, p = self.budget.statistics(), self.pulls.statistics()
        return LinkStatistics(self.aid, self.config.slot_id, self.state.value, self.gateway, self.connected_at,
                              self.last_connected_at, self.connects, self.reconnects, self.last_error,
                              b.in_flight, b.queued_foreground + b.queued_background, b.background_in_flight,
                              b.max_in_flight, b.max_background_in_flight, p.executed, p.coalesced, b.granted)

    # --- supervisor ------------------------------------------------------------------------------
    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Keep the link connected until `aclose()` or a fatal refusal. Started = supervising."""
        if self._running or self._stopped.is_set():
            raise RuntimeError("a Link runs once")
        self._running = True
        task_status.started()
        try:
            await self._supervise()
        finally:
            self._running = False
            self._stopped.set()

    async def _supervise(self) -> None:
        with self._cancel:
            first = True
            while not self._closing:
                self._set_state(LinkState.CONNECTING if first else LinkState.RECONNECTING, gateway=self.gateway)
                try:
                    await self._connect_and_serve()
                    code = None
                except _Fatal as exc:
                    self.last_error = str(exc)
                    self._set_state(LinkState.CONNECTION_FAILED, reason=str(exc))
                    return
                except _Dropped as exc:
                    self.last_error, code = str(exc), exc.code
                except (AuthError, PermissionDenied, InvalidParams) as exc:
                    if not _auth_retryable(exc):
                        self.failure = exc
                        self.last_error = str(exc)
                        self._set_state(LinkState.CONNECTION_FAILED, reason=str(exc))
                        return
                    self.last_error, code = str(exc), None
                except AundError as exc:  # transient: gateway down, timeout, refused for now
                    self.last_error, code = str(exc), None
                if self._closing:
                    break
                if first or self.state == LinkState.READY or self.connected_at is not None:
                    self.backoff.on_drop(code)
                self.connected_at = None
                first = False
                self._gateway_index += 1  # the next attempt tries the next candidate
                delay = self.backoff.next_delay()
                self._set_state(LinkState.RETRY_BACKOFF, delay=round(delay, 3), error=self.last_error)
                await trio.sleep(delay)
        self._set_state(LinkState.CLOSED)

    async def aclose(self) -> None:
        """Close the link (idempotent): fail waiting calls, close the socket politely, stop the supervisor.

        The socket is closed by the connection task itself (while the link's reader still reads), so
        the close handshake completes; after a grace period the supervisor is cancelled outright.
        """
        self._closing = True
        session = self._session
        if session is not None:
            session.fail_all(GatewayUnavailable("link closed", retryable=False))
            session.end(1000)
        if self._running:
            if session is None and self.state == LinkState.RETRY_BACKOFF:
                self._cancel.cancel()  # no socket to close politely: only the backoff sleep to end
            with trio.move_on_after(2) as scope:
                scope.shield = True
                await self._stopped.wait()
            self._cancel.cancel()
            with trio.CancelScope(shield=True):
                await self._stopped.wait()
        self._set_state(LinkState.CLOSED)

    async def _authenticate(self, url: str) -> auth.Tokens:
        """Stored token -> refresh -> full login (the SDK's order). Rotated tokens are saved before use."""
        tokens = self._tokens if self._tokens is not None else await self.creds.load_tokens()
        if tokens is not None and tokens.usable():
            return tokens
        if tokens is not None and tokens.refresh_token:
            try:
                fresh = await auth.refresh(url, self.aid, tokens, device_id=self.config.device_id,
                                           slot_id=self.config.slot_id, connector=self.connector)
                await self.creds.save_tokens(fresh)
                return fresh
            except auth.ReloginRequired:
                self.log.info("link.relogin", reason="refresh token refused")
        fresh = await self._login(url)
        await self.creds.save_tokens(fresh)
        return fresh

    async def _login(self, url: str) -> auth.Tokens:
        """A full login; refused for our certificate, once more with the current one the gateway
        serves for our key (another instance of this AID renewed it), if the credentials take it."""
        adopt = getattr(self.creds, "adopt_cert", None)  # a `new_cert` of login2
        try:
            return await auth.login(url, self.trust, self.aid, self.creds.private_key, self.creds.cert_pem,
                                    on_new_cert=adopt, connector=self.connector)
        except AuthError:
            sync = getattr(self.creds, "sync_cert", None)
            if sync is None or not await sync(url, self.trust):
                raise
            self.log.info("link.cert_synced", reason="login refused our certificate; the gateway serves a newer one")
            return await auth.login(url, self.trust, self.aid, self.creds.private_key, self.creds.cert_pem,
                                    on_new_cert=adopt, connector=self.connector)

    async def _connect_and_serve(self) -> None:
        if self.connect_gate is not None:
            token = object()
            await self.connect_gate.acquire_on_behalf_of(token)
            self._gate_token = token
        try:
            await self._connect_and_serve_gated()
        finally:
            self._release_gate()

    def _release_gate(self) -> None:
        """The handshake is over (answered, or failed): let the next link's start."""
        token, self._gate_token = self._gate_token, None
        if token is not None and self.connect_gate is not None:
            self.connect_gate.release_on_behalf_of(token)

    async def _connect_and_serve_gated(self) -> None:
        url = self.gateway
        self._tokens = await self._authenticate(url)
        outcome: Exception | None = None
        async with trio.open_nursery() as nursery:
            try:
                try:
                    ws, close = await self.connector(nursery, url, max_frame=self.config.max_frame,
                                                     timeout=self.config.connect_timeout)
                except (OSError, trio.BrokenResourceError, websocket.HandshakeError, trio.TooSlowError) as exc:
                    raise GatewayUnavailable(f"cannot connect to {url}: {transport.describe(exc)}") from None
                session = _Socket(ws, url)
                try:
                    await self._open_session(session, nursery)
                    await self._serve(session)
                finally:
                    self._session_open = False
                    self._session = None
                    session.fail_all(GatewayUnavailable("connection to the gateway dropped"))
                    await close()
            except (AundError, _Dropped, _Fatal) as exc:
                outcome = exc  # raised below, outside the nursery, so callers see it unwrapped
            nursery.cancel_scope.cancel()
        if outcome is not None:
            raise outcome

    async def _open_session(self, session: _Socket, nursery: trio.Nursery) -> None:
        ws = session.ws
        try:
            with trio.fail_after(self.config.connect_timeout):
                while True:
                    frame = rpc.parse_frame(str(await ws.get_message()))
                    if frame.get("method") == "challenge":
                        break
        except trio.TooSlowError:
            raise GatewayUnavailable("no challenge from the gateway") from None
        except websocket.ConnectionClosed as exc:
            raise _Dropped(f"closed before challenge: {exc.code} {exc.reason}", exc.code) from None
        except rpc.FrameError as exc:
            raise GatewayError(f"malformed challenge: {exc}") from None
        nonce = (frame.get("params") or {}).get("nonce")
        self._session = session
        nursery.start_soon(self._reader, session)
        params: dict[str, Any] = {
            "nonce": nonce, "auth": {"method": "kite_token", "token": self._tokens.access_token},
            "protocol": {"min": "1.0", "max": "1.0"}, "device": {"id": self.config.device_id, "type": "sdk"},
            "client": {"slot_id": self.config.slot_id, "sdk_lang": "python", "sdk_version": "aund"},
            "delivery_mode": {"mode": self.config.delivery_mode, "routing": self.config.delivery_routing,
                              "affinity_ttl_ms": self.config.affinity_ttl_ms},
            "capabilities": SDK_CAPABILITIES}
        if self.config.kind == "short":
            params["options"] = {"kind": "short", "short_ttl_ms": 30000}
        try:
            hello = await self._send_and_wait(session, "auth.connect", params, self.config.connect_timeout)
        except AuthError as exc:
            # A refused access token is never tried again; its refresh token may still serve.
            self._tokens = auth.Tokens("", self._tokens.refresh_token, 0.0)
            raise GatewayUnavailable(f"auth.connect refused the access token ({exc}); "
                                     "will refresh or log in again") from None
        if hello.get("status") != "ok" or (hello.get("capabilities") or {}).get("p2p_peer_pull_v1") is not True:
            raise _Fatal("gateway does not support peer-mode pull (p2p_peer_pull_v1): unsupported_protocol")
        self._release_gate()  # the resync below is RPCs within the budget, not handshake work
        self._session_open = True
        self.connects += 1
        if self.last_connected_at is not None:
            self.reconnects += 1
        self.connected_at = self.last_connected_at = time.time()
        nursery.start_soon(self._heartbeat, session)
        nursery.start_soon(self._refresh_loop, session)
        if self.on_connected is not None:
            await self.on_connected(self)  # resync before new work
        if self._closing:  # aclose() came during the resync: never ready
            raise _Dropped("link closed while connecting", 1000)
        self.backoff.reset()
        self._set_state(LinkState.READY, gateway=session.url)

    async def _serve(self, session: _Socket) -> None:
        """Until the connection drops: then raise _Dropped or _Fatal."""
        await session.ended.wait()
        code = session.close_code
        if session.kicked is not None:
            raise _Fatal(f"kicked by the gateway: code={session.kicked.get('code')} "
                         f"reason={session.kicked.get('reason')}")
        if code in NO_RECONNECT_CODES:
            raise _Fatal(f"gateway closed with code {code}: no reconnect")
        raise _Dropped(f"connection closed (code {code})", code)

    # --- reader, heartbeat, refresh ----------------------------------------------------------------
    async def _reader(self, session: _Socket) -> None:
        """Always drains the socket: replies to waiters, events to on_event. Ends the session on close."""
        ws = session.ws
        code: int | None = None
        try:
            while True:
                text = await ws.get_message()
                try:
                    frame = rpc.parse_frame(text if isinstance(text, str) else text.decode("utf-8", "replace"))
                except rpc.FrameError as exc:
                    self.log.warning("link.bad_frame", error=str(exc))
                    continue
                if "method" in frame:
                    if "id" not in frame:
                        self._dispatch_event(session, frame["method"], frame.get("params") or {})
                    continue
                waiter = session.pending.pop(str(frame.get("id")), None)
                if waiter is None:
                    continue  # a reply to a call that was cancelled
                if "error" in frame:
                    waiter.error = frame["error"]  # mapped by the caller, who knows the method
                else:
                    waiter.result = frame.get("result")
                waiter.event.set()
        except websocket.ConnectionClosed as exc:
            code = exc.code or 1006
        finally:
            session.end(code)
            # waiters learn now, and why (a 1009 tells the pull to ask for a smaller page)
            session.fail_all(GatewayUnavailable(f"connection to the gateway closed (code {code})",
                                                data={"close_code": code}))

    def _dispatch_event(self, session: _Socket, method: str, params: dict[str, Any]) -> None:
        name = method.removeprefix("event/")
        if name == "gateway.disconnect":
            code = params.get("code")
            reason = str(params.get("reason") or "")
            if code != codes.CLOSE_SHUTDOWN and "long_connection_already_exists" not in reason:
                session.kicked = {"code": code, "reason": reason}
            self.log.warning("link.server_disconnect", code=code, reason=reason)
        if self.on_event is not None:
            self.on_event(self, name, params)

    async def _heartbeat(self, session: _Socket) -> None:
        excused = 0  # pong timeouts in a row that the loop's own lateness explains
        while True:
            await trio.sleep(self.config.heartbeat_interval)
            sent = trio.current_time()
            with trio.move_on_after(self.config.pong_timeout) as scope:
                try:
                    await session.ws.ping()
                except (websocket.ConnectionClosed, ValueError):
                    return
            if not scope.cancelled_caught:
                excused = 0
                continue
            if self.loop_lag is not None and self.loop_lag.late_since(sent) and excused < HEARTBEAT_EXCUSED:
                excused += 1  # we were not scheduled: the pong may be waiting unread; ping again
                self.log.info("link.heartbeat_late_loop", lag=round(self.loop_lag.last_lag, 3), excused=excused)
                continue
            self.log.warning("link.heartbeat_timeout", timeout=self.config.pong_timeout)
            session.end(1006)
            return

    async def _refresh_loop(self, session: _Socket) -> None:
        failures = 0
        while True:
            tokens = self._tokens
            wait = refresh_delay(tokens.expires_at, time.time(), self.config.refresh_before) if tokens else 0
            await trio.sleep(max(wait, 0.0) if failures == 0 else self.config.refresh_check)
            try:
                try:
                    fresh = await auth.refresh(session.url, self.aid, self._tokens, device_id=self.config.device_id,
                                               slot_id=self.config.slot_id, connector=self.connector)
                except auth.ReloginRequired:
                    fresh = await self._login(session.url)
                await self.creds.save_tokens(fresh)  # persisted before anything uses it
                self._tokens = fresh
                failures = 0
                self.log.info("link.token_refreshed", expires_in=round(fresh.expires_at - time.time()))
                if self.on_event is not None:
                    self.on_event(self, "token.refreshed", {"expires_at": fresh.expires_at})
            except AundError as exc:
                failures += 1
                self.log.warning("link.token_refresh_failed", error=str(exc), failures=failures)
                if failures >= 3:
                    session.end(1006)
                    return

    # --- calls -----------------------------------------------------------------------------------
    async def _send_and_wait(self, session: _Socket, method: str, params: dict[str, Any],
                             timeout: float) -> dict[str, Any]:
        req = rpc.request(method, params)
        waiter = _Pending()
        session.pending[req["id"]] = waiter
        started = trio.current_time()
        try:
            try:
                text = rpc.dumps(req)
            except (TypeError, ValueError) as exc:  # bytes, NaN, ... in an app's params
                raise InvalidParams(f"{method}: params are not JSON: {exc}", data={"arg": "params"}) from None
            with trio.fail_after(timeout):
                try:
                    await session.ws.send_message(text)
                except websocket.ConnectionClosed:
                    raise GatewayUnavailable(f"{method}: connection closed") from None
                await waiter.event.wait()
        except trio.TooSlowError:
            raise RpcTimeout(f"rpc timeout: {method}", data={"method": method}) from None
        finally:
            session.pending.pop(req["id"], None)
            self.log.debug("link.rpc", method=method, id=req["id"],
                           ms=round((trio.current_time() - started) * 1000, 2),
                           error=(waiter.error or {}).get("code") if isinstance(waiter.error, dict) else None)
        if waiter.error is not None:
            raise waiter.error if isinstance(waiter.error, AundError) else map_remote_error(method, waiter.error)
        if not isinstance(waiter.result, dict):
            raise GatewayError(f"{method}: result is not an object", retryable=False)
        return waiter.result

    async def call(self, method: str, params: dict[str, Any] | None = None, *, timeout: float | None = None,
                   background: bool = False, on_behalf_of: object | None = None) -> dict[str, Any]:
        """Call a gateway method within the budget; waits for the link to be ready (bounded by timeout).

        A gateway that refuses the call with -32003 (the production admission of clients declaring
        `agent_md_validation_v1`: the AID's agent.md, or a group's certificate or card, is missing)
        is answered by `on_admission_refused(link, error, method, params)`, which publishes what is
        missing and says whether to retry; the call is then retried after 0, 50, 100 and 200 ms
        while the same refusal comes back, as the SDK recovers."""
        for delay in (*ADMISSION_RETRY_DELAYS, None):
            try:
                return await self._call(method, params, timeout=timeout, background=background,
                                        on_behalf_of=on_behalf_of)
            except AuthError as exc:
                if delay is None or self.on_admission_refused is None or not _admission_refused(exc):
                    raise
                if delay == ADMISSION_RETRY_DELAYS[0]:
                    self.log.info("link.admission_refused", method=method, reason=str(exc)[:120])
                    if not await self.on_admission_refused(self, exc, method, dict(params or {})):
                        raise
                await trio.sleep(delay)
        raise AssertionError("unreachable")  # pragma: no cover

    async def _call(self, method: str, params: dict[str, Any] | None, *, timeout: float | None,
                    background: bool, on_behalf_of: object | None) -> dict[str, Any]:
        if method in INTERNAL_ONLY:
            raise InvalidParams(f"{method} is managed by aund and cannot be called directly")
        params = dict(params or {})
        timeout = self.config.call_timeout if timeout is None else timeout
        deadline = trio.current_time() + timeout
        sent = False
        try:
            with trio.fail_after(timeout):
                if not self._session_open:
                    await self.wait_ready()
                async with self.budget.slot(background), self._global_token(on_behalf_of):
                    session = self._session
                    if session is None or not self._session_open:
                        raise GatewayUnavailable(f"{method}: not connected", retryable=not self._closing)
                    if signing.needs_signature(method):
                        params = self._signed(method, params)
                    sent = True
                    return await self._send_and_wait(session, method, params,
                                                     max(0.0, deadline - trio.current_time()))
        except trio.TooSlowError:
            what = "rpc timeout" if sent else "rpc queue timeout before send"
            raise RpcTimeout(f"{what}: {method}", data={"method": method}) from None

    @asynccontextmanager
    async def _global_token(self, on_behalf_of: object | None) -> AsyncIterator[None]:
        """A token of the daemon-wide budget for one RPC, unless this task holds one already (an
        app's call got it at the socket: `budget.holding`)."""
        if self.global_budget is None or budget_mod.holds(self.global_budget):
            yield
            return
        owner = (on_behalf_of, object())  # one borrower per RPC (an app may have many in flight)
        await self.global_budget.acquire_for_daemon(owner)
        try:
            yield
        finally:
            self.global_budget.release_for_daemon(owner)

    def _signed(self, method: str, params: dict[str, Any]) -> dict[str, Any]:
        """params with what the SDK adds to a signed method: `aad` for `org.*`, then `client_signature`."""
        try:
            params = signing.org_request(method, params)
        except signing.BindingError as exc:
            raise InvalidParams(str(exc), data={"arg": "params"}) from None
        try:
            return signing.sign_for_wire(method, params, aid=self.aid, key=self.creds.private_key,
                                       cert_fingerprint=self.creds.cert_fingerprint)
        except (TypeError, ValueError) as exc:
            raise InvalidParams(f"{method}: params are not JSON: {exc}", data={"arg": "params"}) from None

    async def notify(self, method: str, params: dict[str, Any], *, timeout: float | None = None,
                     on_behalf_of: object | None = None) -> None:
        """Send one JSON-RPC notification (no id, no answer) within the budget: returns once the
        frame is queued for the connection's writer, which says nothing about delivery (the SDK's
        `notify`)."""
        text = rpc.dumps(rpc.notification(method, params))  # the caller checked params are JSON
        timeout = self.config.call_timeout if timeout is None else timeout
        try:
            with trio.fail_after(timeout):
                if not self._session_open:
                    await self.wait_ready()
                async with self.budget.slot(False), self._global_token(on_behalf_of):
                    session = self._session
                    if session is None or not self._session_open:
                        raise GatewayUnavailable(f"{method}: not connected", retryable=not self._closing)
                    try:
                        await session.ws.send_message(text)
                    except websocket.ConnectionClosed:
                        raise GatewayUnavailable(f"{method}: connection closed") from None
        except trio.TooSlowError:
            raise RpcTimeout(f"notification not sent in time: {method}", data={"method": method}) from None

    async def pull(self, namespace: str, key: str, method: str, params: dict[str, Any], *,
                   background: bool = False, timeout: float | None = None) -> dict[str, Any]:
        """A pull through the gate: one per namespace, identical keys coalesced."""
        return await self.pulls.run(namespace, key, lambda: self.call(method, params, timeout=timeout,
                                                                      background=background))


async def wait_ready_or_forever(link: "Link") -> None:
    """Until `link` is ready; forever once it failed or closed (the tasks that wait so end with
    it). For a background loop that has nothing to do while the link is down: waiting on the
    link's state costs nothing, where a timer that looks every half second costs 10,000 links
    20,000 cancellations a second."""
    try:
        await link.wait_ready()
    except GatewayUnavailable:
        await trio.sleep_forever()


ADMISSION_RETRY_DELAYS = (0.0, 0.05, 0.1, 0.2)
HEARTBEAT_EXCUSED = 3  # pong timeouts in a row forgiven while the loop runs late; then the link is dead


def _admission_refused(exc: AuthError) -> bool:
    return exc.data.get("remote_code") == codes.AGENT_MD_REQUIRED


def own_card_refused(exc: AundError) -> bool:
    """The -32003 names the AID's own agent.md (not a group's certificate or card)."""
    return "valid agent.md is required" in str(exc).lower()


def _auth_retryable(exc: AundError) -> bool:
    text = str(exc)
    return any(t in text for t in ("long_connection_already_exists", "aid_login1_failed", "aid_login2_failed")) \
        or exc.retryable
