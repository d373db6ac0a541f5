"""devnet: the gateway itself, one ASGI app serving the AUN WebSocket (`/aun`) and the HTTP side
endpoints on one port, as a real gateway does. Served by hypercorn on trio.

Layout: `Devnet` (this module) holds the state (store, CA, live connections, counters, fault
knobs, each service's state in `services`) and serves HTTP; `Conn` (aund.devnet.connection) is
one WebSocket with its single writer task, the core RPC handlers its `rpc_*` methods, found
through one dispatch table that the service modules extend with `register`; the limits and the
params checks are aund.devnet.params. Errors a client caused are answered as JSON-RPC errors and
never end the connection; a frame that is not JSON-RPC gets -32700/-32600 and the connection
stays up; only an oversized frame (the server closes with 1009) or a failed `auth.connect`
closes it.
"""
from __future__ import annotations

import base64
import re
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable
from urllib.parse import parse_qs, unquote

import structlog
import trio

from aund.aun import jsonrpc as rpc
from aund.devnet import federation
from aund.devnet.federation import PUSH_QUEUE as FEDERATED_PUSH_QUEUE
from aund.devnet.pki import DevCA, serial_hex
from aund.devnet.store import StoredMessage, Store, dumps
from aund.identity import agent_md as agent_md_doc
from aund.identity import pki

log = structlog.get_logger("aund.devnet")

from aund.devnet.params import (  # noqa: F401  (re-exported: the service modules use gw.<name>)
    AGENT_MD_EXEMPT, CLOSE_AUTH_FAILED, CLOSE_AUTH_TIMEOUT, CLOSE_REPLACED, CLOSE_SHORT_TTL,
    HISTORY_MAX_LIMIT, KICK_GRACE_SECONDS, MAX_INFLIGHT_PER_CONN, MAX_PAYLOAD_BYTES, MAX_ROW_WRAPPING,
    MAX_SHORT_PER_SLOT, NOTIFY_MAX_BYTES, NOTIFY_MAX_TTL_MS, OUTBOX_FRAMES, PRE_AUTH_METHODS,
    PROTOCOL_VERSION, PULL_PAGE_BYTES, QUEUE_SCAN_ROWS, RpcError, SERVER_CAPABILITIES, UNSIGNED_OK_METHODS,
    int_param, str_param, bad_param, history_window, validate_aid,
)
from aund.devnet.connection import (  # noqa: F401  (re-exported likewise)
    HANDLERS, OWNERS, Conn, checked_prekey, history_page, per_device_envelope, register, render_row,
)

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
        self.group_card_grace = 30.0  # seconds the owner's calls pass between a new group certificate and its card
        self.cards_published: set[tuple[str, str]] = set()  # (AID, its certificate) with a card PUT since start
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
        current = self.store.cert_state(aid)  # the group card grace ends with the certificate's first card
        self.cards_published.add((aid, current["der_sha256"] if current else ""))
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


# The services in their own modules, each registering its handlers with `register` when imported:
# groups (group.*, group.v2.*), thoughts (message.thought.*), msgevents (recall, read state, volatile).
from aund.devnet import groups as _groups  # noqa: E402,F401  (import for its side effect)
from aund.devnet import thoughts as _thoughts  # noqa: E402,F401  (message.thought.*, likewise)
from aund.devnet import storage as _storage  # noqa: E402  (storage.*, and its HTTP data plane)
from aund.devnet import msgevents as _msgevents  # noqa: E402  (message.recall / read / read_state, volatile sends)
from aund.devnet import group_identity as _group_identity  # noqa: E402  (group AIDs: admission, their cards)
