"""Test helpers for apps built on aund, in the spirit of ``trio.testing``: a whole local AUN
network and a daemon inside the test's own trio run, on loopback and in a temporary directory,
so an app's tests talk to the real thing without any setup.

    import trio
    from aund.testing import local_aund
    from client_stub import AsyncClient   # or Client, from a worker thread

    async def test_my_agent(tmp_path):
        async with local_aund(tmp_path, identities=["my-agent.aid.test"]) as env:
            ...  # env.socket: point client_stub at it; env.devnet.gateway_url, env.daemon

`local_devnet` alone starts a devnet (aund's local AUN gateway, the one the official SDK accepts)
and yields its `DevnetInfo`; `start_daemon` starts a daemon in a given nursery (the app socket
is served by `local_aund`). Everything stops when the block ends. trio only; a blocking
`client_stub.Client` must run in a worker thread (`trio.to_thread.run_sync`), an asyncio
`AsyncClient` in its own thread too.
"""
from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import trio

from aund.broker.backend import AppIdentity

#: the identity the daemon's API sees when a test calls it directly (not through the socket)
TEST_APP = AppIdentity(1, os.getpid(), os.getuid(), os.getgid(), "test")
TEST_SEED = "aund-testing-seed-not-secret"


@asynccontextmanager
async def local_devnet(state_dir: Path, **options: Any) -> AsyncIterator[Any]:
    """A devnet on 127.0.0.1 (a free port) with its state under `state_dir`; `options` are
    `aund.devnet.serve_devnet`'s (issuer, pki_mode, federate, ...). Yields its DevnetInfo."""
    from aund.devnet import serve_devnet

    stop = trio.Event()
    async with trio.open_nursery() as nursery:
        info = await nursery.start(partial(serve_devnet, "127.0.0.1", 0, Path(state_dir), stop=stop, **options))
        try:
            yield info
        finally:
            stop.set()


async def start_daemon(nursery: trio.Nursery, devnet: Any, state_dir: Path, aids: list[str] | tuple[str, ...] = (),
                       *, root_ca: bool = True, seed: str = TEST_SEED, **settings: Any) -> Any:
    """A Daemon started in `nursery`, holding `aids` on `devnet` (anything with `gateway_url` and
    `root_ca`), its state under `state_dir`; `root_ca=False` trusts only the bundled AUN root;
    `settings` are further `aund.config.Config` fields."""
    from aund.aun.trust import GatewayTrust
    from aund.config import Config
    from aund.daemon import Daemon
    from aund.identity.store import IdentityStore

    state_dir = Path(state_dir)
    config = Config(state_dir=state_dir, socket=state_dir.parent / f"{state_dir.name}.sock",
                    gateway_url=(devnet.gateway_url,), root_ca=(Path(devnet.root_ca),) if root_ca else (),
                    identities=tuple(aids), **settings)
    state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    store = await trio.to_thread.run_sync(IdentityStore, state_dir, seed)
    daemon = Daemon(config, store, GatewayTrust.from_files(list(config.root_ca), state_dir))
    await nursery.start(daemon.run)
    return daemon


async def ready_session(daemon: Any, aid: str, app: AppIdentity = TEST_APP, slot_id: str = "main") -> Any:
    """A session on `aid` once the daemon has it (a configured identity may still be registering), ready."""
    from aund.errors import AundError

    while True:
        try:
            handle = await daemon.open_session(app, aid, slot_id)
            break
        except AundError:
            await trio.sleep(0.05)
    await handle.wait_ready()
    return handle


@dataclass
class LocalAund:
    devnet: Any        # DevnetInfo: gateway_url, http_url, root_ca, devnet (the gateway object)
    daemon: Any        # aund.daemon.Daemon
    socket: Path       # the app socket: client_stub.Client(socket) / AsyncClient(socket)
    broker: Any = None  # aund.broker.BrokerServer serving `socket` (sharing the daemon's call budget)


@asynccontextmanager
async def local_aund(tmp_path: Path, identities: list[str] | tuple[str, ...] = (), **settings: Any
                     ) -> AsyncIterator[LocalAund]:
    """A devnet, a daemon holding `identities` on it and the daemon's app socket, all under
    `tmp_path` (the socket in a short directory of its own when `tmp_path` is too long for one)."""
    import tempfile

    from aund.broker import serve_broker

    tmp_path = Path(tmp_path)
    sock_dir = Path(tempfile.mkdtemp(prefix="aund-t-", dir="/tmp" if len(str(tmp_path)) > 60 else tmp_path))
    socket = sock_dir / "aund.sock"
    async with local_devnet(tmp_path / "devnet") as devnet, trio.open_nursery() as nursery:
        daemon = await start_daemon(nursery, devnet, tmp_path / "aund", identities, **settings)
        broker = await nursery.start(partial(serve_broker, daemon, socket_path=socket,
                                             call_limiter=daemon.global_budget))
        try:
            yield LocalAund(devnet, daemon, socket, broker)
        finally:
            await daemon.aclose()
            nursery.cancel_scope.cancel()


# --- an in-memory gateway for tests of links ---------------------------------------------------

class MemoryCredentials:
    """What a `Link` needs of an identity, in memory: a fresh P-256 key, no certificate, and the
    tokens given (`FakeGateway.credentials` hands out ones its gateway accepts). `saved` lists
    every rotation the link persisted, in order."""

    def __init__(self, aid: str, tokens: Any = None, private_key: Any = None) -> None:
        from aund.identity import pki

        self.aid = aid
        self.private_key = private_key if private_key is not None else pki.generate_key()
        self.cert_pem = ""
        self.cert_fingerprint = "sha256:" + "0" * 64
        self.tokens = tokens
        self.saved: list[Any] = []

    async def load_tokens(self) -> Any:
        return self.tokens

    async def save_tokens(self, tokens: Any) -> None:
        self.saved.append(tokens)
        self.tokens = tokens


@dataclass
class FakeCall:
    """One request a FakeGateway received: when (trio time), on which connection, what."""

    at: float
    connection: "FakeConnection"
    method: str
    params: dict[str, Any]
    id: Any
    answered_at: float | None = None


_CLOSED = object()  # the sentinel that ends a connection's queue of frames to the client


class FakeConnection:
    """The client's end of one FakeGateway connection; used by the link as an
    `aund.aun.ws.WebSocket` (get_message, send_message, ping), closed by the `close` it came with."""

    def __init__(self, gateway: "FakeGateway", index: int, nursery: trio.Nursery, max_frame: int) -> None:
        import math

        self.gateway, self.index, self._nursery, self.max_frame = gateway, index, nursery, max_frame
        self._out_send, self._out_recv = trio.open_memory_channel[Any](math.inf)
        self._closed_event = trio.Event()
        self.nonce = f"fake-nonce-{index}"
        self.opened_at = trio.current_time()
        self.closed_at: float | None = None
        self.close_code: int | None = None
        self.closed_by = ""          # "gateway" | "client" once closed
        self.authenticated = False   # auth.connect answered ok
        self.connect_params: dict[str, Any] = {}
        self.answer_pings = True
        self.pings: list[float] = []
        self._to_client({"jsonrpc": "2.0", "method": "challenge",
                         "params": {"nonce": self.nonce, "server": "aund-fake-gateway",
                                    "protocol": {"min": "1.0", "max": "1.0"}, "auth_methods": ["kite_token"]}})

    @property
    def closed(self) -> bool:
        return self._closed_event.is_set()

    def _reason(self) -> Any:
        from aund.aun.ws import ConnectionClosed

        return ConnectionClosed(self.close_code or 1006, f"closed by the {self.closed_by}")

    def _end(self, code: int, by: str) -> None:
        if self.closed:
            return
        self.close_code, self.closed_by, self.closed_at = code, by, trio.current_time()
        self._closed_event.set()
        self._out_send.send_nowait(_CLOSED)
        self.gateway._changed()

    def _to_client(self, frame: dict[str, Any]) -> None:
        from aund.aun import jsonrpc as rpc

        if self.closed:
            return
        text = rpc.dumps(frame)
        if len(text.encode("utf-8")) > self.max_frame:  # what aund.aun.ws does with a too-large message
            self._end(1009, "client")
            return
        self._out_send.send_nowait(text)

    # the WebSocket the link sees
    async def get_message(self) -> str:
        item = await self._out_recv.receive()
        if item is _CLOSED:
            self._out_send.send_nowait(_CLOSED)  # every later read raises too
            raise self._reason()
        return item

    async def send_message(self, text: str) -> None:
        await trio.lowlevel.checkpoint()
        if self.closed:
            raise self._reason()
        self.gateway._received(self, text)

    async def ping(self, payload: bytes | None = None) -> None:
        await trio.lowlevel.checkpoint()
        if self.closed:
            raise self._reason()
        self.pings.append(trio.current_time())
        self.gateway._changed()
        if not (self.answer_pings and self.gateway.answer_pings):
            await self._closed_event.wait()  # no pong: only the close ends the wait
            raise self._reason()

    async def _close_by_client(self) -> None:
        await trio.lowlevel.cancel_shielded_checkpoint()
        self._end(1000, "client")

    # the gateway's side
    def push(self, method: str, params: dict[str, Any]) -> None:
        self._to_client({"jsonrpc": "2.0", "method": method, "params": params})

    def close(self, code: int = 1000) -> None:
        """Close from the gateway's side with `code` (the client's next read raises ConnectionClosed)."""
        self._end(code, "gateway")


class FakeGateway:
    """An in-memory AUN gateway for tests of `aund.aun.link.Link` (and of code built on links):
    pure trio (memory channels, no socket), so it runs under trio's MockClock (`autojump_clock`)
    and every delay in it is virtual time.

    It speaks what a link expects: a `challenge` on every connection, `auth.connect` (checks the
    nonce and that the access token is one it issued and still valid; answers ok with the
    capabilities a link requires), `auth.refresh_token` (rotates both tokens), `meta.ping`. A test
    registers further methods (`on`), pushes events (`push`), delays or drops replies (`delay`,
    `drop`), closes or kicks connections with a close code (`close`, `kick`), stops answering
    WebSocket pings (`answer_pings = False`), refuses connects (`refuse`), and counts everything
    (`attempts`, `connections`, `sessions`, `calls`, `notifications`, `count`).

        import trio
        from aund.aun.auth import GatewayTrust
        from aund.aun.link import Link, LinkConfig
        from aund.testing import FakeGateway

        async def test_reconnects_after_a_drop(autojump_clock):
            gw = FakeGateway()
            gw.on("meta.status", lambda params: {"mode": "gateway"})
            link = Link(gw.credentials("me.aid.test"), LinkConfig((gw.url,), device_id="dev"),
                        GatewayTrust([]), connector=gw.connect, rng=lambda: 0.0)
            async with trio.open_nursery() as nursery:
                await nursery.start(link.run)
                await link.wait_ready()
                gw.close(1006)                       # the network drops the connection
                await gw.wait_until(lambda: gw.sessions == 2)
                assert gw.connections[1].opened_at - gw.connections[0].closed_at == 1.0  # backoff
                assert (await link.call("meta.status"))["mode"] == "gateway"
                await link.aclose()

    The URL is a closed loopback port, so a link that was not given `connector=gw.connect` fails
    at once instead of reaching out. `wall_clock` is the clock token lifetimes are measured on
    (the link measures them with `time.time()`; a test that moves virtual time past an expiry
    passes the clock it patched in, as tests/unit/test_link.py's `wall` fixture does).
    """

    CAPABILITIES = {"p2p_peer_pull_v1": True, "inline_realtime_payload_v1": True, "e2ee": True, "group_e2ee": True}

    def __init__(self, url: str = "ws://127.0.0.1:9/fake-aun", *, token_lifetime: float = 3600.0,
                 wall_clock: Any = None) -> None:
        import time

        self.url = url
        self.token_lifetime = token_lifetime
        self.wall_clock = wall_clock or time.time
        self.capabilities: dict[str, Any] = dict(self.CAPABILITIES)
        self.handlers: dict[str, Any] = {"meta.ping": lambda params: {"pong": True}}
        self.answer_pings = True
        self.connect_delay = 0.0         # seconds before a connect completes (a slow network)
        self.attempts: list[float] = []  # trio time of every connect attempt, refused ones too
        self.refused = 0
        self.connections: list[FakeConnection] = []
        self.calls: list[FakeCall] = []          # requests, in the order received
        self.notifications: list[FakeCall] = []  # notifications from the client (no id)
        self._refusing: float = 0
        self._delays: dict[str, float] = {}
        self._drops: dict[str, float] = {}
        self._access: dict[str, tuple[str, float]] = {}  # access token -> (aid, expires at on wall_clock)
        self._refresh: dict[str, str] = {}               # refresh token -> aid
        self._serial = 0
        self._change = trio.Event()

    # --- what a test sets up ----------------------------------------------------------------------
    def on(self, method: str, handler: Any) -> None:
        """Answer `method` with `handler(params)` (a dict, or an awaitable of one); raising
        `aund.devnet.gateway.RpcError(code, message, data)` answers with that error (any other
        exception escapes into the link's connection nursery, so a broken handler fails the test).
        Method "*" answers every other method of an authenticated connection: `handler(params, method=...)`."""
        self.handlers[method] = handler

    def delay(self, method: str, seconds: float) -> None:
        """Answer `method` `seconds` later (0: at once again)."""
        self._delays[method] = seconds

    def drop(self, method: str, times: float = float("inf")) -> None:
        """Never answer the next `times` requests of `method` (0: answer again)."""
        self._drops[method] = times

    def refuse(self, times: float = float("inf")) -> None:
        """Refuse the next `times` connects (ConnectionRefusedError, as a closed port); 0: accept again."""
        self._refusing = times

    def issue_tokens(self, aid: str, lifetime: float | None = None) -> Any:
        """Tokens this gateway accepts for `aid` (an `aund.aun.auth.Tokens`)."""
        from aund.aun import auth

        self._serial += 1
        access, refresh = f"fake-access-{self._serial}", f"fake-refresh-{self._serial}"
        expires_at = self.wall_clock() + (self.token_lifetime if lifetime is None else lifetime)
        self._access[access] = (aid, expires_at)
        self._refresh[refresh] = aid
        return auth.Tokens(access, refresh, expires_at)

    def credentials(self, aid: str, lifetime: float | None = None) -> MemoryCredentials:
        """Credentials for `aid` holding tokens this gateway accepts (no login needed)."""
        return MemoryCredentials(aid, self.issue_tokens(aid, lifetime))

    # --- what a test does while links run -----------------------------------------------------------
    @property
    def open_sessions(self) -> list[FakeConnection]:
        return [c for c in self.connections if c.authenticated and not c.closed]

    @property
    def sessions(self) -> int:
        """Connections that completed `auth.connect` (pre-auth ones, as refresh uses, are not counted)."""
        return sum(c.authenticated for c in self.connections)

    def count(self, method: str) -> int:
        return sum(call.method == method for call in self.calls)

    def push(self, method: str, params: dict[str, Any]) -> None:
        """Send a notification (e.g. "event/message.received") on every open session."""
        for conn in self.open_sessions:
            conn.push(method, params)

    def close(self, code: int = 1000) -> None:
        """Close every open session with `code`."""
        for conn in self.open_sessions:
            conn.close(code)

    def kick(self, code: int = 4015, reason: str = "replaced by a newer long connection") -> None:
        """What a gateway does to a connection it replaces: `event/gateway.disconnect`, then the close."""
        for conn in self.open_sessions:
            conn.push("event/gateway.disconnect", {"code": code, "reason": reason})
            conn.close(code)

    async def wait_until(self, predicate: Any) -> None:
        """Return once `predicate()` holds (checked after every change at the gateway)."""
        while not predicate():
            await self._change.wait()

    def _changed(self) -> None:
        self._change.set()
        self._change = trio.Event()

    # --- the Connector (pass as Link(connector=gw.connect)) -----------------------------------------
    async def connect(self, nursery: trio.Nursery, url: str, *, max_frame: int, timeout: float) -> tuple[Any, Any]:
        self.attempts.append(trio.current_time())
        self._changed()
        if url != self.url:
            raise OSError(f"the fake gateway is {self.url}, not {url}")
        with trio.fail_after(timeout):
            await trio.sleep(self.connect_delay)
        if self._refusing > 0:
            self._refusing -= 1
            self.refused += 1
            raise ConnectionRefusedError(111, "Connection refused")
        conn = FakeConnection(self, len(self.connections), nursery, max_frame)
        self.connections.append(conn)
        return conn, conn._close_by_client

    def _received(self, conn: FakeConnection, text: str) -> None:
        from aund.aun import jsonrpc as rpc

        frame = rpc.parse_frame(text)
        if "method" not in frame:
            return  # a client never answers the gateway: nothing to do
        if "id" not in frame:  # a notification: recorded, never answered
            self.notifications.append(FakeCall(trio.current_time(), conn, frame["method"], frame.get("params") or {},
                                               None))
            self._changed()
            return
        call = FakeCall(trio.current_time(), conn, frame["method"], frame.get("params") or {}, frame["id"])
        self.calls.append(call)
        self._changed()
        if self._drops.get(call.method, 0) > 0:
            self._drops[call.method] -= 1
            return
        conn._nursery.start_soon(self._answer, call)

    async def _answer(self, call: FakeCall) -> None:
        from aund.aun import jsonrpc as rpc
        from aund.devnet.gateway import RpcError

        await trio.sleep(self._delays.get(call.method, 0.0))
        try:
            handler = self.handlers.get(call.method)
            if handler is None and call.method == "auth.connect":
                result = self._auth_connect(call.connection, call.params)
            elif handler is None and call.method == "auth.refresh_token":
                result = self._auth_refresh(call.params)
            elif not call.connection.authenticated and not call.method.startswith("auth."):
                raise RpcError(rpc.SESSION_REQUIRED, f"{call.method} needs auth.connect first")
            elif handler is None and "*" not in self.handlers:
                raise RpcError(rpc.METHOD_NOT_FOUND, f"method not found: {call.method}")
            else:
                result = (handler or partial(self.handlers["*"], method=call.method))(call.params)
                if hasattr(result, "__await__"):
                    result = await result
            frame = rpc.result(call.id, result)
        except RpcError as exc:
            frame = rpc.error(call.id, exc.code, exc.message, exc.data)
        call.answered_at = trio.current_time()
        call.connection._to_client(frame)
        self._changed()

    def _auth_connect(self, conn: FakeConnection, params: dict[str, Any]) -> dict[str, Any]:
        from aund.aun import jsonrpc as rpc
        from aund.devnet.gateway import RpcError

        if params.get("nonce") != conn.nonce or conn.authenticated:
            raise RpcError(rpc.BAD_NONCE, "invalid or reused challenge nonce")
        token = (params.get("auth") or {}).get("token")
        aid, expires_at = self._access.get(token, ("", 0.0)) if isinstance(token, str) else ("", 0.0)
        if not aid or expires_at <= self.wall_clock():
            raise RpcError(rpc.AUTH_FAILED, "token invalid or expired")
        conn.authenticated, conn.connect_params = True, params
        return {"status": "ok", "protocol": "1.0", "authenticated": True, "identity": {"aid": aid, "role": "agent"},
                "connection": {"id": f"fake-conn-{conn.index}", "device_id": (params.get("device") or {}).get("id"),
                               "slot_id": (params.get("client") or {}).get("slot_id")},
                "capabilities": dict(self.capabilities)}

    def _auth_refresh(self, params: dict[str, Any]) -> dict[str, Any]:
        aid = self._refresh.pop(str(params.get("refresh_token")), None)
        if aid is None:
            return {"success": False, "error": "invalid_or_expired_refresh_token", "relogin_required": True}
        tokens = self.issue_tokens(aid)
        return {"success": True, "aid": aid, "access_token": tokens.access_token,
                "refresh_token": tokens.refresh_token, "expires_in": self.token_lifetime}
