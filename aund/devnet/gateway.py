"""devnet: the gateway itself, one ASGI app serving the AUN WebSocket (`/aun`) and the HTTP side
endpoints on one port, as a real gateway does. Served by hypercorn on trio.

Layout: `Devnet` holds the state (store, CA, live connections, counters, fault knobs); `Conn` is
one WebSocket with its single writer task; RPC handlers are the `rpc_*` methods of `Conn`,
found through one dispatch table. Errors a client caused are answered as JSON-RPC errors and
never end the connection; a frame that is not JSON-RPC gets -32700/-32600 and the connection
stays up; only an oversized frame (the server closes with 1009) or a failed `auth.connect`
closes it.
"""
from __future__ import annotations

import base64
import inspect
import math
import re
import secrets
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable
from urllib.parse import parse_qs, unquote

import structlog
import trio

from aund import params as params_mod
from aund.aun import jsonrpc as rpc
from aund.aun import ids, signing
from aund.aun.e2ee import merkle, spk_id_for, verify_spk
from aund.aun.messaging import history_window as checked_history_window
from aund.devnet import federation
from aund.devnet.federation import PUSH_QUEUE as FEDERATED_PUSH_QUEUE
from aund.devnet.pki import DevCA, der_sha256_hex, serial_hex
from aund.devnet.store import StoredMessage, Store, dumps
from aund.identity import agent_md as agent_md_doc
from aund.errors import InvalidParams
from aund.identity import pki

log = structlog.get_logger("aund.devnet")

MAX_SHORT_PER_SLOT = 10
MAX_INFLIGHT_PER_CONN = 64
MAX_PAYLOAD_BYTES = 1_000_000
MAX_ROW_WRAPPING = 8  # levels a stored payload gains inside push and pull frames
PULL_PAGE_BYTES = 512 * 1024  # a pull page stops adding rows past this size (always at least one row)
OUTBOX_FRAMES = 512
HISTORY_MAX_LIMIT = 200  # message.history (group.history: 50, as production)
QUEUE_SCAN_ROWS = 1000  # a queue-mode pull looks at this many rows of the sender at most
PROTOCOL_VERSION = "1.0"
SERVER_CAPABILITIES = {"namespaces": ["auth", "message", "meta", "group"], "p2p_peer_pull_v1": True,
                       "inline_realtime_payload_v1": True, "e2ee": True, "group_e2ee": True,
                       "max_message_size": MAX_PAYLOAD_BYTES}
#: Signed methods the gateway also takes unsigned, on the connection's identity (see
#: `Conn.connection_identity_suffices`).
UNSIGNED_OK_METHODS = frozenset({"message.send", "group.send"})
# calls production admits without an agent.md (the recovery paths of group identities)
AGENT_MD_EXEMPT = frozenset({"group.create", "group.bind_group_aid", "group.renew_group_aid"})
PRE_AUTH_METHODS = {"auth.create_aid", "auth.aid_login1", "auth.aid_login2", "auth.refresh_token", "auth.connect",
                    "auth.renew_cert", "auth.rekey"}
NOTIFY_MAX_BYTES = 64 * 1024  # a notification's params, as the SDK bounds them
NOTIFY_MAX_TTL_MS = 60_000

from aund.aun.codes import (  # noqa: E402  (close codes: the SDK never reconnects after most 40xx)
    CLOSE_AUTH_FAILED, CLOSE_AUTH_TIMEOUT, CLOSE_REPLACED, CLOSE_SHORT_TTL,
)
KICK_GRACE_SECONDS = 0.25  # between event/gateway.disconnect and the close, so the client reads the event


class RpcError(Exception):
    """Answer the current request with a JSON-RPC error."""

    def __init__(self, code: int, message: str, data: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.code, self.message, self.data = code, message, data


def validate_aid(aid: Any, issuer: str | None = None) -> str:
    try:
        aid = ids.normalize_aid(aid)
    except ValueError as exc:
        raise RpcError(rpc.INVALID_PARAMS, f"invalid aid: {exc}") from None
    if issuer is not None and aid.partition(".")[2] != issuer:
        raise RpcError(rpc.PERMISSION_DENIED, f"this devnet issues only *.{issuer} identities")
    return aid


def bad_param(exc: params_mod.ParamError) -> RpcError:
    return RpcError(rpc.INVALID_PARAMS, str(exc))


def _str(params: dict[str, Any], key: str, *, required: bool = True, default: str = "") -> str:
    with params_mod.fail_as(bad_param):
        return params_mod.string(params, key, params_mod.MISSING if required else default, what="param")


def _int(params: dict[str, Any], key: str, default: int, *, lo: int = 0, hi: int = rpc.MAX_SAFE_INT) -> int:
    with params_mod.fail_as(bad_param):
        return params_mod.integer(params, key, default, minimum=lo, maximum=hi, clamp=True, what="param")


@dataclass
class Faults:
    """Knobs that make the devnet misbehave on purpose, set through PUT /devnet/faults."""

    drop_push_every: int = 0      # drop every Nth push (0 = never)
    reply_delay_ms: int = 0       # hold every RPC reply this long
    break_proof: int = 0          # the next N pull pages claim coverage beyond the head (a lying gateway)
    replay_pushes: int = 0        # the next N pushes are sent twice (a replaying gateway)
    fail_acks: int = 0            # the next N message.v2.ack calls fail (retryable 5003) and change nothing
    unbounded_pages: int = 0      # 1 = pull pages bounded by row count only (a gateway without a byte cap)
    push_counter: int = 0

    def should_drop_push(self) -> bool:
        if self.drop_push_every <= 0:
            return False
        self.push_counter += 1
        return self.push_counter % self.drop_push_every == 0


@dataclass
class Stats:
    rpc: Counter = field(default_factory=Counter)
    rpc_errors: Counter = field(default_factory=Counter)
    http: Counter = field(default_factory=Counter)
    max_inflight: int = 0
    max_inflight_by_method: Counter = field(default_factory=Counter)
    pushes: int = 0
    pushes_dropped: int = 0
    connections: deque = field(default_factory=lambda: deque(maxlen=10_000))

    def snapshot(self) -> dict[str, Any]:
        return {"rpc": dict(self.rpc), "rpc_errors": dict(self.rpc_errors), "http": dict(self.http),
                "max_inflight": self.max_inflight, "max_inflight_by_method": dict(self.max_inflight_by_method),
                "pushes": self.pushes, "pushes_dropped": self.pushes_dropped,
                "connections": list(self.connections)}


class Devnet:
    """The state of one devnet gateway; `app` is its ASGI entry point."""

    def __init__(self, store: Store, ca: DevCA, issuer: str, *, access_ttl: float = 3600.0,
                 refresh_ttl: float = 30 * 86400.0, slot_policy: str = "kick",
                 extra_gateways: list[str] | None = None, federation: dict[str, str] | None = None) -> None:
        self.store, self.ca, self.issuer = store, ca, issuer
        self.federation = dict(federation or {})  # other issuer -> its devnet's base URL
        self.services: dict[str, Any] = {}  # each service module's state for this devnet (groups, thoughts)
        self.federation_outbox = trio.open_memory_channel[tuple[str, dict[str, Any]]](FEDERATED_PUSH_QUEUE)
        self.agent_md_check = True  # production's admission: declaring clients need an agent.md (-32003)
        self.group_identity_check = False  # and a group certificate + card (-32003; --group-identity-check)
        self.cert_ttl = 0.0  # seconds an AID certificate is valid (0: the PKI mode's days; --cert-ttl)
        self.access_ttl, self.refresh_ttl = access_ttl, refresh_ttl
        self.slot_policy = slot_policy
        self.extra_gateways = extra_gateways or []
        self.conns: dict[str, set[Conn]] = {}
        # queue delivery: (receiver, seq) -> the instance (device_id, slot isolation key) that owns it
        self.queue_owner: dict[tuple[str, int], tuple[str, str]] = {}
        self.queue_turn: Counter = Counter()  # receiver -> round-robin position
        self.queue_affinity: dict[tuple[str, str], tuple[str, str]] = {}  # (receiver, sender) -> instance
        self.login_requests: dict[str, tuple[str, str, float]] = {}  # request_id -> (aid, nonce, expires)
        self.stats = Stats()
        self.faults = Faults()
        self.public_url = ""
        self.tls = False  # serving wss:// and https:// (set by serve_devnet)

    # --- ASGI --------------------------------------------------------------------------------
    async def app(self, scope: dict[str, Any], receive: Callable[[], Awaitable[dict]],
                  send: Callable[[dict], Awaitable[None]]) -> None:
        if scope["type"] == "websocket":
            if scope["path"] != "/aun":
                await send({"type": "websocket.close", "code": 1008})
                return
            await Conn(self, receive, send).serve()
        elif scope["type"] == "http":
            await self.http(scope, receive, send)
        elif scope["type"] == "lifespan":
            while (await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})

    def live(self, aid: str) -> set["Conn"]:
        return self.conns.get(aid, set())

    def page_rows_that_fit(self, rows: list[dict[str, Any]]) -> int:
        """How many of a pull page's rows it keeps: as a production gateway, rows while the page
        stays within PULL_PAGE_BYTES (always at least one); all of them with `unbounded_pages`."""
        if self.faults.unbounded_pages:
            return len(rows)
        size = 0
        for kept, row in enumerate(rows):
            size += len(dumps(row).encode("utf-8"))
            if kept and size > PULL_PAGE_BYTES:
                return kept
        return len(rows)

    def register_conn(self, conn: "Conn") -> list["Conn"]:
        """Apply the slot rules to a freshly authenticated connection; returns connections to kick.

        Raises RpcError when the connection is refused.
        """
        peers = self.live(conn.aid)
        for other in peers:
            if other.delivery_mode != conn.delivery_mode:
                raise RpcError(rpc.AUTH_FAILED, "delivery_mode_conflict")
        same_slot = [c for c in peers if c.device_id == conn.device_id and c.slot_key == conn.slot_key]
        kicked: list[Conn] = []
        if conn.kind == "short":
            if sum(c.kind == "short" for c in same_slot) >= MAX_SHORT_PER_SLOT:
                raise RpcError(rpc.RATE_LIMITED, "slot_conflict: short connection quota (10) exceeded",
                               {"retryable": True})
        else:
            longs = [c for c in same_slot if c.kind == "long"]
            if longs and self.slot_policy == "refuse":
                raise RpcError(rpc.AUTH_FAILED, "long_connection_already_exists", {"retryable": True})
            kicked = longs
        for other in kicked:
            peers.discard(other)
        self.conns.setdefault(conn.aid, set()).add(conn)
        return kicked

    def unregister_conn(self, conn: "Conn") -> None:
        peers = self.conns.get(conn.aid)
        if peers is not None:
            peers.discard(conn)
            if not peers:
                del self.conns[conn.aid]

    def devices(self, aid: str) -> list[dict[str, Any]]:
        """The published devices (identity key + current prekey) of a local AID."""
        pem = self.store.current_cert(aid)
        if pem is None or self.store.current_revoked_at(aid) is not None:
            return []  # a revoked identity's prekeys are never handed out
        ik = pki.public_key_b64(pki.load_cert_pem(pem).public_key())
        return [{"aid": aid, "device_id": r["device_id"], "ik_pk": ik, "key_source": r["key_source"],
                 "spk_id": r["spk_id"], "spk_pk": r["spk_pk"], "spk_signature": r["spk_signature"],
                 "spk_timestamp": r["spk_timestamp"]} for r in self.store.prekeys(aid)]

    def queue_instance(self, msg: StoredMessage, online: list["Conn"]) -> tuple[str, str]:
        """The one instance (device, slot key) of a queue-mode receiver that gets `msg`: the one it
        was given to before, else by `sender_affinity` the sender's last one (while online), else
        the next online long connection in turn (round robin)."""
        key = (msg.receiver, msg.seq)
        owner = self.queue_owner.get(key)
        if owner is None:
            instances = sorted({(c.device_id, c.slot_key) for c in online})
            sticky = self.queue_affinity.get((msg.receiver, msg.sender))
            if online[0].delivery_routing == "sender_affinity" and sticky in instances:
                owner = sticky
            else:
                owner = instances[self.queue_turn[msg.receiver] % len(instances)]
                self.queue_turn[msg.receiver] += 1
            self.queue_owner[key] = owner
            self.queue_affinity[(msg.receiver, msg.sender)] = owner
        return owner

    def claim_for_pull(self, conn: "Conn", msg: StoredMessage) -> bool:
        """Whether a queue-mode puller may have `msg`: its own, or nobody's yet (then it is its own)."""
        mine = (conn.device_id, conn.slot_key)
        return self.queue_owner.setdefault((msg.receiver, msg.seq), mine) == mine

    def push_message(self, msg: StoredMessage) -> None:
        """Send `msg` inline to the receiver's online long connections (each device gets its own
        form); in queue mode to one instance only."""
        online = [c for c in self.live(msg.receiver) if c.kind == "long" and not c.closed]
        if online and online[0].delivery_mode == "queue":  # one mode per AID (register_conn)
            owner = self.queue_instance(msg, online)
            online = [c for c in online if (c.device_id, c.slot_key) == owner]
        for conn in online:
            if self.faults.should_drop_push():
                self.stats.pushes_dropped += 1
                continue
            row = render_row(msg, conn.device_id, conn.slot_id, inline=True)
            event = "peer.v2.message_received" if msg.kind == "e2ee" else "message.received"
            params: dict[str, Any] = {"seq": msg.seq, "message_id": msg.message_id, "from": msg.sender, "from_aid": msg.sender,
                      "sender_aid": msg.sender, "to": msg.receiver, "sender_device_id": msg.sender_device_id,
                      "cursor_scope": "peer", "prev_peer_seq": msg.prev_peer_seq, "device_id": conn.device_id,
                      "target_device_id": conn.device_id, "slot_id": conn.slot_id}
            if row is not None:  # without an inline row the client learns of the message and pulls it
                params["inline_message"] = dict(row, prev_peer_seq=msg.prev_peer_seq)
            copies = 1
            if self.faults.replay_pushes > 0:
                self.faults.replay_pushes -= 1
                copies = 2
            for _ in range(copies):
                if conn.push(rpc.notification("event/" + event, params)):
                    self.stats.pushes += 1
                else:
                    self.stats.pushes_dropped += 1

    # --- HTTP --------------------------------------------------------------------------------
    async def http(self, scope: dict[str, Any], receive: Callable, send: Callable) -> None:
        method, path = scope["method"], scope["path"]
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
        body = b""
        # the storage data plane takes whole objects; everything else is small JSON
        limit = _storage.MAX_OBJECT_BYTES if path.startswith("/storage/v1/") else 1 << 20
        while True:
            event = await receive()
            body += event.get("body", b"")
            if len(body) > limit:
                return await _respond(send, 413, {"error": "body too large"})
            if not event.get("more_body"):
                break
        self.stats.http[f"{method} /{'/'.join(path.split('/')[1:3])}"] += 1
        try:
            if path == "/federation/v1/group" and method == "POST":  # runs a group handler: may await
                status, payload = await federation.accept_group_call(self, body)
                extra: dict[str, str] = {}
            elif path == "/federation/v1/thought" and method == "POST":
                status, payload = federation.accept_thought_read(self, body)
                extra = {}
            elif path == "/federation/v1/push" and method == "POST":
                status, payload = federation.accept_push(self, body)
                extra = {}
            elif path.startswith("/storage/v1/"):
                status, payload, extra = _storage.http(self, method, path, headers, query, body)
            else:
                status, payload, extra = self.route(method, path, headers, query, body)
        except RpcError as exc:
            status, payload, extra = 400, {"error": exc.message}, {}
        await _respond(send, status, payload, extra, head=(method == "HEAD"))

    def route(self, method: str, path: str, headers: dict[str, str], query: dict[str, list[str]],
              body: bytes) -> tuple[int, Any, dict[str, str]]:
        if path == "/health" and method in ("GET", "HEAD"):
            return 200, {"status": "ok", "service": "aund-devnet"}, {}
        if path == "/.well-known/aun-gateway" and method == "GET":
            scheme = "wss" if self.tls else "ws"
            url = f"{scheme}://{headers['host']}/aun" if headers.get("host") else self.public_url
            gateways = [{"url": url, "priority": 1}]
            gateways += [{"url": u, "priority": i + 2} for i, u in enumerate(self.extra_gateways)]
            return 200, {"gateways": gateways}, {}
        if path == "/federation/v1/deliver" and method == "POST":
            status, answer = federation.accept_delivery(self, body)
            return status, answer, {}
        if path.startswith("/federation/v1/devices/") and method == "GET":
            aid = unquote(path[len("/federation/v1/devices/"):]).lower()
            if federation.issuer_of(aid) != self.issuer:
                return 404, {"error": f"{aid} is not of {self.issuer}"}, {}
            return 200, federation.local_material(self, aid), {}
        if path == "/pki/chain" and method == "GET":
            return 200, self.ca.chain_pem(), {"content-type": "application/x-pem-file"}
        if path == "/pki/crl.json" and method == "GET":
            return 200, {"crl_pem": self.ca.crl_pem(self.store.revoked_certs())}, {}
        if path.startswith("/pki/ocsp/") and method == "GET":
            serial = path[len("/pki/ocsp/"):].lower()
            found = self.store.cert_by_serial(serial) if re.fullmatch(r"[0-9a-f]{1,40}", serial) else None
            if found is None and serial == serial_hex(self.ca.gateway_cert):
                found = (pki.cert_pem(self.ca.gateway_cert), None)
            cert = pki.load_cert_pem(found[0]) if found else None
            status, der = self.ca.ocsp_response(cert, found[1] if found else None)
            return 200, {"status": status, "ocsp_response": base64.b64encode(der).decode()}, {}
        if path.startswith("/pki/cert/") and method in ("GET", "HEAD"):
            return self.cert_http(unquote(path[len("/pki/cert/"):]).strip().lower(), query)
        if path == "/agent.md":
            return self.agent_md(method, headers, body)
        if path == "/devnet/stats" and method == "GET":
            return 200, self.stats.snapshot(), {}
        if path == "/devnet/revoke" and method == "POST":
            return self.revoke_http(body)
        if path == "/devnet/agent-md" and method == "DELETE":  # as a gateway that lost it: -32003 follows
            aid = (query.get("aid") or [""])[0].strip().lower()
            return (200, {"aid": aid, "deleted": True}, {}) if self.store.delete_agent_md(aid) \
                else (404, {"error": f"no agent.md for {aid!r}"}, {})
        if path == "/devnet/push" and method == "POST":  # a test knob: any event, as a gateway would push it
            return _msgevents.push_http(self, body)
        if path == "/devnet/faults" and method == "PUT":
            try:
                knobs = rpc.loads(body.decode("utf-8", "replace") or "{}")
            except rpc.FrameError as exc:
                return 400, {"error": str(exc)}, {}
            if not isinstance(knobs, dict):
                return 400, {"error": "faults must be a JSON object"}, {}
            for key in ("drop_push_every", "reply_delay_ms", "break_proof", "replay_pushes", "fail_acks",
                        "unbounded_pages"):
                if isinstance(knobs.get(key), int) and not isinstance(knobs.get(key), bool):
                    setattr(self.faults, key, max(0, knobs[key]))
            return 200, {"drop_push_every": self.faults.drop_push_every, "break_proof": self.faults.break_proof,
                         "replay_pushes": self.faults.replay_pushes, "fail_acks": self.faults.fail_acks,
                         "reply_delay_ms": self.faults.reply_delay_ms,
                         "unbounded_pages": self.faults.unbounded_pages}, {}
        return 404, {"error": "not found"}, {}

    def cert_http(self, aid: str, query: dict[str, list[str]]) -> tuple[int, Any, dict[str, str]]:
        """`/pki/cert/{aid}`: the current certificate, or the one `cert_fingerprint` names (current
        or past). With `consistency=authoritative` the answer carries what production's CA says of
        it: X-AUN-Cert-Consistency, -Lifecycle-State (active_signing, verify_only, revoked,
        expired), -Fingerprint, -Observed-At, -Key-Purpose; `key_purpose` (signing or
        group_identity) must be the certificate's (404 otherwise)."""
        fp = (query.get("cert_fingerprint") or [""])[0].lower().removeprefix("sha256:")
        if fp and not re.fullmatch(r"[0-9a-f]{16}|[0-9a-f]{64}", fp):
            return 400, {"error": "cert_fingerprint must be sha256:<16 or 64 hex>"}, {}
        consistency = (query.get("consistency") or [""])[0]
        purpose = (query.get("key_purpose") or [""])[0]
        if consistency not in ("", "authoritative") or purpose not in ("", "signing", "group_identity"):
            return 400, {"error": "consistency must be authoritative; key_purpose signing or group_identity"}, {}
        state = self.store.cert_state(aid, fp)
        if state is None or purpose and state["key_purpose"] != purpose:
            return 404, {"error": "certificate not found" if state is None
                         else f"the certificate of {aid} is not for key_purpose {purpose}"}, {}
        headers = {"content-type": "application/x-pem-file"}
        if consistency:
            cert = pki.load_cert_pem(state["pem"])
            now = time.time()
            lifecycle = ("revoked" if state["revoked_at"] is not None
                         else "expired" if cert.not_valid_after_utc.timestamp() < now
                         else "active_signing" if state["current"] else "verify_only")
            observed = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now)) + f".{int(now * 1000) % 1000:03d}Z"
            headers.update({"x-aun-cert-consistency": "authoritative", "x-aun-cert-lifecycle-state": lifecycle,
                            "x-aun-cert-fingerprint": "sha256:" + state["der_sha256"],
                            "x-aun-cert-observed-at": observed, "x-aun-cert-key-purpose": state["key_purpose"],
                            "cache-control": "no-store"})
        return 200, state["pem"], headers

    def revoke_http(self, body: bytes) -> tuple[int, Any, dict[str, str]]:
        """POST /devnet/revoke {"aid"}: put the AID's current certificate on the CRL (OCSP: revoked)."""
        try:
            request = rpc.loads(body.decode("utf-8", "replace") or "{}")
        except rpc.FrameError as exc:
            return 400, {"error": str(exc)}, {}
        if not isinstance(request, dict) or not isinstance(request.get("aid"), str):
            return 400, {"error": 'the body must be {"aid": "<aid>"}'}, {}
        aid = validate_aid(request["aid"])
        done = self.store.revoke_current(aid)
        if done is None:
            return 404, {"error": f"no certificate for {aid}"}, {}
        serial, revoked_at, newly = done
        log.info("devnet.revoked", aid=aid, serial=serial, newly=newly)
        return 200, {"aid": aid, "serial": serial, "revoked_at": revoked_at, "already_revoked": not newly}, {}

    def agent_md(self, method: str, headers: dict[str, str], body: bytes) -> tuple[int, Any, dict[str, str]]:
        host = headers.get("host", "").rsplit(":", 1)[0].strip().lower()
        try:
            aid = validate_aid(host)
        except RpcError:
            return 404, {"error": "agent.md is served by AID host name"}, {}
        group = _group_identity.entity(self, aid)  # a group AID's card: signed by the group, put by its owner
        current = self.store.agent_md(aid)
        if method in ("GET", "HEAD"):
            extra = _group_identity.ownership_headers(self, group) \
                if group is not None and headers.get("x-aun-ownership-check") == "1" else {}
            if current is None:
                return 404, {"error": "agent.md not found"}, extra
            if headers.get("if-none-match") in (current[1], "*"):
                return 304, b"", {"etag": current[1], **extra}
            return 200, current[0], {"etag": current[1], "content-type": "text/markdown; charset=utf-8", **extra}
        if method != "PUT":
            return 405, {"error": "method not allowed"}, {}
        token = headers.get("authorization", "").removeprefix("Bearer ").strip()
        if group is not None:
            refused = _group_identity.check_card_upload(self, group, self.store.token_aid(token, "access")
                                                        if token else None, body)
        elif not token or self.store.token_aid(token, "access") != aid:
            return 401, {"error": "a bearer access token of the AID is required"}, {}
        else:
            refused = self.check_agent_md(aid, body)  # as the name service: schema, sizes, signature
        if refused is not None:
            return refused
        if headers.get("if-none-match") == "*" and current is not None:
            return 412, {"error": "agent.md already exists"}, {"etag": current[1]}
        if_match = headers.get("if-match")
        if if_match is not None and (current is None or if_match not in (current[1], "*")):
            return 412, {"error": "etag mismatch"}, {"etag": current[1]} if current else {}
        etag = self.store.put_agent_md(aid, body)
        now = time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime())
        return 200, {"etag": etag, "last_modified": now}, {"etag": etag}

    def check_agent_md(self, aid: str, body: bytes) -> tuple[int, Any, dict[str, str]] | None:
        """None when `body` is a valid agent.md of `aid`, signed with its current certificate; else
        the name service's answer: 413 agent_md_too_large (payload or body over the limits) or 400
        invalid_agent_md, with the reason."""
        pem = self.store.current_cert(aid)
        try:
            agent_md_doc.validate(body, aid=aid, cert=pki.load_cert_pem(pem) if pem else None)
            if pem is None:
                raise agent_md_doc.AgentMdError(f"{aid} has no certificate to verify the signature with")
        except agent_md_doc.AgentMdError as exc:
            log.info("devnet.agent_md_refused", aid=aid, code=exc.code, field=exc.field, reason=str(exc))
            return (413 if exc.code == agent_md_doc.TOO_LARGE else 400), \
                {"error": exc.code, "message": str(exc), "field": exc.field}, {}
        return None


async def _respond(send: Callable, status: int, payload: Any, extra: dict[str, str] | None = None,
                   head: bool = False) -> None:
    if isinstance(payload, bytes):
        body, ctype = payload, "application/octet-stream"
    elif isinstance(payload, str):
        body, ctype = payload.encode("utf-8"), "text/plain; charset=utf-8"
    else:
        body, ctype = dumps(payload).encode("utf-8"), "application/json"
    hdrs = {"content-type": ctype, **(extra or {})}
    if status == 304:
        body = b""
    raw = [(k.encode(), v.encode()) for k, v in hdrs.items()] + [(b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": b"" if head else body})


def history_window(params: dict[str, Any], max_limit: int) -> tuple[int, int]:
    """(before_seq, limit) of a history call (the client side's checks, answered as -32602)."""
    try:
        return checked_history_window(params, max_limit)
    except InvalidParams as exc:
        raise RpcError(rpc.INVALID_PARAMS, str(exc)) from None


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
    spk_id, spk_pk, sig = _str(params, "spk_id"), _str(params, "spk_pk"), _str(params, "spk_signature")
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
            _group_identity.admission(self, method, params)
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
            await _groups.prepare(self.net, method, params)
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
        if _str(params, "curve", required=False, default="P-256") != "P-256":
            raise RpcError(rpc.INVALID_PARAMS, "only curve P-256 is supported")
        try:
            public_key = pki.load_public_key_b64(_str(params, "public_key"))
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
        pending = self.net.login_requests.pop(_str(params, "request_id"), None)
        nonce = _str(params, "nonce")
        if pending is None or pending[0] != aid or pending[1] != nonce or pending[2] < time.time():
            raise RpcError(rpc.BAD_NONCE, "unknown, expired or replayed nonce (call auth.aid_login1 first)")
        cert = self._aid_cert(aid)
        self._refuse_revoked(aid)
        try:
            signature = pki.b64d(_str(params, "signature"))
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
        new_b64 = _str(params, "new_public_key")
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
                svc = _groups.service(self.net)
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
            presented = pki.load_cert_pem(_str(params, "cert"))
        except pki.PKIError:
            raise RpcError(rpc.AUTH_FAILED, "aid_login1_failed: invalid cert") from None
        if presented != stored:
            raise RpcError(rpc.AUTH_FAILED, "aid_login1_failed: cert is not the AID's current certificate")
        self._refuse_revoked(aid)
        client_nonce = _str(params, "client_nonce")
        now = time.time()
        for rid in [r for r, (_, _, exp) in self.net.login_requests.items() if exp < now]:
            del self.net.login_requests[rid]
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
        pending = self.net.login_requests.pop(_str(params, "request_id"), None)  # single use
        nonce = _str(params, "nonce")
        if pending is None or pending[0] != aid or pending[1] != nonce or pending[2] < time.time():
            raise RpcError(rpc.BAD_NONCE, "aid_login2_failed: unknown, expired or replayed login nonce")
        client_time = _str(params, "client_time")
        try:
            skew = abs(float(client_time) - time.time())
        except ValueError:
            raise RpcError(rpc.INVALID_PARAMS, "client_time must be a decimal number of seconds") from None
        if not math.isfinite(skew) or skew > signing.MAX_SKEW_SECONDS:
            raise RpcError(rpc.AUTH_FAILED, "aid_login2_failed: client_time outside the allowed window")
        try:
            signature = pki.b64d(_str(params, "signature"))
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
        if _str(params, "peer_aid", required=False, default=self.aid) != self.aid:
            raise RpcError(rpc.PERMISSION_DENIED, "peer_aid must be the connection's own AID")
        if not self.device_id:
            raise RpcError(rpc.MISSING_PARAMS, "a prekey needs a device id on the connection")
        key_source = _str(params, "key_source", required=False, default="peer_device_prekey")
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
        message_id = _str(params, "message_id", required=False) or "m-" + secrets.token_hex(16)
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
            return _msgevents.send_volatile(self, to, message_id, kind, body, need_render, sender_device, ttl)
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
        limit = _int(params, "limit", 200, lo=1, hi=500)
        token = params.get("page_token") or ""
        if not isinstance(token, str):
            raise RpcError(rpc.INVALID_PARAMS, "page_token must be a string")
        rows = self.net.store.peers(self.aid, self.device_id, self.slot_key)
        volatile = _msgevents.volatile_senders(self)
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
        limit = _int(params, "limit", 50, lo=1, hi=200)
        store = self.net.store
        if "ack_up_to_seq" in params:
            store.ack(self.aid, self.device_id, self.slot_key, sender, _int(params, "ack_up_to_seq", 0))
        ack = store.get_ack(self.aid, self.device_id, self.slot_key, sender)
        after = _int(params, "after_seq", ack)
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
        volatile, volatile_more = ([], False) if tail else _msgevents.volatile_page(self, sender, params,
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
        up_to = _int(params, "up_to_seq", 0)
        volatile = _msgevents.volatile_ack(self, sender, params)
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


# The services in their own modules, each registering its handlers with `register` when imported:
# groups (group.*, group.v2.*), thoughts (message.thought.*), msgevents (recall, read state, volatile).
from aund.devnet import groups as _groups  # noqa: E402,F401  (import for its side effect)
from aund.devnet import thoughts as _thoughts  # noqa: E402,F401  (message.thought.*, likewise)
from aund.devnet import storage as _storage  # noqa: E402  (storage.*, and its HTTP data plane)
from aund.devnet import msgevents as _msgevents  # noqa: E402  (message.recall / read / read_state, volatile sends)
from aund.devnet import group_identity as _group_identity  # noqa: E402  (group AIDs: admission, their cards)
