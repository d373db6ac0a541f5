"""devnet: one gateway WebSocket (`Conn`): the challenge, authentication, then the core RPCs
(auth, meta, message) as `rpc_*` methods found through `HANDLERS`, which the service modules
(groups, thoughts, storage, ...) extend with `register`; and the rows a push or a pull carries."""
from __future__ import annotations

import importlib

import inspect
import math
import secrets
import time
from collections import Counter
from typing import TYPE_CHECKING, Any, Callable

import structlog
import trio

from aund.aun import jsonrpc as rpc
from aund.aun import ids, signing
from aund.aun.e2ee import merkle, spk_id_for, verify_spk
from aund.devnet import federation
from aund.devnet.pki import der_sha256_hex, serial_hex
from aund.devnet.store import StoredMessage, dumps
from aund.identity import pki

log = structlog.get_logger("aund.devnet")


from aund.devnet.params import (  # noqa: F401
    AGENT_MD_EXEMPT, CLOSE_AUTH_FAILED, CLOSE_AUTH_TIMEOUT, CLOSE_REPLACED, CLOSE_SHORT_TTL,
    HISTORY_MAX_LIMIT, KICK_GRACE_SECONDS, MAX_INFLIGHT_PER_CONN, MAX_PAYLOAD_BYTES, MAX_ROW_WRAPPING,
    NOTIFY_MAX_BYTES, NOTIFY_MAX_TTL_MS, OUTBOX_FRAMES, PRE_AUTH_METHODS, PROTOCOL_VERSION, QUEUE_SCAN_ROWS,
    RpcError, SERVER_CAPABILITIES, UNSIGNED_OK_METHODS, int_param, str_param, history_window, validate_aid,
)

if TYPE_CHECKING:
    from aund.devnet.gateway import Devnet


def _service(name: str) -> Any:
    """A service module (groups, msgevents, group_identity) the core handlers consult; imported
    by the gateway once everything is defined (each registers its handlers when imported)."""
    return importlib.import_module(f"aund.devnet.{name}")

def history_page(messages: list[dict[str, Any]], has_older: bool) -> dict[str, Any]:
    """The page fields of a history result: the boundary is the first row's seq (none when empty)."""
    start = messages[0]["seq"] if messages else None
    return {"messages": messages, "count": len(messages), "window_start_seq": start, "next_before_seq": start,
            "has_older": bool(messages) and has_older}


def render_row(msg: StoredMessage, device_id: str, slot_id: str, *, inline: bool = False) -> dict[str, Any] | None:
    """The row a device sees for a stored message (pull page or inline push)."""
    base = {"seq": msg.seq, "message_id": msg.message_id, "from_aid": msg.sender, "from": msg.sender,
            "sender_aid": msg.sender, "to": msg.receiver, "sender_device_id": msg.sender_device_id,
            "t_server": msg.t_server, "timestamp": msg.t_server, "need_render": msg.need_render,
            "direction": "inbound", "device_id": device_id, "slot_id": slot_id, "cursor_scope": "peer"}
    if msg.kind == "plain":
        payload = rpc.loads(msg.body)
        ptype = payload.get("type", "") if isinstance(payload, dict) else ""
        return dict(base, version="v1", type=ptype or "message", encrypted=False,
                    legacy_v1={"payload": payload, "to": msg.receiver})
    envelope = rpc.loads(msg.body)
    own = [r for r in envelope.get("recipients", []) if isinstance(r, list) and len(r) == 8
           and r[0] == msg.receiver and r[1] in (device_id, "")]
    spk_id = own[0][5] if own else ""
    if inline:
        split = per_device_envelope(envelope, own[0], device_id) if own else None
        if split is None:
            return None
        envelope = split
    row = dict(base, version="v2", type="e2ee.p2p_encrypted", encrypted=True, envelope_json=dumps(envelope))
    if spk_id:
        row["spk_id"] = spk_id
    return row


def per_device_envelope(envelope: dict[str, Any], own_row: list[Any], device_id: str) -> dict[str, Any] | None:
    """The per-device form of an envelope: one `recipient` and its Merkle proof instead of all rows."""
    rows = envelope.get("recipients")
    try:
        index = rows.index(own_row)
        proof = merkle.merkle_proof([merkle.row_leaf_hash(r) for r in rows], index)
    except (ValueError, TypeError, IndexError):
        return None
    split = {k: v for k, v in envelope.items() if k != "recipients"}
    keys = ("aid", "device_id", "role", "key_source", "fp", "spk_id", "wrap_nonce", "wrapped_key")
    split["recipient"] = dict(zip(keys, own_row))
    split["merkle_proof"] = proof
    split["delivery_device_id"] = device_id
    return split



def checked_prekey(params: dict[str, Any], cert: Any) -> tuple[str, str, str, int]:
    """(spk_id, spk_pk, spk_signature, spk_timestamp) of an uploaded prekey (P2P or group), after
    checking what a sender will: a P-256 key, its id, and the RAW signature by the AID key (`cert`)."""
    spk_id, spk_pk, sig = str_param(params, "spk_id"), str_param(params, "spk_pk"), str_param(params, "spk_signature")
    timestamp = params.get("spk_timestamp")
    if isinstance(timestamp, bool) or not isinstance(timestamp, int):
        raise RpcError(rpc.INVALID_PARAMS, "spk_timestamp must be an integer")
    try:
        pki.load_public_key_b64(spk_pk)
    except pki.PKIError as exc:
        raise RpcError(rpc.INVALID_PARAMS, f"bad prekey: {exc}") from None
    if spk_id != spk_id_for(pki.b64d(spk_pk)):
        raise RpcError(rpc.E2EE_PREKEY_INVALID, "spk_id does not match spk_pk")
    if not verify_spk(cert.public_key(), spk_pk, spk_id, sig, timestamp):
        raise RpcError(rpc.E2EE_PREKEY_INVALID, "spk_signature does not verify (RAW r||s by the AID key)")
    return spk_id, spk_pk, sig, timestamp


class Conn:
    """One gateway WebSocket: challenge, authentication, then RPCs and pushes."""

    def __init__(self, net: Devnet, receive: Callable, send: Callable) -> None:
        self.net, self._receive, self._send = net, receive, send
        self.nonce = "n-" + secrets.token_hex(12)
        self.nonce_used = False
        self.aid = ""
        self.device_id = ""
        self.slot_id = ""
        self.slot_key = ""
        self.kind = "long"
        self.delivery_mode = "fanout"
        self.delivery_routing = ""
        self.declares_agent_md = False  # auth.connect declared agent_md_validation_v1
        self.conn_id = "conn_" + secrets.token_hex(6)
        self.connected_at = 0.0
        self.closed = False
        self.inflight = 0
        self.inflight_by_method: Counter = Counter()
        self.outbox_send, self.outbox_recv = trio.open_memory_channel[dict | str](OUTBOX_FRAMES)
        self.cancel = trio.CancelScope()
        self.close_code: int | None = None
        self._close_plan: tuple[float, int, str] | None = None  # (when, code, reason), see close_later
        self._replanned = trio.Event()
        self.log = log

    # --- output ------------------------------------------------------------------------------
    def push(self, frame: dict[str, Any]) -> bool:
        try:
            self.outbox_send.send_nowait(rpc.dumps(frame))
            return True
        except (trio.WouldBlock, trio.ClosedResourceError, trio.BrokenResourceError):
            return False

    def close_soon(self, code: int, reason: str) -> None:
        """Queue a close after what is already queued (used to kick this connection)."""
        self.closed = True
        try:
            self.outbox_send.send_nowait({"close": code, "reason": reason})
        except (trio.WouldBlock, trio.ClosedResourceError, trio.BrokenResourceError):
            self.close_code = code
            self.cancel.cancel()

    def close_later(self, seconds: float, code: int, reason: str) -> None:
        """Close this connection `seconds` from now (the earliest of such plans wins); its own
        `_closer` task does it, so no other connection schedules work in this one's nursery."""
        when = trio.current_time() + seconds
        if self._close_plan is None or when < self._close_plan[0]:
            self._close_plan = (when, code, reason)
            self._replanned.set()
            self._replanned = trio.Event()

    async def _closer(self) -> None:
        while True:
            replanned = self._replanned
            if self._close_plan is None:
                await replanned.wait()
                continue
            when, code, reason = self._close_plan
            with trio.move_on_at(when):
                await replanned.wait()
            if trio.current_time() >= when:
                self.close_soon(code, reason)
                return

    async def _writer(self) -> None:
        async for item in self.outbox_recv:
            if isinstance(item, dict):
                self.close_code = item["close"]
                await self._send({"type": "websocket.close", "code": item["close"], "reason": item["reason"]})
                self.cancel.cancel()
                return
            await self._send({"type": "websocket.send", "text": item})

    # --- lifecycle ---------------------------------------------------------------------------
    async def serve(self) -> None:
        event = await self._receive()
        if event["type"] != "websocket.connect":
            return
        await self._send({"type": "websocket.accept"})
        self.push(rpc.notification("challenge", {
            "nonce": self.nonce, "server": "aund-devnet", "protocol": {"min": "1.0", "max": "1.0"},
            "auth_methods": ["kite_token"], "capabilities": {}, "server_time": time.time()}))
        try:
            with self.cancel:
                async with trio.open_nursery() as nursery:
                    self.nursery = nursery
                    nursery.start_soon(self._writer)
                    nursery.start_soon(self._auth_deadline)
                    nursery.start_soon(self._closer)
                    await self._reader(nursery)
                    nursery.cancel_scope.cancel()
        finally:
            self.closed = True
            if self.aid:
                self.net.unregister_conn(self)
                self.net.stats.connections.append({
                    "event": "close", "aid": self.aid, "device_id": self.device_id, "slot_id": self.slot_id,
                    "kind": self.kind, "conn_id": self.conn_id, "t": time.time(), "code": self.close_code})

    async def _auth_deadline(self) -> None:
        await trio.sleep(30)
        if not self.aid:
            self.close_soon(CLOSE_AUTH_TIMEOUT, "auth.connect not completed within 30 s")

    async def _reader(self, nursery: trio.Nursery) -> None:
        while True:
            event = await self._receive()
            if event["type"] == "websocket.disconnect":
                self.close_code = self.close_code or event.get("code")
                return
            text = event.get("text")
            if text is None:
                self.push(rpc.error(None, rpc.INVALID_REQUEST, "binary frames are not accepted"))
                continue
            try:
                frame = rpc.parse_frame(text)
            except rpc.FrameError as exc:
                self.push(rpc.error(None, exc.code, str(exc)))
                continue
            if "method" in frame and "id" not in frame:
                self.on_notification(frame["method"], frame.get("params"))
                continue  # a notification is never answered
            if "method" not in frame:
                continue  # responses from the client: nothing to answer
            if self.inflight >= MAX_INFLIGHT_PER_CONN:
                self.push(rpc.error(frame["id"], rpc.RATE_LIMITED, "too many requests in flight",
                                    {"retryable": True}))
                continue
            self.inflight += 1
            self.inflight_by_method[frame["method"]] += 1
            stats = self.net.stats
            stats.max_inflight = max(stats.max_inflight, self.inflight)
            m = frame["method"]
            stats.max_inflight_by_method[m] = max(stats.max_inflight_by_method[m], self.inflight_by_method[m])
            nursery.start_soon(self._handle, frame)

    async def _handle(self, frame: dict[str, Any]) -> None:
        method, params, req_id = frame["method"], frame.get("params") or {}, frame["id"]
        stats = self.net.stats
        stats.rpc[method] += 1
        try:
            reply = rpc.result(req_id, await self.dispatch(method, params))
        except RpcError as exc:
            stats.rpc_errors[f"{method} {exc.code}"] += 1
            reply = rpc.error(req_id, exc.code, exc.message, exc.data)
        try:
            if self.net.faults.reply_delay_ms:
                await trio.sleep(self.net.faults.reply_delay_ms / 1000)
            await self.outbox_send.send(rpc.dumps(reply))
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            pass
        finally:
            self.inflight -= 1
            self.inflight_by_method[method] -= 1
        if method == "auth.connect" and "error" in reply:
            code = CLOSE_AUTH_FAILED if reply["error"]["code"] in (rpc.AUTH_FAILED, rpc.BAD_NONCE) else 1008
            self.close_soon(code, reply["error"]["message"])

    async def dispatch(self, method: str, params: dict[str, Any]) -> dict[str, Any]:
        if not self.aid and method not in PRE_AUTH_METHODS:
            raise RpcError(rpc.SESSION_REQUIRED, "auth.connect first")
        if self.aid and method in PRE_AUTH_METHODS - {"auth.refresh_token"}:
            raise RpcError(rpc.INVALID_REQUEST, f"{method} is not allowed on an authenticated connection")
        handler = HANDLERS.get(method)
        if handler is None:
            raise RpcError(rpc.METHOD_NOT_FOUND, f"method not found: {method}")
        if (self.aid and self.net.agent_md_check and self.declares_agent_md
                and method not in AGENT_MD_EXEMPT and self.net.store.agent_md(self.aid) is None):
            # production's identity admission for clients that declare agent.md validation (SDK 0.5.8)
            raise RpcError(rpc.AGENT_MD_REQUIRED, f"valid agent.md is required for {self.aid}")
        if self.aid and self.net.group_identity_check and self.declares_agent_md:
            _service("group_identity").admission(self, method, params)
        if signing.needs_signature(method) and not self.connection_identity_suffices(method, params):
            cert = pki.load_cert_pem(self.net.store.current_cert(self.aid) or "")
            try:
                signing.verify_params(method, params, aid=self.aid, cert=cert)
            except signing.SignatureError as exc:
                raise RpcError(rpc.CLIENT_SIGNATURE_INVALID, str(exc)) from None
        if method.startswith("group."):
            home = federation.group_home(self.net, method, params)
            if home is not None:  # the group lives on a federated devnet: it answers for us
                return await federation.call_group(self, home, method, params)
            await _service("groups").prepare(self.net, method, params)
        result = handler(self, params)
        result = await result if inspect.isawaitable(result) else result  # federated calls go over the network
        return await federation.merge_lists(self, method, params, result) if method in federation.GROUP_MERGED \
            else result

    def connection_identity_suffices(self, method: str, params: dict[str, Any]) -> bool:
        """True for an unsigned call the production gateway takes on the connection's identity.

        The AUN docs (08-AUN-E2EE-Group 11.2) give plain message RPCs a connection-identity fast
        path; fastaun relies on it for `message.send` / `group.send` of echo texts, which it sends
        without client_signature. A signature, when present, is always checked; params that claim
        another identity (aid, device_id, slot_id) than the connection's always need one."""
        if method not in UNSIGNED_OK_METHODS or "client_signature" in params:
            return False
        claims = {"aid": self.aid, "device_id": self.device_id, "slot_id": self.slot_id}
        return all(params.get(k) in (None, "", own) for k, own in claims.items())

    # --- pre-auth ------------------------------------------------------------------------------
    def rpc_create_aid(self, params: dict[str, Any]) -> dict[str, Any]:
        aid = validate_aid(params.get("aid"), self.net.issuer)
        if str_param(params, "curve", required=False, default="P-256") != "P-256":
            raise RpcError(rpc.INVALID_PARAMS, "only curve P-256 is supported")
        try:
            public_key = pki.load_public_key_b64(str_param(params, "public_key"))
        except pki.PKIError as exc:
            raise RpcError(rpc.INVALID_PARAMS, str(exc)) from None
        store = self.net.store
        existing = store.current_cert(aid)
        if existing is not None:
            cert = pki.load_cert_pem(existing)
            if pki.spki_der(cert.public_key()) != pki.spki_der(public_key):
                raise RpcError(rpc.CONFLICT, f"aid already registered with another key: {aid}")
            self._refuse_revoked(aid)
        else:
            cert = self._issue(aid, public_key)
        return {"aid": aid, "cert": pki.cert_pem(cert), "ca_cert": pki.cert_pem(self.net.ca.issuer_cert),
                "curve": "P-256"}

    def _issue(self, aid: str, public_key: Any) -> Any:
        """A new certificate of `aid` for `public_key`, stored as its current one (older ones stay
        served by fingerprint)."""
        cert = self.net.ca.issue(aid, public_key, ttl=self.net.cert_ttl)
        self.net.store.add_cert(aid, serial_hex(cert), der_sha256_hex(cert),
                                pki.spki_fingerprint(public_key)[7:], pki.cert_pem(cert))
        return cert

    def _aid_operation(self, params: dict[str, Any], signed: bytes) -> tuple[str, Any]:
        """(aid, current cert) of a renew/rekey: the login1 nonce (single use) and the signature of
        the current key over `nonce` + `signed` (protocol doc 01, `auth.renew_cert` / `auth.rekey`)."""
        aid = validate_aid(params.get("aid"), self.net.issuer)
        pending = self.net.login_requests.pop(str_param(params, "request_id"), None)
        nonce = str_param(params, "nonce")
        if pending is None or pending[0] != aid or pending[1] != nonce or pending[2] < time.time():
            raise RpcError(rpc.BAD_NONCE, "unknown, expired or replayed nonce (call auth.aid_login1 first)")
        cert = self._aid_cert(aid)
        self._refuse_revoked(aid)
        try:
            signature = pki.b64d(str_param(params, "signature"))
        except pki.PKIError:
            raise RpcError(rpc.AUTH_FAILED, "signature is not base64") from None
        if not pki.verify_signature(cert.public_key(), signature, nonce.encode("utf-8") + signed):
            raise RpcError(rpc.AUTH_FAILED, "signature of the current key does not verify")
        return aid, cert

    def rpc_renew_cert(self, params: dict[str, Any]) -> dict[str, Any]:
        """A new certificate for the same key (the old one stays valid and served by fingerprint)."""
        aid, old = self._aid_operation(params, b"")
        cert = self._issue(aid, old.public_key())
        log.info("devnet.cert_renewed", aid=aid, serial=serial_hex(cert))
        return {"status": "renewed", "aid": aid, "cert": pki.cert_pem(cert),
                "ca_cert": pki.cert_pem(self.net.ca.issuer_cert)}

    def rpc_rekey(self, params: dict[str, Any]) -> dict[str, Any]:
        """A certificate for a new key, signed over by the current key. Unlike production (which
        revokes the old certificate at once) the devnet keeps it valid: it stays served by
        fingerprint, so what was signed with it still verifies."""
        new_b64 = str_param(params, "new_public_key")
        aid, _ = self._aid_operation(params, new_b64.encode("utf-8"))
        try:
            public_key = pki.load_public_key_b64(new_b64)
        except pki.PKIError as exc:
            raise RpcError(rpc.INVALID_PARAMS, f"new_public_key: {exc}") from None
        cert = self._issue(aid, public_key)
        log.info("devnet.rekeyed", aid=aid, serial=serial_hex(cert))
        return {"status": "rekeyed", "aid": aid, "cert": pki.cert_pem(cert),
                "ca_cert": pki.cert_pem(self.net.ca.issuer_cert)}

    # --- notifications (JSON-RPC without id: never answered, dropped when they cannot go) -------
    def on_notification(self, method: Any, params: Any) -> None:
        """`notification/route` to an AID's online long connections (optionally one device or
        slot), `notification/group.route` to a group's online members, as `deliver.method`
        (`event/app.*` only) with the gateway's own `_notify` block; anything else is dropped."""
        stats = self.net.stats
        stats.rpc[f"notify {str(method)[:64]}"] += 1
        if not self.aid or not isinstance(params, dict) or method not in ("notification/route",
                                                                          "notification/group.route"):
            return
        deliver = params.get("deliver")
        event = deliver.get("method") if isinstance(deliver, dict) else None
        body = deliver.get("params", {}) if isinstance(deliver, dict) else None
        ttl = params.get("ttl_ms")
        if (not isinstance(event, str) or not event.startswith("event/app.") or len(event) <= len("event/app.")
                or not isinstance(body, dict) or len(dumps(body).encode("utf-8")) > NOTIFY_MAX_BYTES
                or ttl is not None and (isinstance(ttl, bool) or not isinstance(ttl, int)
                                        or not 0 <= ttl <= NOTIFY_MAX_TTL_MS)):
            stats.rpc_errors[f"{method} dropped"] += 1
            return
        targets: list[Conn] = []
        if method == "notification/route":
            target = params.get("target")
            if not isinstance(target, dict) or target.get("type", "aid") != "aid":
                return
            try:
                aid = validate_aid(target.get("aid"))
            except RpcError:
                return
            device, slot = target.get("device_id"), target.get("slot_id")
            targets = [c for c in self.net.live(aid) if (not device or c.device_id == device)
                       and (not slot or c.slot_id == slot)]
        else:
            try:
                svc = _service("groups").service(self.net)
                gid = str(params.get("group_id") or "")
                if svc.member(gid, self.aid) is None:
                    return
                aids = [m["aid"] for m in svc.members(gid)]
            except RpcError:
                return
            targets = [c for a in aids for c in self.net.live(a)]
        stamp = {"from_aid": self.aid, "device_id": self.device_id, "slot_id": self.slot_id,
                 "connection_id": self.conn_id, "sent_at": int(time.time() * 1000),
                 **({"ttl_ms": ttl} if ttl is not None else {})}
        frame = rpc.notification(event, {**body, "_notify": stamp})
        for conn in targets:
            if conn.kind == "long" and not conn.closed and conn is not self:
                if conn.push(frame):
                    stats.pushes += 1
                else:
                    stats.pushes_dropped += 1

    def _refuse_revoked(self, aid: str) -> None:
        """Production's auth service checks revocation at login (protocol doc 01, -32002)."""
        if self.net.store.current_revoked_at(aid) is not None:
            raise RpcError(rpc.CERT_INVALID, f"certificate revoked: the current certificate of {aid} is on the CRL")

    def _aid_cert(self, aid: str):
        pem = self.net.store.current_cert(aid)
        if pem is None:
            raise RpcError(rpc.AUTH_FAILED, f"unknown aid: {aid}")
        return pki.load_cert_pem(pem)

    def rpc_login1(self, params: dict[str, Any]) -> dict[str, Any]:
        aid = validate_aid(params.get("aid"))
        stored = self._aid_cert(aid)
        try:
            presented = pki.load_cert_pem(str_param(params, "cert"))
        except pki.PKIError:
            raise RpcError(rpc.AUTH_FAILED, "aid_login1_failed: invalid cert") from None
        if presented != stored:
            raise RpcError(rpc.AUTH_FAILED, "aid_login1_failed: cert is not the AID's current certificate")
        self._refuse_revoked(aid)
        client_nonce = str_param(params, "client_nonce")
        now = time.time()
        pending = self.net.login_requests  # in insertion order = expiry order: drop the expired from the front
        while pending and next(iter(pending.values()))[2] < now:
            del pending[next(iter(pending))]
        if len(self.net.login_requests) > 10_000:
            raise RpcError(rpc.RATE_LIMITED, "too many pending logins", {"retryable": True})
        request_id, nonce = "req-" + secrets.token_hex(8), secrets.token_urlsafe(24)
        self.net.login_requests[request_id] = (aid, nonce, now + 60)
        signature = pki.sign_for_key(self.net.ca.gateway_key, client_nonce.encode("utf-8"))
        return {"request_id": request_id, "nonce": nonce, "auth_cert": pki.cert_pem(self.net.ca.gateway_cert),
                "client_nonce_signature": pki.b64e(signature), "server_time": int(now),
                "auth_curve": self.net.ca.auth_curve}

    def rpc_login2(self, params: dict[str, Any]) -> dict[str, Any]:
        aid = validate_aid(params.get("aid"))
        pending = self.net.login_requests.pop(str_param(params, "request_id"), None)  # single use
        nonce = str_param(params, "nonce")
        if pending is None or pending[0] != aid or pending[1] != nonce or pending[2] < time.time():
            raise RpcError(rpc.BAD_NONCE, "aid_login2_failed: unknown, expired or replayed login nonce")
        client_time = str_param(params, "client_time")
        try:
            skew = abs(float(client_time) - time.time())
        except ValueError:
            raise RpcError(rpc.INVALID_PARAMS, "client_time must be a decimal number of seconds") from None
        if not math.isfinite(skew) or skew > signing.MAX_SKEW_SECONDS:
            raise RpcError(rpc.AUTH_FAILED, "aid_login2_failed: client_time outside the allowed window")
        try:
            signature = pki.b64d(str_param(params, "signature"))
        except pki.PKIError:
            raise RpcError(rpc.AUTH_FAILED, "aid_login2_failed: signature is not base64") from None
        if not pki.verify_signature(self._aid_cert(aid).public_key(), signature, f"{nonce}:{client_time}".encode()):
            raise RpcError(rpc.AUTH_FAILED, "aid_login2_failed: signature does not verify")
        self._refuse_revoked(aid)
        access, refresh, _ = self.net.store.issue_tokens(aid, self.net.access_ttl, self.net.refresh_ttl)
        answer = {"status": "ok", "aid": aid, "access_token": access, "refresh_token": refresh,
                  "expires_in": int(self.net.access_ttl)}
        cert = self._aid_cert(aid)
        start, end = cert.not_valid_before_utc.timestamp(), cert.not_valid_after_utc.timestamp()
        if time.time() > start + (end - start) / 2:  # protocol doc 01: renewed at login past half its validity
            answer["new_cert"] = pki.cert_pem(self._issue(aid, cert.public_key()))
        return answer

    def rpc_refresh(self, params: dict[str, Any]) -> dict[str, Any]:
        """The refresh token alone names its session (protocol doc 01 sends only it); an `aid`
        given too must be the token's. A revoked AID gets no new tokens: it must log in, which
        refuses it."""
        claimed = validate_aid(params["aid"]) if params.get("aid") not in (None, "") else None
        token = params.get("refresh_token")
        if token is not None and not isinstance(token, str):
            raise RpcError(rpc.INVALID_PARAMS, "param refresh_token must be a string")
        refused = {"success": False, "error": "invalid_or_expired_refresh_token", "relogin_required": True,
                   "retryable": False, **({"aid": claimed} if claimed else {})}
        owner = claimed or (self.net.store.token_aid(token, "refresh") if token else None)
        if owner is not None and self.net.store.current_revoked_at(owner) is not None:
            return dict(refused, error="certificate_revoked")
        rotated = self.net.store.rotate_refresh(token, claimed, self.net.access_ttl, self.net.refresh_ttl) \
            if token else None
        if rotated is None:
            return refused
        aid, access, refresh, _ = rotated
        return {"success": True, "aid": aid, "access_token": access, "refresh_token": refresh,
                "expires_in": int(self.net.access_ttl), "relogin_required": False, "retryable": False}

    def rpc_connect(self, params: dict[str, Any]) -> dict[str, Any]:
        if self.nonce_used or params.get("nonce") != self.nonce:
            raise RpcError(rpc.BAD_NONCE, "invalid or reused challenge nonce")
        self.nonce_used = True
        proto = params.get("protocol") or {"min": "1.0", "max": "1.0"}
        if not isinstance(proto, dict) or not str(proto.get("min", "1.0")) <= PROTOCOL_VERSION <= str(proto.get("max", "1.0")):
            raise RpcError(rpc.VERSION_MISMATCH, "protocol version mismatch",
                           {"server_range": {"min": "1.0", "max": "1.0"}, "client_range": proto})
        auth = params.get("auth")
        if not isinstance(auth, dict) or not auth.get("method"):
            raise RpcError(rpc.MISSING_PARAMS, "missing auth.method")
        if auth.get("method") != "kite_token" or not isinstance(auth.get("token"), str):
            raise RpcError(rpc.AUTH_FAILED, "unsupported auth method (this devnet accepts kite_token)")
        aid = self.net.store.token_aid(auth["token"], "access")
        if aid is None:
            raise RpcError(rpc.AUTH_FAILED, "token invalid or expired")
        device = params.get("device") or {}
        client = params.get("client") or {}
        if not isinstance(device, dict) or not isinstance(client, dict):
            raise RpcError(rpc.INVALID_PARAMS, "device and client must be objects")
        device_id, slot_id = str(device.get("id") or ""), str(client.get("slot_id") or "")
        if slot_id and not device_id:
            raise RpcError(rpc.MISSING_PARAMS, "slot_requires_device_id")
        if device_id and not ids.DEVICE_RE.match(device_id) or slot_id and not ids.SLOT_RE.match(slot_id):
            raise RpcError(rpc.INVALID_PARAMS, "invalid device.id or client.slot_id")
        options = params.get("options") or {}
        kind = options.get("kind", "long") if isinstance(options, dict) else "long"
        if kind not in ("long", "short"):
            raise RpcError(rpc.INVALID_PARAMS, "options.kind must be long or short")
        mode = params.get("delivery_mode") or {}
        self.delivery_mode = str(mode.get("mode") or "fanout") if isinstance(mode, dict) else "fanout"
        if self.delivery_mode not in ("fanout", "queue"):
            raise RpcError(rpc.INVALID_PARAMS, "delivery_mode.mode must be fanout or queue")
        routing = str(mode.get("routing") or "") if isinstance(mode, dict) else ""
        self.delivery_routing = (routing or "round_robin") if self.delivery_mode == "queue" else ""
        if self.delivery_routing not in ("", "round_robin", "sender_affinity"):
            raise RpcError(rpc.INVALID_PARAMS, "delivery_mode.routing must be round_robin or sender_affinity")
        self.aid, self.device_id, self.slot_id, self.kind = aid, device_id, slot_id or "default", kind
        caps = params.get("capabilities")
        self.declares_agent_md = isinstance(caps, dict) and caps.get("agent_md_validation_v1") is True
        self.slot_key = ids.slot_isolation_key(self.slot_id)
        try:
            kicked = self.net.register_conn(self)
        except RpcError:
            self.aid = ""
            raise
        self.connected_at = time.time()
        for other in kicked:
            other.push(rpc.notification("event/gateway.disconnect", {
                "code": CLOSE_REPLACED, "reason": "aid_device_slot: replaced by a newer long connection",
                "detail": {"scope": "aid_device_slot", "aid": aid, "device_id": device_id,
                           "slot_id": other.slot_id, "limit": 1}}))
            other.closed = True  # no more pushes; the close follows once the client had the event
            other.close_later(KICK_GRACE_SECONDS, CLOSE_REPLACED, "replaced by a newer long connection")
        if kind == "short":
            ttl = options.get("short_ttl_ms", 30000)
            ttl = ttl if isinstance(ttl, int) and not isinstance(ttl, bool) and 0 < ttl <= 600_000 else 30000
            self.close_later(ttl / 1000, CLOSE_SHORT_TTL, "short connection ttl expired")
        self.net.stats.connections.append({"event": "connect", "aid": aid, "device_id": device_id,
                                           "slot_id": self.slot_id, "kind": kind, "conn_id": self.conn_id,
                                           "t": self.connected_at, "kicked": len(kicked)})
        return {"status": "ok", "protocol": PROTOCOL_VERSION, "server_time": self.connected_at,
                "authenticated": True,
                "identity": {"module_id": "aund-devnet", "role": "agent", "aid": aid},
                "connection": {"id": self.conn_id, "device_id": device_id, "kind": kind, "slot_id": self.slot_id},
                "capabilities": SERVER_CAPABILITIES}

    # --- meta ----------------------------------------------------------------------------------
    def rpc_ping(self, params: dict[str, Any]) -> dict[str, Any]:
        return {"pong": True, "timestamp": int(time.time())}

    def rpc_status(self, params: dict[str, Any]) -> dict[str, Any]:
        return {"mode": "gateway", "aid": self.aid, "role": "agent", "connected_at": int(self.connected_at * 1000),
                "protocol_version": PROTOCOL_VERSION, "device_id": self.device_id, "slot_id": self.slot_id}

    # --- prekeys -------------------------------------------------------------------------------
    def rpc_put_peer_pk(self, params: dict[str, Any]) -> dict[str, Any]:
        if str_param(params, "peer_aid", required=False, default=self.aid) != self.aid:
            raise RpcError(rpc.PERMISSION_DENIED, "peer_aid must be the connection's own AID")
        if not self.device_id:
            raise RpcError(rpc.MISSING_PARAMS, "a prekey needs a device id on the connection")
        key_source = str_param(params, "key_source", required=False, default="peer_device_prekey")
        spk_id, spk_pk, sig, timestamp = self.checked_prekey(params)
        self.net.store.put_prekey(self.aid, self.device_id, {
            "key_source": key_source, "spk_id": spk_id, "spk_pk": spk_pk, "spk_signature": sig,
            "spk_timestamp": timestamp})
        return {"success": True, "spk_id": spk_id, "device_id": self.device_id}

    def checked_prekey(self, params: dict[str, Any]) -> tuple[str, str, str, int]:
        return checked_prekey(params, self._aid_cert(self.aid))

    def own_cert(self):
        """The connection's AID certificate (a federated group call carries its own, see federation.py)."""
        return self._aid_cert(self.aid)

    def _devices(self, aid: str) -> list[dict[str, Any]]:
        return self.net.devices(aid)

    def rpc_bootstrap(self, params: dict[str, Any]) -> Any:
        peer = validate_aid(params.get("peer_aid"))
        remote = self.net.federation.get(federation.issuer_of(peer))
        if remote is not None and federation.issuer_of(peer) != self.net.issuer:
            return self._bootstrap_foreign(remote, peer)
        if self.net.store.current_cert(peer) is None:
            raise RpcError(rpc.NOT_FOUND, f"unknown peer aid: {peer}")
        own = [d for d in self._devices(self.aid) if d["device_id"] != self.device_id]
        return {"peer_aid": peer, "peer_devices": self._devices(peer) if peer != self.aid else own,
                "self_devices": own, "audit_recipients": []}

    async def _bootstrap_foreign(self, remote: str, peer: str) -> dict[str, Any]:
        try:
            found = await federation.devices(self.net, remote, peer)
        except federation.FederationError as exc:
            raise RpcError(rpc.INTERNAL_ERROR, f"the gateway of {peer} cannot be reached: {exc}") from None
        own = [d for d in self._devices(self.aid) if d["device_id"] != self.device_id]
        return {"peer_aid": peer, "peer_devices": found, "self_devices": own, "audit_recipients": []}

    async def _send_foreign(self, remote: str, message: dict[str, Any]) -> dict[str, Any]:
        try:
            answer = await federation.deliver(self.net, remote, message)
        except federation.FederationError as exc:
            raise RpcError(rpc.INTERNAL_ERROR, f"the gateway of {message['to']} refused or cannot be reached: "
                                               f"{exc}") from None
        return {"message_id": message["message_id"], "seq": answer.get("seq"), "timestamp": answer.get("timestamp"),
                "status": "delivered" if answer.get("created", True) else "duplicate", "delivery_mode": "fanout",
                "storage": "persistent"}

    # --- messages ------------------------------------------------------------------------------
    def rpc_send(self, params: dict[str, Any]) -> Any:
        for forbidden in ("persist", "delivery_mode", "queue_routing", "affinity_ttl_ms"):
            if forbidden in params:
                raise RpcError(rpc.INVALID_PARAMS, f"param {forbidden} is not accepted")
        to = validate_aid(params.get("to"))
        payload = params.get("payload")
        if not isinstance(payload, dict):
            raise RpcError(rpc.INVALID_PARAMS, "payload must be an object")
        message_id = str_param(params, "message_id", required=False) or "m-" + secrets.token_hex(16)
        if len(message_id) > 128:
            raise RpcError(rpc.INVALID_PARAMS, "message_id longer than 128 characters")
        need_render = params.get("need_render", True)
        if not isinstance(need_render, bool):
            raise RpcError(rpc.INVALID_PARAMS, "need_render must be a boolean")
        try:  # rows wrap the payload a few levels deeper: keep every frame that carries it parseable
            rpc.check_depth(payload, rpc.MAX_DEPTH - MAX_ROW_WRAPPING)
        except rpc.FrameError as exc:
            raise RpcError(rpc.INVALID_PARAMS, f"payload: {exc}") from None
        body = dumps(payload)
        if len(body.encode("utf-8")) > MAX_PAYLOAD_BYTES:
            raise RpcError(rpc.INTERNAL_ERROR, "payload larger than 1 MB")
        remote = self.net.federation.get(federation.issuer_of(to))
        if remote is None and self.net.store.current_cert(to) is None:
            raise RpcError(rpc.INTERNAL_ERROR, f"unknown target aid: {to}")
        kind = "plain"
        sender_device = self.device_id
        if payload.get("type") == "e2ee.p2p_encrypted":
            kind = "e2ee"
            aad = payload.get("aad")
            if payload.get("version") != "v2" or not isinstance(aad, dict) or not isinstance(payload.get("recipients"), list):
                raise RpcError(rpc.INVALID_PARAMS, "malformed e2ee.p2p_encrypted envelope")
            if aad.get("from") != self.aid or aad.get("message_id") != message_id:
                raise RpcError(rpc.INVALID_PARAMS, "envelope aad.from / aad.message_id do not match the request")
            sender_device = str(aad.get("from_device") or self.device_id)
        ttl = params.get("ttl", 0)
        if ttl is not None and ttl != 0 and not (isinstance(ttl, int) and not isinstance(ttl, bool) and ttl < 0):
            return _service("msgevents").send_volatile(self, to, message_id, kind, body, need_render, sender_device, ttl)
        if remote is not None and federation.issuer_of(to) != self.net.issuer:
            return self._send_foreign(remote, {"to": to, "from": self.aid, "sender_device_id": sender_device,
                                               "message_id": message_id, "kind": kind, "payload": payload,
                                               "need_render": need_render})
        msg, created = self.net.store.append_message(to, self.aid, sender_device, message_id, kind, body, need_render)
        if created:
            self.net.push_message(msg)
        return {"message_id": message_id, "seq": msg.seq, "timestamp": msg.t_server,
                "status": "delivered" if created else "duplicate", "delivery_mode": "fanout",
                "storage": "persistent"}

    def rpc_peers(self, params: dict[str, Any]) -> dict[str, Any]:
        filt = params.get("filter", "pending")
        if filt not in ("pending", "all"):
            raise RpcError(rpc.INVALID_PARAMS, "filter must be pending or all")
        limit = int_param(params, "limit", 200, lo=1, hi=500)
        token = params.get("page_token") or ""
        if not isinstance(token, str):
            raise RpcError(rpc.INVALID_PARAMS, "page_token must be a string")
        rows = self.net.store.peers(self.aid, self.device_id, self.slot_key)
        volatile = _service("msgevents").volatile_senders(self)
        known = {r["sender"] for r in rows}
        rows += [{"sender": s, "head": 0, "ack": 0, "next_pending": 0} for s in sorted(volatile - known)]
        rows.sort(key=lambda r: r["sender"])
        peers = [{"sender_aid": r["sender"], "head_seq": r["head"], "server_ack_seq": r["ack"],
                  "initial_after_seq": 0, "initialization_source": "bootstrap",
                  "next_pending_seq": r["next_pending"] or r["head"] + 1,
                  "volatile_has_more": r["sender"] in volatile, "retention_floor_seq": 0}
                 for r in rows if filt == "all" or r["head"] > r["ack"] or r["sender"] in volatile]
        for p in peers:
            if p["head_seq"] == 0 and p["volatile_has_more"]:
                del p["next_pending_seq"]  # volatile-only: no persistent candidate to name
        result: dict[str, Any] = {"cursor_scope": "peer", "receiver_aid": self.aid, "device_id": self.device_id,
                                  "bootstrap_floor_seq": 0, "catalog_ready": True, "catalog_revision": 1}
        if filt == "all":
            peers = [p for p in peers if p["sender_aid"] > token]
            result["has_more"] = len(peers) > limit
            peers = peers[:limit]
            result["next_page_token"] = peers[-1]["sender_aid"] if result["has_more"] else ""
        result["peers"] = peers
        return result

    def rpc_pull(self, params: dict[str, Any]) -> dict[str, Any]:
        if params.get("cursor_scope", "peer") != "peer" or "sender_aid" not in params:
            raise RpcError(rpc.INVALID_PARAMS, "this devnet serves peer-mode pulls (cursor_scope=peer, sender_aid)")
        sender = validate_aid(params.get("sender_aid"))
        limit = int_param(params, "limit", 50, lo=1, hi=200)
        store = self.net.store
        if "ack_up_to_seq" in params:
            store.ack(self.aid, self.device_id, self.slot_key, sender, int_param(params, "ack_up_to_seq", 0))
        ack = store.get_ack(self.aid, self.device_id, self.slot_key, sender)
        after = int_param(params, "after_seq", ack)
        scan_after = after  # retention floor is 0: nothing is ever expired here
        examined = None  # queue mode: the last seq looked at when the scan stopped short of the head
        if self.delivery_mode == "queue":  # only this instance's rows (the others' are theirs)
            scanned = store.peer_rows(self.aid, sender, scan_after, QUEUE_SCAN_ROWS)
            rows = [m for m in scanned if self.net.claim_for_pull(self, m)]
            if len(scanned) == QUEUE_SCAN_ROWS and len(rows) <= limit:
                examined = scanned[-1].seq
        else:
            rows = store.peer_rows(self.aid, sender, scan_after, limit + 1)
        has_more = len(rows) > limit or examined is not None
        rows = rows[:limit]
        messages = [render_row(m, self.device_id, self.slot_id) for m in rows]
        kept = self.net.page_rows_that_fit(messages)
        if kept < len(messages):
            has_more, rows, messages = True, rows[:kept], messages[:kept]
            examined = None  # the page stops at its last row
        head = max(store.peer_head(self.aid, sender), scan_after)
        covered = (rows[-1].seq if examined is None else examined) if has_more else head
        tail = params.get("window_mode") == "tail"
        volatile, volatile_more = ([], False) if tail else _service("msgevents").volatile_page(self, sender, params,
                                                                                     limit - len(messages))
        result = {"cursor_scope": "peer", "sender_aid": sender, "device_id": self.device_id,
                  "messages": messages + volatile, "count": len(messages) + len(volatile), "scan_after_seq": scan_after,
                  "covered_through_seq": covered, "next_after_seq": covered, "head_seq": head,
                  "retention_floor_seq": 0, "persistent_has_more": has_more, "volatile_has_more": volatile_more,
                  "has_more": has_more or volatile_more, "server_ack_seq": ack}
        if volatile:
            result["latest_volatile_cursor"] = volatile[-1]["volatile_cursor"]
        if tail:
            result["window_start_seq"] = scan_after
        if self.net.faults.break_proof > 0 and messages:
            self.net.faults.break_proof -= 1
            result["covered_through_seq"] = result["next_after_seq"] = head + 5  # claims rows it does not have
        return result

    def rpc_history(self, params: dict[str, Any]) -> dict[str, Any]:
        """`message.history`: one read-only page of the messages from `sender_aid` with seq <
        `before_seq`, newest first selected, returned oldest first; moves no cursor, pushes nothing."""
        if params.get("cursor_scope", "peer") != "peer" or "sender_aid" not in params:
            raise RpcError(rpc.INVALID_PARAMS, "this devnet serves peer-mode history (cursor_scope=peer, sender_aid)")
        sender = validate_aid(params.get("sender_aid"))
        before, limit = history_window(params, HISTORY_MAX_LIMIT)
        rows = self.net.store.peer_rows_before(self.aid, sender, before, limit + 1)
        has_older = len(rows) > limit
        messages = [render_row(m, self.device_id, self.slot_id) for m in rows[-limit:]]
        return dict(history_page(messages, has_older), cursor_scope="peer", sender_aid=sender,
                    device_id=self.device_id, retention_floor_seq=0, earliest_available_seq=None)

    def rpc_ack(self, params: dict[str, Any]) -> dict[str, Any]:
        sender = validate_aid(params.get("sender_aid"))
        if self.net.faults.fail_acks > 0:
            self.net.faults.fail_acks -= 1
            raise RpcError(5003, "ack service unavailable (devnet fault)", {"retryable": True})
        up_to = int_param(params, "up_to_seq", 0)
        volatile = _service("msgevents").volatile_ack(self, sender, params)
        effective = self.net.store.ack(self.aid, self.device_id, self.slot_key, sender, up_to)
        result = {"success": True, "cursor_scope": "peer", "sender_aid": sender, "peer_ack_seq": effective,
                  "effective_ack_seq": effective, "ack_seq": effective}
        if volatile is not None:
            result["volatile_ack"] = volatile
        return result


HANDLERS: dict[str, Callable[[Conn, dict[str, Any]], dict[str, Any]]] = {
    "auth.create_aid": Conn.rpc_create_aid,
    "auth.aid_login1": Conn.rpc_login1,
    "auth.aid_login2": Conn.rpc_login2,
    "auth.refresh_token": Conn.rpc_refresh,
    "auth.connect": Conn.rpc_connect,
    "auth.renew_cert": Conn.rpc_renew_cert,
    "auth.rekey": Conn.rpc_rekey,
    "meta.ping": Conn.rpc_ping,
    "meta.status": Conn.rpc_status,
    "message.v2.put_peer_pk": Conn.rpc_put_peer_pk,
    "message.v2.bootstrap": Conn.rpc_bootstrap,
    "message.send": Conn.rpc_send,
    "message.peers": Conn.rpc_peers,
    "message.v2.pull": Conn.rpc_pull,
    "message.v2.ack": Conn.rpc_ack,
    "message.history": Conn.rpc_history,
}

#: which module registered each method (the core ones: this module)
OWNERS: dict[str, str] = dict.fromkeys(HANDLERS, __name__)


def register(handlers: dict[str, Callable[..., Any]], owner: str) -> None:
    """Add a service module's handlers to the table, once, at its import; a method that two
    modules serve is a bug, refused with both names (never one silently replacing the other)."""
    taken = sorted(set(handlers) & set(HANDLERS))
    if taken:
        raise RuntimeError(f"devnet: {', '.join(taken)} served twice: by {OWNERS[taken[0]]} and by {owner}")
    HANDLERS.update(handlers)
    OWNERS.update(dict.fromkeys(handlers, owner))



