"""AUN layer: pre-auth flows on throw-away sockets (register, two-step login, token refresh), and
the gateway's HTTP side (PKI chain, discovery), as the official SDK does them on the wire.

Each pre-auth RPC opens its own WebSocket: connect, wait for `challenge`, send one request with
id `pre-<method>`, read its answer, close. Nothing here holds state between calls except the
`GatewayTrust` cache of verified CA chains.
"""
from __future__ import annotations

import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import structlog
import trio
from cryptography.hazmat.primitives.asymmetric import ec

from aund.aun import jsonrpc as rpc, transport, ws as websocket
from aund.aun.http import http_base, http_get  # noqa: F401  (re-exported)
from aund.aun.trust import GatewayTrust
from aund.errors import AuthError, GatewayError, GatewayUnavailable, map_remote_error
from aund.identity import pki

log = structlog.get_logger("aund.auth")

CONNECT_TIMEOUT = 10.0
SHORT_RPC_TIMEOUT = 15.0
MAX_FRAME = transport.MAX_FRAME
TOKEN_REUSE_MARGIN = 30.0  # a stored access token is reused only if it has this much life left


@dataclass(frozen=True)
class Tokens:
    access_token: str
    refresh_token: str
    expires_at: float

    def usable(self, now: float | None = None) -> bool:
        return bool(self.access_token) and self.expires_at - (time.time() if now is None else now) > TOKEN_REUSE_MARGIN

    def to_json(self) -> dict[str, Any]:
        return {"access_token": self.access_token, "refresh_token": self.refresh_token,
                "access_token_expires_at": self.expires_at}

    @classmethod
    def from_json(cls, d: dict[str, Any] | None) -> "Tokens | None":
        if not isinstance(d, dict) or not d.get("access_token"):
            return None
        return cls(str(d["access_token"]), str(d.get("refresh_token") or ""),
                   float(d.get("access_token_expires_at") or 0.0))

    @classmethod
    def from_result(cls, result: dict[str, Any], previous_refresh: str = "") -> "Tokens":
        access = result.get("access_token") or result.get("token") or result.get("kite_token")
        if not isinstance(access, str) or not access:
            raise AuthError("gateway returned no access token")
        expires_in = result.get("expires_in", 3600)
        expires_in = expires_in if isinstance(expires_in, (int, float)) and not isinstance(expires_in, bool) else 3600
        return cls(access, str(result.get("refresh_token") or previous_refresh), time.time() + float(expires_in))


async def discover_gateways(aid: str, *, port: int | None = None, scheme: str = "https") -> list[str]:
    """Gateway URLs for an AID by `/.well-known/aun-gateway` on the AID host, then on gateway.{issuer}."""
    issuer = aid.split(".", 1)[1]
    suffix = f":{port}" if port else ""
    errors = []
    for host in (aid, f"gateway.{issuer}"):
        url = f"{scheme}://{host}{suffix}/.well-known/aun-gateway"
        try:
            status, body = await http_get(url)
        except GatewayUnavailable as exc:
            errors.append(str(exc))
            continue
        if status != 200:
            errors.append(f"GET {url}: HTTP {status}")
            continue
        return parse_well_known(body)
    raise GatewayUnavailable(f"gateway discovery failed for {aid}: " + "; ".join(errors))


def parse_well_known(body: bytes) -> list[str]:
    """Gateway URLs from a well-known document, in priority order (default priority 999)."""
    try:
        doc = rpc.loads(body.decode("utf-8"))
        entries = [g for g in doc["gateways"] if isinstance(g, dict) and isinstance(g.get("url"), str)]
    except (rpc.FrameError, UnicodeDecodeError, KeyError, TypeError):
        raise GatewayUnavailable("malformed /.well-known/aun-gateway document") from None
    if not entries:
        raise GatewayUnavailable("/.well-known/aun-gateway lists no gateway")
    prio = lambda g: g.get("priority") if isinstance(g.get("priority"), int) else 999  # noqa: E731
    return [g["url"] for g in sorted(entries, key=prio)]


async def short_rpc(gateway_url: str, method: str, params: dict[str, Any], *,
                    connector: transport.Connector | None = None) -> dict[str, Any]:
    """One pre-auth RPC on its own WebSocket (opened by `connector`, default the network's).
    Raises the mapped AundError on a gateway error, GatewayUnavailable when the gateway cannot be
    reached or does not answer in time."""
    failure: Exception | None = None
    frame: dict[str, Any] = {}
    try:
        with trio.fail_after(SHORT_RPC_TIMEOUT):
            async with trio.open_nursery() as nursery:
                try:
                    ws, close = await (connector or transport.open_connection)(
                        nursery, gateway_url, max_frame=MAX_FRAME, timeout=CONNECT_TIMEOUT)
                    try:
                        while True:  # wait for the challenge
                            frame = rpc.parse_frame(str(await ws.get_message()))
                            if frame.get("method") == "challenge":
                                break
                        await ws.send_message(rpc.dumps(rpc.request(method, params, id=f"pre-{method}")))
                        while True:
                            frame = rpc.parse_frame(str(await ws.get_message()))
                            if frame.get("id") == f"pre-{method}":
                                break
                    finally:
                        await close()
                except (OSError, trio.TooSlowError, trio.BrokenResourceError, websocket.HandshakeError,
                        websocket.ConnectionClosed) as exc:
                    # (TooSlowError: the connect timeout; it must not escape this nursery unmapped)
                    failure = GatewayUnavailable(f"{method}: cannot reach {gateway_url}: "
                                                 f"{transport.describe(exc)}")
                except rpc.FrameError as exc:
                    failure = GatewayError(f"{method}: malformed frame from gateway: {exc}", retryable=True)
                nursery.cancel_scope.cancel()  # raised below, outside the nursery, unwrapped
    except trio.TooSlowError:
        raise GatewayUnavailable(f"{method}: no answer from {gateway_url} within {SHORT_RPC_TIMEOUT:.0f} s") from None
    if failure is not None:
        raise failure
    if "error" in frame:
        raise map_remote_error(method, frame["error"])
    result = frame.get("result")
    if not isinstance(result, dict):
        raise GatewayError(f"{method}: result is not an object", retryable=False)
    if result.get("success") is False:
        raise AuthError(f"{method}: {result.get('error') or 'refused'}", data={"result": _safe(result)})
    return result


def _safe(result: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in result.items() if "token" not in k}


async def create_aid(gateway_url: str, aid: str, public_key: ec.EllipticCurvePublicKey) -> str:
    """Register `aid` with our public key; returns the certificate PEM (its key must be ours)."""
    result = await short_rpc(gateway_url, "auth.create_aid",
                             {"aid": aid, "public_key": pki.public_key_b64(public_key), "curve": "P-256"})
    issued_cert(result, "auth.create_aid", aid, public_key)
    return result["cert"]


def issued_cert(result: dict[str, Any], method: str, aid: str, public_key: ec.EllipticCurvePublicKey):
    """The certificate a gateway issued in `result["cert"]`, checked: PEM, for our key, CN = aid,
    valid now. Raises AuthError naming `method`."""
    cert_pem = result.get("cert")
    if not isinstance(cert_pem, str):
        raise AuthError(f"{method} returned no certificate")
    try:
        cert = pki.load_cert_pem(cert_pem)
    except pki.PKIError as exc:
        raise AuthError(f"{method} returned an unreadable certificate: {exc}") from None
    if pki.spki_der(cert.public_key()) != pki.spki_der(public_key):
        raise AuthError(f"{method} returned a certificate for another key")
    if pki.cert_aid(cert) != aid:
        raise AuthError(f"{method} returned a certificate for {pki.cert_aid(cert)!r}")
    now = time.time()
    if not cert.not_valid_before_utc.timestamp() - 300 <= now <= cert.not_valid_after_utc.timestamp():
        raise AuthError(f"{method} returned a certificate that is not valid now")
    return cert


async def renew_cert(gateway_url: str, trust: GatewayTrust, aid: str, key: ec.EllipticCurvePrivateKey,
                     cert_pem: str):
    """`auth.renew_cert` as the SDK does it (login1's nonce, signed by the key): a new certificate
    for the same key, checked (key, CN, validity, chain to a trusted root). Returns it."""
    request_id, nonce = await _begin_operation(gateway_url, trust, aid, cert_pem)
    result = await short_rpc(gateway_url, "auth.renew_cert", {
        "aid": aid, "request_id": request_id, "nonce": nonce,
        "signature": pki.b64e(pki.sign_for_key(key, nonce.encode("utf-8")))})
    cert = issued_cert(result, "auth.renew_cert", aid, key.public_key())
    await trust.verify(gateway_url, cert, expected_cn=aid)
    return cert


async def rekey(gateway_url: str, trust: GatewayTrust, aid: str, key: ec.EllipticCurvePrivateKey, cert_pem: str,
                new_key: ec.EllipticCurvePrivateKey):
    """`auth.rekey` as the SDK does it: the current key signs login1's nonce + the new public key
    (b64 SPKI); returns the new key's certificate, checked like `renew_cert`'s."""
    request_id, nonce = await _begin_operation(gateway_url, trust, aid, cert_pem)
    new_public = pki.public_key_b64(new_key.public_key())
    result = await short_rpc(gateway_url, "auth.rekey", {
        "aid": aid, "request_id": request_id, "nonce": nonce, "new_public_key": new_public,
        "signature": pki.b64e(pki.sign_for_key(key, f"{nonce}{new_public}".encode("utf-8")))})
    cert = issued_cert(result, "auth.rekey", aid, new_key.public_key())
    await trust.verify(gateway_url, cert, expected_cn=aid)
    return cert


async def current_cert(gateway_url: str, trust: GatewayTrust, aid: str, key: ec.EllipticCurvePrivateKey):
    """The AID's current certificate as its gateway serves it (`/pki/cert/{aid}`), verified (chain,
    CN, revocation) and for `key`; None when the gateway serves none for our key. Another instance
    holding the same AID may have renewed it."""
    status, body = await http_get(f"{http_base(gateway_url)}/pki/cert/{aid}")
    if status != 200:
        return None
    try:
        cert = pki.load_cert_pem(body)
    except pki.PKIError:
        return None
    if pki.spki_der(cert.public_key()) != pki.spki_der(key.public_key()):
        return None  # a rekey elsewhere: only that key's holder can use it
    await trust.verify(gateway_url, cert, expected_cn=aid)
    return cert


async def _begin_operation(gateway_url: str, trust: GatewayTrust, aid: str, cert_pem: str, *,
                           connector: transport.Connector | None = None) -> tuple[str, str]:
    """`auth.aid_login1`: the gateway proves itself (auth_cert chain + a signature over our
    nonce) and hands out (request_id, nonce) for login2, renew_cert or rekey."""
    client_nonce = pki.b64e(os.urandom(12))
    r1 = await short_rpc(gateway_url, "auth.aid_login1", {"aid": aid, "cert": cert_pem, "client_nonce": client_nonce},
                         connector=connector)
    try:
        auth_cert = pki.load_cert_pem(str(r1.get("auth_cert") or ""))
        nonce_sig = pki.b64d(str(r1.get("client_nonce_signature") or ""))
    except pki.PKIError as exc:
        raise AuthError(f"aid_login1: {exc}") from None
    await trust.verify(gateway_url, auth_cert)
    if not pki.verify_signature(auth_cert.public_key(), nonce_sig, client_nonce.encode("utf-8")):
        raise AuthError("aid_login1: the gateway's signature over our nonce does not verify")
    nonce, request_id = r1.get("nonce"), r1.get("request_id")
    if not isinstance(nonce, str) or not isinstance(request_id, str):
        raise AuthError("aid_login1: missing nonce or request_id")
    return request_id, nonce


async def login(gateway_url: str, trust: GatewayTrust, aid: str, key: ec.EllipticCurvePrivateKey,
                cert_pem: str, *, on_new_cert: Callable[[Any], Awaitable[None]] | None = None,
                connector: transport.Connector | None = None) -> Tokens:
    """The two-step AID login: the gateway proves itself (auth_cert chain + our nonce), then we do.

    A `new_cert` in login2's answer (the gateway renewed a certificate past half its validity) is
    checked like an issued one (our key, CN, validity, chain, revocation) and handed to
    `on_new_cert`; one that fails a check is logged and ignored, as the SDK does."""
    request_id, nonce = await _begin_operation(gateway_url, trust, aid, cert_pem, connector=connector)
    client_time = repr(time.time())
    signature = pki.sign_der(key, f"{nonce}:{client_time}".encode("utf-8"))
    r2 = await short_rpc(gateway_url, "auth.aid_login2", {"aid": aid, "request_id": request_id, "nonce": nonce,
                                                          "client_time": client_time,
                                                          "signature": pki.b64e(signature)},
                         connector=connector)
    tokens = Tokens.from_result(r2)
    if isinstance(r2.get("new_cert"), str) and on_new_cert is not None:
        try:
            cert = issued_cert({"cert": r2["new_cert"]}, "aid_login2 new_cert", aid, key.public_key())
            await trust.verify(gateway_url, cert, expected_cn=aid)
        except AuthError as exc:
            log.warning("auth.new_cert_rejected", aid=aid, error=str(exc))
        else:
            await on_new_cert(cert)
    return tokens


class ReloginRequired(AuthError):
    """The refresh token is spent or unknown: only a full login helps."""


async def refresh(gateway_url: str, aid: str, tokens: Tokens, *, device_id: str, slot_id: str,
                  connector: transport.Connector | None = None) -> Tokens:
    """Rotate the refresh token. Raises ReloginRequired when the gateway says so."""
    if not tokens.refresh_token:
        raise ReloginRequired("no refresh token stored")
    try:
        result = await short_rpc(gateway_url, "auth.refresh_token", {
            "refresh_token": tokens.refresh_token, "aid": aid, "device_id": device_id, "slot_id": slot_id,
            "access_token": tokens.access_token, "access_token_expires_at": tokens.expires_at,
            "sdk_lang": "python", "sdk_version": "aund"}, connector=connector)
    except AuthError as exc:
        data = exc.data.get("result", {})
        text = str(exc).lower()
        if data.get("relogin_required") or any(t in text for t in (
                "missing refresh_token", "invalid_or_expired_refresh_token", "refresh not supported")):
            raise ReloginRequired(str(exc)) from None
        raise
    return Tokens.from_result(result, tokens.refresh_token)

