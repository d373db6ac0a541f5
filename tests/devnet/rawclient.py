"""A minimal raw AUN client for devnet tests: one WebSocket, frames in and out, nothing hidden.

`open_raw(url)` reads the challenge and yields a `RawClient`; `call` sends a request and waits
for its reply frame (whole frame, result or error), buffering every other frame (events,
id-less errors) in `frames`. `register`/`login` are the pre-auth short RPCs on throw-away
sockets; `connect` yields an authenticated client. Every wait is bounded by `timeout`.
"""
from __future__ import annotations

import json
import secrets
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import trio
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from trio_websocket import ConnectionClosed, WebSocketConnection, wrap_client_stream

from aund.aun import jsonrpc as rpc
from aund.aun import signing
from aund.identity import pki

TIMEOUT = 10.0
CAPABILITIES = {"e2ee": True, "p2p_peer_pull_v1": True, "inline_realtime_payload_v1": True}


class RpcFailed(AssertionError):
    def __init__(self, method: str, error: dict[str, Any]) -> None:
        super().__init__(f"{method} failed: {error}")
        self.code, self.message, self.error = error.get("code"), error.get("message"), error


@dataclass
class Identity:
    aid: str
    key: ec.EllipticCurvePrivateKey
    cert: x509.Certificate

    @property
    def fingerprint(self) -> str:
        return pki.cert_fingerprint(self.cert)


class RawClient:
    def __init__(self, ws: WebSocketConnection, challenge: dict[str, Any], stream: trio.SocketStream) -> None:
        self.ws, self.challenge, self.stream = ws, challenge, stream
        self.frames: list[dict[str, Any]] = []  # received, not yet claimed by a call
        self.identity: Identity | None = None
        self.loads: Callable[[str], Any] = rpc.loads  # strict, as aund's own client parses frames
        self._ids = 0

    @property
    def nonce(self) -> str:
        return self.challenge["params"]["nonce"]

    @property
    def events(self) -> list[dict[str, Any]]:
        return [f for f in self.frames if str(f.get("method", "")).startswith("event/")]

    async def send_text(self, text: str) -> None:
        await self.ws.send_message(text)

    async def next_frame(self, match: Callable[[dict[str, Any]], bool], timeout: float = TIMEOUT) -> dict[str, Any]:
        """The first frame (buffered or new) for which `match` is true; others stay buffered."""
        with trio.fail_after(timeout):
            while True:
                for i, frame in enumerate(self.frames):
                    if match(frame):
                        return self.frames.pop(i)
                self.frames.append(self.loads(await self.ws.get_message()))

    async def call(self, method: str, params: Any = None, *, id: Any = None, timeout: float = TIMEOUT) -> dict[str, Any]:
        """Send one request and return its reply frame."""
        if id is None:
            self._ids += 1
            id = f"t-{self._ids}"
        frame = {"jsonrpc": "2.0", "id": id, "method": method, "params": {} if params is None else params}
        await self.send_text(rpc.dumps(frame))
        return await self.next_frame(lambda f: f.get("id") == id and ("result" in f or "error" in f), timeout)

    async def result(self, method: str, params: Any = None, **kw: Any) -> dict[str, Any]:
        reply = await self.call(method, params, **kw)
        if "error" in reply:
            raise RpcFailed(method, reply["error"])
        return reply["result"]

    async def signed_call(self, method: str, params: dict[str, Any], **kw: Any) -> dict[str, Any]:
        """`call` with a client_signature by this connection's identity."""
        assert self.identity is not None, "connect(..., identity=...) first"
        ident = self.identity
        signed = signing.sign_params(method, params, aid=ident.aid, key=ident.key, cert_fingerprint=ident.fingerprint)
        return await self.call(method, signed, **kw)

    async def ping(self, timeout: float = TIMEOUT) -> bool:
        reply = await self.call("meta.ping", {}, timeout=timeout)
        return reply.get("result", {}).get("pong") is True

    async def closed_code(self, timeout: float = TIMEOUT) -> int | None:
        """Read (buffering frames) until the server closes; returns the close code."""
        with trio.fail_after(timeout):
            try:
                while True:
                    self.frames.append(self.loads(await self.ws.get_message()))
            except ConnectionClosed as exc:
                return exc.reason.code

    async def authenticate(self, token: str, device_id: str, slot_id: str, kind: str = "long",
                           **extra: Any) -> dict[str, Any]:
        """Send auth.connect on this socket; returns the reply frame."""
        params: dict[str, Any] = {
            "nonce": self.nonce, "auth": {"method": "kite_token", "token": token},
            "protocol": {"min": "1.0", "max": "1.0"}, "device": {"id": device_id, "type": "sdk"},
            "client": {"slot_id": slot_id, "sdk_lang": "python", "sdk_version": "aund-test"},
            "delivery_mode": {"mode": "fanout", "routing": "", "affinity_ttl_ms": 0},
            "capabilities": CAPABILITIES}
        if kind == "short":
            params["options"] = {"kind": "short", "short_ttl_ms": 30000}
        params.update(extra)
        return await self.call("auth.connect", params)

    async def aclose(self) -> None:
        """Close the WebSocket (bounded), then the TCP stream in any case.

        The test owns the TCP stream: trio-websocket leaves it unclosed when the server drops
        the connection abruptly (e.g. the 1009 close of an oversized frame).
        """
        try:
            with trio.move_on_after(2, shield=True):
                await self.ws.aclose()
        finally:
            await trio.aclose_forcefully(self.stream)


async def dial(nursery: trio.Nursery, url: str, timeout: float = TIMEOUT) -> RawClient:
    """Open a gateway WebSocket in `nursery` and read its challenge; `aclose()` it when done."""
    u = urlsplit(url)
    with trio.fail_after(timeout):
        stream = await trio.open_tcp_stream(u.hostname, u.port)
        try:
            ws = await wrap_client_stream(nursery, stream, f"{u.hostname}:{u.port}", u.path or "/",
                                          max_message_size=4 << 20)
            challenge = rpc.loads(await ws.get_message())
        except BaseException:
            await trio.aclose_forcefully(stream)
            raise
    assert challenge.get("method") == "challenge", challenge
    return RawClient(ws, challenge, stream)


@asynccontextmanager
async def open_raw(url: str, timeout: float = TIMEOUT) -> AsyncIterator[RawClient]:
    """Open a gateway WebSocket and read its challenge."""
    async with trio.open_nursery() as nursery:
        client = await dial(nursery, url, timeout)
        try:
            yield client
        finally:
            await client.aclose()


async def short_rpc(url: str, method: str, params: dict[str, Any]) -> dict[str, Any]:
    """A pre-auth call on a throw-away socket (as the SDK does); returns the result."""
    async with open_raw(url) as c:
        return await c.result(method, params, id=f"pre-{method}")


# --- HTTP (urllib in a worker thread; the devnet runs on this thread's event loop) -----------
@dataclass
class HttpReply:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


def http_base(gateway_url: str) -> str:
    u = urlsplit(gateway_url)
    return f"{'https' if u.scheme == 'wss' else 'http'}://{u.netloc}"


async def http(method: str, url: str, *, headers: dict[str, str] | None = None, body: bytes | None = None) -> HttpReply:
    def go() -> HttpReply:
        req = urllib.request.Request(url, data=body, method=method, headers=headers or {})
        try:
            with urllib.request.urlopen(req, timeout=TIMEOUT) as r:
                return HttpReply(r.status, {k.lower(): v for k, v in r.headers.items()}, r.read())
        except urllib.error.HTTPError as e:
            with e:
                return HttpReply(e.code, {k.lower(): v for k, v in e.headers.items()}, e.read())
    return await trio.to_thread.run_sync(go)


# --- pre-auth flows ------------------------------------------------------------------------
async def register(url: str, aid: str) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """auth.create_aid with a fresh P-256 key; checks the cert names the AID and holds the key."""
    key = pki.generate_key()
    result = await short_rpc(url, "auth.create_aid",
                             {"aid": aid, "public_key": pki.public_key_b64(key.public_key()), "curve": "P-256"})
    cert = pki.load_cert_pem(result["cert"])
    assert pki.cert_aid(cert) == aid
    assert pki.spki_der(cert.public_key()) == pki.spki_der(key.public_key())
    return key, cert


async def login_result(url: str, aid: str, key: ec.EllipticCurvePrivateKey, cert: x509.Certificate, *,
                       root_ca: Path) -> dict[str, Any]:
    """aid_login1 + aid_login2; checks the gateway's auth_cert chain and client_nonce_signature."""
    client_nonce = pki.b64e(secrets.token_bytes(12))
    r1 = await short_rpc(url, "auth.aid_login1", {"aid": aid, "cert": pki.cert_pem(cert), "client_nonce": client_nonce})
    auth_cert = pki.load_cert_pem(r1["auth_cert"])
    chain = pki.split_pem_bundle((await http("GET", http_base(url) + "/pki/chain")).body.decode())
    pki.verify_chain(auth_cert, chain, [pki.load_cert_pem(Path(root_ca).read_bytes())])
    assert pki.verify_signature(auth_cert.public_key(), pki.b64d(r1["client_nonce_signature"]), client_nonce.encode())
    client_time = f"{time.time():.6f}"
    signature = pki.sign_der(key, f"{r1['nonce']}:{client_time}".encode())
    return await short_rpc(url, "auth.aid_login2", {"aid": aid, "request_id": r1["request_id"], "nonce": r1["nonce"],
                                                    "client_time": client_time, "signature": pki.b64e(signature)})


async def login(url: str, aid: str, key: ec.EllipticCurvePrivateKey, cert: x509.Certificate, *,
                root_ca: Path) -> str:
    return (await login_result(url, aid, key, cert, root_ca=root_ca))["access_token"]


@asynccontextmanager
async def connect(url: str, token: str, device_id: str, slot_id: str, kind: str = "long", *,
                  identity: Identity | None = None) -> AsyncIterator[RawClient]:
    """An authenticated connection (auth.connect must succeed)."""
    async with open_raw(url) as c:
        reply = await c.authenticate(token, device_id, slot_id, kind)
        assert reply.get("result", {}).get("status") == "ok", reply
        c.identity = identity
        yield c


def fresh_aid(name: str) -> str:
    """A new AID under the reserved .aid.test issuer (random suffix: reruns never collide)."""
    return f"{name}-{secrets.token_hex(3)}.aid.test"


@dataclass
class Account:
    """A registered, logged-in AID."""

    identity: Identity
    token: str
    refresh_token: str

    @property
    def aid(self) -> str:
        return self.identity.aid


async def new_account(url: str, aid: str, *, root_ca: Path) -> Account:
    key, cert = await register(url, aid)
    tokens = await login_result(url, aid, key, cert, root_ca=root_ca)
    return Account(Identity(aid, key, cert), tokens["access_token"], tokens["refresh_token"])
