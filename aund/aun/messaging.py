"""AUN layer: E2EE v2 messaging for one AID on this device, and lossless peer sync for one link.

`P2PKeys` (one per AID): the device's signed prekeys (made, published on every connect,
rotated after a message wrapped to the current one is read, old ones kept for late messages),
the bootstrap / prekey cache per peer with `invalidate(peer)`, verified peer identity keys, and
`send()` (encrypt to every device of the peer and our own other devices, sign, send; on the
gateway's prekey error codes refetch once) and `decode_row()` (decrypt with every check, or
turn the row into a `message.undecryptable` event with the reason).

`PeerSync` (one per link): one task that handles inline pushes (with `prev_peer_seq` gap
detection) and pulls (`message.peers` + `message.v2.pull` through the link's pull gate, every
page checked against the coverage proof). Rows are committed to the inbox together with the
new gateway cursor in one transaction, and only then acked upstream. Pages are sized by the
link's `PageSizer` (aund.aun.paging): fewer rows after a page closed the link with 1009, and a
row that fits in no page is recorded as `message.undecryptable` (`too_large`) and moved past.
"""
from __future__ import annotations

import time
import uuid
from typing import Any

import structlog
import trio
from cryptography.hazmat.primitives.asymmetric import ec

from aund import params as params_mod
from aund.aun import codes, events, ids, jsonrpc as rpc
from aund.aun.coverage import CoverageProofError, verify_peer_page
from aund.aun.e2ee import (
    E2EEDecryptError, E2EEEncryptError, Target, decrypt_p2p, encrypt_p2p, ik_fingerprint, sign_spk, spk_id_for,
    verify_spk,
)
from aund.aun.e2ee import p2p
from aund.aun.link import Link, wait_ready_or_forever
from aund.aun.paging import PageSizer, skipped_row
from aund.aun.peers import PeerDirectory
from aund.errors import AundError, E2EEError, GatewayError, InvalidParams
from aund.identity import pki
from aund.identity.store import Identity, IdentityStore
from aund.inbox import Inbox, NewEvent
from aund.sync import AckUpstream, Commit, Drop, Pull, Skip, Stream, SyncCore

log = structlog.get_logger("aund.messaging")

BOOTSTRAP_TTL = 3600.0
PREKEY_RETRY_CODES = codes.PREKEY_RETRY
WRAP_CAPABILITIES = {"version": "v2.1", "protocols": ["1DH", "3DH"], "scopes": ["aid", "device"],
                     "per_aid_wrap": True, "per_device_wrap": True}
PAGE_LIMIT = 200
P2P_HISTORY_LIMIT = 200  # message.history page size cap (the SDK's)
# every payload type that means "this is ciphertext": never handed to apps as plaintext
ENCRYPTED_TYPES = frozenset({"e2ee.encrypted", "e2ee.p2p_encrypted", "e2ee.group_encrypted"})
PUSH_QUEUE = 1024


def merged_headers(headers: dict[str, str] | None, params: dict[str, Any]) -> dict[str, Any]:
    """The session's protected headers with the call's own (`protected_headers`, or `headers`) over them."""
    merged: dict[str, Any] = dict(headers or {})
    extra = params.get("protected_headers", params.get("headers"))
    if isinstance(extra, dict):
        merged.update(extra)
    return merged


def row_content(row: dict[str, Any], envelope_type: str) -> tuple[str, Any]:
    """What a gateway message row carries: ("envelope", dict) when encrypted (a v2 `envelope_json`,
    or a v1 payload of `envelope_type`), ("unsupported", why) for an encrypted payload of another
    format (the SDK's legacy `e2ee.encrypted`, a group envelope in a P2P row, ...), ("plain",
    payload) when not encrypted, ("malformed", why) otherwise."""
    if row.get("version") == "v2" or "envelope_json" in row:
        try:
            envelope = rpc.loads(str(row.get("envelope_json") or ""))
        except rpc.FrameError:
            return "malformed", "envelope_json is not JSON"
    else:
        legacy = row.get("legacy_v1") if isinstance(row.get("legacy_v1"), dict) else {}
        envelope = legacy.get("payload", row.get("payload"))
        if isinstance(envelope, dict) and envelope.get("type") in ENCRYPTED_TYPES - {envelope_type}:
            return "unsupported", f"an {envelope['type']} envelope (an older or other E2EE format aund cannot open here)"
        if not isinstance(envelope, dict) or envelope.get("type") != envelope_type:
            return "plain", envelope
    if not isinstance(envelope, dict):
        return "malformed", "envelope is not an object"
    return "envelope", envelope


def history_window(params: dict[str, Any], max_limit: int) -> tuple[int, int]:
    """(before_seq, limit) of an app's history call: before_seq a positive integer, limit 1..max_limit."""
    with params_mod.fail_as(params_mod.invalid_params):
        before = params_mod.integer(params, "before_seq", minimum=1)  # the page holds seq < before_seq
        limit = params_mod.integer(params, "limit", max_limit, minimum=1, maximum=max_limit)
    return before, limit


def history_rows(result: dict[str, Any], before: int, *, sender_of=None, expected_sender: str | None = None
                 ) -> list[dict[str, Any]]:
    """The rows of a history page, checked as the SDK checks them (every seq below `before`, no
    two different rows for one seq, the page boundary at the first row, `has_older` a boolean),
    oldest first; GatewayError for a page that breaks these rules."""
    def bad(why: str) -> GatewayError:
        return GatewayError(f"history page rejected: {why}", retryable=False)

    rows = result.get("messages")
    if not isinstance(rows, list) or not isinstance(result.get("has_older", False), bool):
        raise bad("messages is not a list or has_older is not a boolean")
    by_seq: dict[int, dict[str, Any]] = {}
    for row in rows:
        seq = row.get("seq") if isinstance(row, dict) else None
        if isinstance(seq, bool) or not isinstance(seq, int) or not 1 <= seq < before:
            raise bad(f"a row's seq is not an integer below before_seq={before}")
        if expected_sender is not None and sender_of(row) != expected_sender:
            raise bad("a row comes from another sender")
        if by_seq.setdefault(seq, row) is not row and by_seq[seq] != row:
            raise bad(f"two different rows for seq {seq}")
    ordered = [by_seq[seq] for seq in sorted(by_seq)]
    start = result.get("window_start_seq")
    if ordered and start is not None and start != ordered[0]["seq"]:
        raise bad("window_start_seq is not the first row's seq")
    return ordered


def history_entry(event: NewEvent) -> dict[str, Any]:
    """What an app sees for one history row: the fields of the received-message event, or for a
    row that does not open `payload: None` and `history_error` {code, reason, message}."""
    data = dict(event.data)
    if event.kind == "message.undecryptable":
        data.update(payload=None, history_error={"code": "decrypt_failed", "reason": data.pop("reason", ""),
                                                 "message": data.pop("detail", "")})
    return data


def new_prekey_record(identity: Identity, device_id: str,
                      **extra: Any) -> tuple[dict[str, Any], ec.EllipticCurvePrivateKey]:
    """A fresh signed prekey (P2P or, with `group_id=...`, group) as the identity store keeps it."""
    key = pki.generate_key()
    timestamp = int(time.time())
    record = {"device_id": device_id, "spk_id": spk_id_for(key.public_key()),
              "private_pem": pki.private_key_pem(key).decode(), "spk_pk": pki.public_key_b64(key.public_key()),
              "timestamp": timestamp, "signature": sign_spk(identity.private_key, key.public_key(), timestamp),
              "created_at": time.time(), "uploaded_at": None, **extra}
    return record, key


async def append_prekey(append, aid: str, record: dict[str, Any]) -> None:
    """Append one record to a stored prekey list (durably, before the key is used or published)."""
    await trio.to_thread.run_sync(append, aid, record)


def prekey_wire(record: dict[str, Any]) -> dict[str, Any]:
    """The SPK fields of `message.v2.put_peer_pk` / `group.v2.put_group_pk` for a stored record."""
    return {"spk_id": record["spk_id"], "spk_pk": record["spk_pk"], "spk_signature": record["signature"],
            "spk_timestamp": record["timestamp"]}


class P2PKeys:
    """The P2P E2EE key state of one AID on this device: its prekeys (kept forever), past
    identity keys, the PKI-verified peer keys, encrypt for `message.send` and decrypt of rows."""

    def __init__(self, identity: Identity, store: IdentityStore, peers: PeerDirectory) -> None:
        self.identity = identity
        self.aid, self.device_id = identity.aid, identity.device_id
        self.store, self.peers = store, peers
        self._prekeys: list[dict[str, Any]] = []
        self._spk_private: dict[str, ec.EllipticCurvePrivateKey] = {}
        self._ik_fp = ik_fingerprint(identity.public_key)
        self.past_iks: list[ec.EllipticCurvePrivateKey] = []  # keys before a rekey (late messages)
        self.needs_rotation = False  # after a rekey: the next publish makes a prekey signed by the new key
        self.opened_with_past_key = 0  # envelopes opened with a key from before a rekey
        self._bootstrap: dict[str, tuple[float, list[Target]]] = {}
        self._prekey_lock = trio.Lock()
        self.rotations = 0

    # --- prekeys ----------------------------------------------------------------------------------
    def set_identity(self, identity: Identity, past_iks: list[ec.EllipticCurvePrivateKey]) -> None:
        """A renewed certificate or, after a rekey, a new key: new messages and prekeys use it,
        the past keys still open what was wrapped to them."""
        rekeyed = pki.spki_der(identity.public_key) != pki.spki_der(self.identity.public_key)
        self.identity = identity
        self._ik_fp = ik_fingerprint(identity.public_key)
        self.past_iks = list(past_iks)
        self.needs_rotation = self.needs_rotation or rekeyed  # the current prekey is signed by the old key

    def _decrypt(self, envelope: dict[str, Any], **kw: Any):
        """`decrypt_p2p` with the current identity key, then (a row wrapped before a rekey) each past one."""
        try:
            return decrypt_p2p(envelope, my_ik_private=self.identity.private_key, **kw)
        except E2EEDecryptError as exc:
            if exc.reason_code not in ("unwrap_failed", "spk_missing") or not self.past_iks:
                raise
            for ik in reversed(self.past_iks):
                try:
                    opened = decrypt_p2p(envelope, my_ik_private=ik, **kw)
                except E2EEDecryptError:
                    continue
                self.opened_with_past_key += 1
                log.info("e2ee.opened_with_past_key", aid=self.aid, ik=ik_fingerprint(ik.public_key()))
                return opened
            raise

    async def load(self) -> None:
        self.past_iks = await trio.to_thread.run_sync(self.store.past_keys, self.aid)
        records = await trio.to_thread.run_sync(self.store.load_prekeys, self.aid)
        self._prekeys = [r for r in records if r.get("device_id") == self.device_id]
        for r in self._prekeys:
            self._spk_private[r["spk_id"]] = pki.load_private_key_pem(r["private_pem"].encode())
        if self._prekeys:  # a rekey since the current prekey was made: it needs one the new key signs
            last = self._prekeys[-1]
            self.needs_rotation = not verify_spk(self.identity.public_key, last["spk_pk"], last["spk_id"],
                                                     last["signature"], last["timestamp"])

    async def _new_prekey(self) -> dict[str, Any]:
        record, key = new_prekey_record(self.identity, self.device_id)
        await append_prekey(self.store.append_prekey, self.aid, record)  # saved before use
        self._prekeys.append(record)
        self._spk_private[record["spk_id"]] = key
        return record

    @property
    def current_spk_id(self) -> str:
        return self._prekeys[-1]["spk_id"] if self._prekeys else ""

    async def publish_prekey(self, link: Link, *, rotate: bool = False) -> str:
        """Make a prekey if there is none (or `rotate`), and publish the current one."""
        async with self._prekey_lock:  # the local part only: never held across a gateway call
            rotate = rotate or self.needs_rotation
            if rotate or not self._prekeys:
                await self._new_prekey()
                self.needs_rotation = False
            record = self._prekeys[-1]
        if rotate:
            self.rotations += 1
            log.info("e2ee.prekey_rotated", aid=self.aid, spk_id=record["spk_id"])
            if not link.session_open:
                # The link is down: the next connect publishes the newest prekey before it is ready.
                # (Waiting here for readiness would wait on that very connect.)
                return record["spk_id"]
        await link.call("message.v2.put_peer_pk", {
            "peer_aid": self.aid, "key_source": "peer_device_prekey", **prekey_wire(record)}, background=True)
        return record["spk_id"]

    def _spk_lookup(self, spk_id: str) -> ec.EllipticCurvePrivateKey | None:
        if spk_id == self._ik_fp:
            return self.identity.private_key
        return self._spk_private.get(spk_id)

    # --- peer keys ---------------------------------------------------------------------------------
    def invalidate(self, peer_aid: str) -> None:
        """Forget the cached bootstrap (devices and prekeys) of a peer: the next send refetches."""
        self._bootstrap.pop(peer_aid.strip().lower(), None)

    async def peer_ik(self, gateway_url: str, aid: str, fingerprint: str = "") -> ec.EllipticCurvePublicKey:
        """The PKI-verified identity key of `aid` (the cert `fingerprint` names, else its current one),
        from the peer's own gateway (`gateway_url` is the link's, used for our own issuer)."""
        cert = await self.peers.certificate(aid, home_gateway=gateway_url, home_aid=self.aid, fingerprint=fingerprint)
        key = cert.public_key()
        if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, ec.SECP256R1):
            raise E2EEError(f"the certificate of {aid} does not hold a P-256 identity key",
                            data={"reason": "sender_key_unavailable", "peer": aid})
        return key

    async def _targets(self, link: Link, peer: str) -> list[Target]:
        cached = self._bootstrap.get(peer)
        if cached is not None and cached[0] > time.monotonic():
            return cached[1]
        boot = await link.call("message.v2.bootstrap", {"peer_aid": peer, "e2ee_wrap_capabilities": WRAP_CAPABILITIES})
        policy = boot.get("e2ee_wrap_policy") if isinstance(boot.get("e2ee_wrap_policy"), dict) else {}
        only_1dh = policy.get("protocol") == "1DH" or policy.get("scope") == "aid"
        targets: list[Target] = []
        for role, owner, devices in (("peer", peer, boot.get("peer_devices")),
                                     ("self_sync", self.aid, boot.get("self_devices"))):
            if not isinstance(devices, list):
                continue
            ik = await self.peer_ik(link.gateway, owner) if devices else None
            for dev in devices:
                target = self._verified_target(role, owner, ik, dev, only_1dh)
                if target is not None and not (role == "self_sync" and target.device_id == self.device_id):
                    targets.append(target)
        if not any(t.role == "peer" for t in targets):
            raise E2EEError(f"no devices found for {peer}: it has not published a prekey yet",
                            data={"reason": "no_devices", "peer": peer})
        self._bootstrap[peer] = (time.monotonic() + BOOTSTRAP_TTL, targets)
        return targets

    def _verified_target(self, role: str, owner: str, ik: ec.EllipticCurvePublicKey, dev: Any,
                         only_1dh: bool) -> Target | None:
        if not isinstance(dev, dict) or not isinstance(dev.get("device_id"), str):
            return None
        ik_pk = dev.get("ik_pk")
        if ik_pk is not None and ik_pk != pki.public_key_b64(ik):
            raise E2EEError(f"bootstrap for {owner} carries an identity key that is not its certified one",
                            data={"reason": "ik_mismatch", "peer": owner})
        spk_pk, spk_id = dev.get("spk_pk"), dev.get("spk_id") or ""
        if only_1dh or not isinstance(spk_pk, str) or not spk_id:
            return Target(owner, dev["device_id"], role, "aid_master", ik)
        if spk_pk == pki.public_key_b64(ik):  # the identity key doubles as the prekey
            return Target(owner, dev["device_id"], role, "peer_device_prekey", ik, ik, spk_id)
        if not verify_spk(ik, spk_pk, spk_id, dev.get("spk_signature"), dev.get("spk_timestamp")):
            raise E2EEError(f"prekey of {owner}/{dev['device_id']} has a bad signature",
                            data={"reason": "bad_spk_signature", "peer": owner})
        return Target(owner, dev["device_id"], role, str(dev.get("key_source") or "peer_device_prekey"), ik,
                      pki.load_public_key_b64(spk_pk), spk_id)

    # --- send ------------------------------------------------------------------------------------
    async def send(self, link: Link, params: dict[str, Any], headers: dict[str, str] | None, *,
                   timeout: float | None = None) -> dict[str, Any]:
        """`message.send` as the SDK does it: E2EE unless `encrypt` is false."""
        if not isinstance(params.get("to"), str) or not isinstance(params.get("payload"), dict):
            raise InvalidParams("message.send needs `to` (an AID) and `payload` (an object)")
        out = {k: v for k, v in params.items() if k not in ("encrypt", "protected_headers", "headers")}
        out["to"] = params["to"].strip().lower()
        out.setdefault("message_id", "m-" + uuid.uuid4().hex)
        if params.get("encrypt", True) is False:
            return await link.call("message.send", out, timeout=timeout)
        return await self._sealed_call(link, "message.send", out, params, merged_headers(headers, params), out["message_id"],
                                       None, timeout)

    async def thought_put(self, link: Link, params: dict[str, Any], headers: dict[str, str] | None, *,
                          timeout: float | None = None) -> dict[str, Any]:
        """`message.thought.put` as the SDK does it: always E2EE, the envelope's message id is the
        thought id and the context is MAC-bound into it (`encrypt: false` is refused)."""
        context = params.get("context")
        if (not isinstance(params.get("to"), str) or not isinstance(params.get("payload"), dict)
                or not isinstance(context, dict) or not all(isinstance(context.get(k), str) and context[k].strip()
                                                            for k in ("type", "id"))):
            raise InvalidParams("message.thought.put needs `to` (an AID), `context` {type, id} and `payload` (an object)")
        if params.get("encrypt", True) is False:
            raise InvalidParams("message.thought.put is always end-to-end encrypted (encrypt: false is refused)")
        thought_id = str(params.get("thought_id") or f"mt-{uuid.uuid4()}").strip()
        timestamp = params.get("timestamp") if isinstance(params.get("timestamp"), int) else int(time.time() * 1000)
        out = {"to": params["to"].strip().lower(), "encrypted": True, "thought_id": thought_id,
               "timestamp": timestamp, "context": context}
        return await self._sealed_call(link, "message.thought.put", out, params, merged_headers(headers, params), thought_id,
                                       context, timeout, timestamp)

    async def _sealed_call(self, link: Link, method: str, out: dict[str, Any], params: dict[str, Any],
                           headers: dict[str, Any], message_id: str, context: dict[str, Any] | None,
                           timeout: float | None, timestamp: int | None = None) -> dict[str, Any]:
        """Encrypt `params["payload"]` to every device of `out["to"]` (and our other devices), send it
        as `out["payload"]`; on the gateway's prekey errors refetch the devices once and retry."""
        for attempt in (0, 1):
            targets = await self._targets(link, out["to"])
            try:
                envelope = encrypt_p2p(
                    sender_aid=self.aid, sender_device_id=self.device_id, sender_ik_private=self.identity.private_key,
                    targets=targets, payload=params["payload"], message_id=message_id,
                    timestamp_ms=timestamp or int(time.time() * 1000), protected_headers=headers or None,
                    context=context, to_aid=out["to"], need_render=bool(params.get("need_render", True)))
            except E2EEEncryptError as exc:
                raise InvalidParams(f"cannot encrypt: {exc}", data={"reason": exc.reason_code}) from None
            try:
                return await link.call(method, dict(out, payload=envelope), timeout=timeout)
            except GatewayError as exc:
                if attempt == 0 and exc.remote_code in PREKEY_RETRY_CODES:
                    self.invalidate(out["to"])
                    continue
                raise
        raise AssertionError("unreachable")  # pragma: no cover

    async def decrypt_thoughts(self, gateway_url: str, result: dict[str, Any]) -> dict[str, Any]:
        """Open the envelopes of a `message.thought.get` result in place: each thought gets its
        `payload` (and `protected_headers`, `encrypted: true`), or `payload: None` and a
        `decrypt_error` reason; ciphertext is never handed on as if it were the payload."""
        thoughts = result.get("thoughts") if isinstance(result.get("thoughts"), list) else []
        sender = str(result.get("sender_aid") or "").lower()
        peer = str(result.get("peer_aid") or self.aid).lower()
        for thought in thoughts:
            if not isinstance(thought, dict):
                continue
            author = str(thought.get("from") or thought.get("sender_aid") or sender).lower()
            envelope = thought.get("payload")
            if not isinstance(envelope, dict) or envelope.get("type") not in ENCRYPTED_TYPES:
                thought.update(encrypted=False)  # a plaintext thought (another client's): said so
                continue
            try:
                if envelope.get("type") != p2p.ENVELOPE_TYPE:
                    raise E2EEDecryptError("unsupported_envelope", f"{envelope.get('type')} in a P2P thought")
                ik = await self.peer_ik(gateway_url, author, str(envelope.get("sender_cert_fingerprint") or ""))
                opened = self._decrypt(envelope, my_aid=self.aid, my_device_id=self.device_id,
                                       spk_lookup=self._spk_lookup, sender_ik_public=ik, expected_from=author,
                                       expected_to=peer if author != self.aid else None,
                                       expected_message_id=str(thought.get("thought_id") or "") or None)
            except (E2EEDecryptError, AundError) as exc:
                reason = getattr(exc, "reason_code", None) or getattr(exc, "data", {}).get("reason", "decrypt_failed")
                thought.update(payload=None, encrypted=True, decrypt_error=reason)
                continue
            thought.update(payload=opened.payload, encrypted=True, protected_headers=opened.protected_headers)
        return result

    async def history(self, link: Link, params: dict[str, Any], *, timeout: float | None = None) -> dict[str, Any]:
        """`message.history` as the SDK reads it: one read-only page of what `sender_aid` sent us
        before `before_seq`, each row decrypted as a received message is (`decode_row`); a row
        that does not open comes back with `payload: None` and a `history_error`, never as
        ciphertext. Moves no cursor and writes nothing to the inbox."""
        sender = params.get("sender_aid")
        if not isinstance(sender, str) or not sender.strip():
            raise InvalidParams("message.history needs sender_aid (the peer whose messages to read)",
                                data={"arg": "sender_aid"})
        sender = sender.strip().lower()
        before, limit = history_window(params, P2P_HISTORY_LIMIT)
        request = {"cursor_scope": "peer", "sender_aid": sender, "before_seq": before, "limit": limit,
                   "device_id": self.device_id, "slot_id": link.config.slot_id}
        result = await link.call("message.history", request, timeout=timeout)
        if result.get("cursor_scope", "peer") != "peer" or str(result.get("sender_aid") or sender).lower() != sender:
            raise GatewayError("message.history: the gateway answered for another peer", retryable=False)
        rows = history_rows(result, before, sender_of=lambda row: str(
            row.get("from_aid") or row.get("sender_aid") or row.get("from") or "").lower(), expected_sender=sender)
        out = []
        for row in rows:
            event, _ = await self.decode_row(link.gateway, row, sender)
            out.append(history_entry(event))
        return dict(result, messages=out)

    # --- receive ---------------------------------------------------------------------------------
    async def decode_row(self, gateway_url: str, row: dict[str, Any], sender: str) -> tuple[NewEvent, str]:
        """(inbox event, spk_id used or "") for one gateway row; never raises for a bad message."""
        seq, message_id = row.get("seq"), str(row.get("message_id") or "")
        base = {"from": sender, "to": self.aid, "seq": seq, "message_id": message_id,
                "timestamp": row.get("t_server") or row.get("timestamp"), "need_render": row.get("need_render", True),
                "sender_device_id": row.get("sender_device_id", "")}
        kind, envelope = row_content(row, p2p.ENVELOPE_TYPE)
        if kind in ("malformed", "unsupported"):
            return self._undecryptable(base, sender, seq, f"{kind}_envelope", envelope), ""
        if kind == "plain":
            if isinstance(envelope, dict) and envelope.get("type") == "message.recalled":
                # a recall tombstone in the stream: the same durable event as its push (one row)
                recall = events.durable_event(self.aid, "message.recalled", dict(
                    envelope, message_id=message_id, tombstone_message_id=message_id, seq=seq,
                    timestamp=base["timestamp"], to=self.aid, **{"from": sender}))
                if recall is not None:
                    return recall, ""
            data = dict(base, payload=envelope, encrypted=False, protected_headers={})
            return NewEvent("message.received", sender, message_id, seq, data), ""
        try:
            ik = await self.peer_ik(gateway_url, sender, str(envelope.get("sender_cert_fingerprint") or ""))
            result = self._decrypt(envelope, my_aid=self.aid, my_device_id=self.device_id,
                                   spk_lookup=self._spk_lookup, sender_ik_public=ik, expected_from=sender,
                                   expected_to=self.aid, expected_message_id=message_id or None)
        except E2EEDecryptError as exc:
            return self._undecryptable(base, sender, seq, exc.reason_code, exc.message), ""
        except AundError as exc:
            reason = exc.data.get("reason", "sender_key_unavailable")
            return self._undecryptable(base, sender, seq, reason, str(exc)), ""
        data = dict(base, payload=result.payload, encrypted=True, protected_headers=result.protected_headers,
                    headers_verified=True, context=result.context)
        return NewEvent("message.received", sender, message_id, seq, data), result.spk_id_used or ""

    def _undecryptable(self, base: dict[str, Any], sender: str, seq: Any, reason: str, detail: str) -> NewEvent:
        log.warning("e2ee.undecryptable", aid=self.aid, sender=sender, seq=seq, reason=reason, detail=detail[:200])
        data = dict(base, reason=reason, detail=detail[:500], encrypted=True)
        return NewEvent("message.undecryptable", sender, str(base.get("message_id") or ""),
                        seq if isinstance(seq, int) else 0, data)


class LinkSync:
    """What every inbound sync of one link knows: its link, inbox, cursor identity, poll period and
    the row limit of its pages (`pages`, learnt from 1009s for as long as the link lives)."""

    page_rows = PAGE_LIMIT

    def __init__(self, link: Link, inbox: Inbox, poll_seconds: float) -> None:
        self.link, self.inbox = link, inbox
        self.poll_seconds = poll_seconds
        self.aid = link.aid
        self.device_id = link.config.device_id
        self.slot_id = link.config.slot_id
        self.slot_key = ids.slot_isolation_key(self.slot_id)
        self.pages = PageSizer(self.page_rows, self.aid)

    async def drive_push(self, core: SyncCore, actions: list, step) -> None:
        """Count what a push led to (a duplicate, an inline row committed, a gap or a row-less push
        pulled), then drive it."""
        first = actions[0] if actions else None
        if isinstance(first, Drop) and first.reason == "duplicate":
            self.stats["duplicates"] += 1
        elif isinstance(first, Commit):
            self.stats["inline"] += 1
        elif isinstance(first, Pull):
            self.stats["gaps"] += 1
        await self.drive(core, actions, step)

    async def drive(self, core: SyncCore, actions: list, step) -> None:
        """Do what `core` asks, one action at a time (`step(action)` does the I/O and returns what the
        core answers to its outcome), until it asks nothing more. A step that fails ends what was in
        flight for its key in the core (that pull or that commit only: another task may have the
        key's next step in flight), and the failure goes on to the caller."""
        queue = list(actions)
        while queue:
            action = queue.pop(0)
            try:
                queue.extend(await step(action))
            except BaseException:
                if isinstance(action, Pull):
                    core.pull_failed(action.key, action.after)
                elif isinstance(action, (Commit, Skip)):
                    core.commit_failed(action.key, action.new_cursor)
                raise


# P2P messages per sender: sparse seqs (one seq space per receiver), every page proven (coverage.py)
PEER_STREAM = Stream("p2p", page_rows=PAGE_LIMIT, sparse=True)


class PeerSync(LinkSync):
    """Lossless inbound sync for one link: pushes and pulls, committed before acked."""

    def __init__(self, link: Link, session: P2PKeys, inbox: Inbox, on_notice=None, *,
                 poll_seconds: float = 30.0) -> None:
        super().__init__(link, inbox, poll_seconds)
        self.session = session
        # the cursor per sender: inbox ack, head named, the seq of its next row as last heard
        self.senders = SyncCore(PEER_STREAM, limit=lambda _sender, left: self.pages.rows(left))
        self._rotate = False  # a committed row used our current prekey: replaced once the ack is out
        self._send, self._recv = trio.open_memory_channel[tuple[str, Any]](PUSH_QUEUE)
        self._resync_needed = False
        self.on_notice = on_notice  # (aid, kind, data) for app-visible sync notices
        self.on_volatile = None  # (row) for a volatile row found in a pull page (never stored here)
        self.stats = {"pushes": 0, "inline": 0, "gaps": 0, "pulls": 0, "pages_rejected": 0, "committed": 0,
                      "duplicates": 0, "undecryptable": 0, "failures": 0, "reacks": 0, "skipped": 0}

    # called by the link's reader: never blocks
    def on_event(self, name: str, params: dict[str, Any]) -> None:
        if name not in ("peer.v2.message_received", "message.received"):
            return
        if not isinstance(params, dict) or params.get("kind") == "message.online_unread_hint":
            self._queue(("resync", None))
            return
        self._queue(("push", params))

    def _queue(self, item: tuple[str, Any]) -> None:
        try:
            self._send.send_nowait(item)
        except trio.WouldBlock:
            self._resync_needed = True  # the queue overflowed: a full pull catches up on what was dropped

    def request_resync(self) -> None:
        self._queue(("resync", None))

    async def run(self) -> None:
        """Process pushes and resync requests one at a time, forever. A failed round (gateway gone,
        storage full) is retried with backoff; and every `poll_seconds` of quiet a `message.peers`
        check catches a last push the gateway dropped (no later push would reveal that gap)."""
        retry = 0.0
        while True:
            timeout = retry if retry else self.poll_seconds
            with trio.move_on_after(timeout) as quiet:
                kind, params = await self._recv.receive()
            if quiet.cancelled_caught:
                kind, params = "resync", None
                if not self.link.is_ready:
                    await wait_ready_or_forever(self.link)  # the connect's own resync catches up
                    continue
            try:
                if self._resync_needed or kind == "resync":
                    self._resync_needed = False
                    await self.full_sync()
                else:
                    await self._on_push(params)
                retry = 0.0
            except AundError as exc:
                retry = min(max(retry * 2, 0.5), 30.0)
                self._resync_needed = True
                self.stats["failures"] += 1
                log.warning("sync.failed", aid=self.aid, error=str(exc), retry_in=retry)

    @property
    def _acks(self) -> dict[str, int]:
        """The inbox's cursor per sender, as far as read."""
        return {sender: self.senders.ack(sender) for sender in self.senders.known() if self.senders.loaded(sender)}

    async def _ack_of(self, sender: str) -> int:
        if not self.senders.loaded(sender):
            self.senders.load(sender, await self.inbox.peer_ack(self.aid, self.device_id, self.slot_key, sender))
        return self.senders.ack(sender)

    async def _on_push(self, params: dict[str, Any]) -> None:
        self.stats["pushes"] += 1
        sender = str(params.get("from_aid") or params.get("sender_aid") or params.get("from") or "").lower()
        seq, prev = params.get("seq"), params.get("prev_peer_seq")
        if not sender or not isinstance(seq, int) or isinstance(seq, bool):
            return
        local = await self._ack_of(sender)
        row = params.get("inline_message")
        if not (isinstance(row, dict) and isinstance(prev, int) and prev == local and row.get("seq") == seq
                and str(row.get("from_aid") or row.get("sender_aid") or row.get("from") or "").lower() == sender):
            row = None
        self.senders.head_seen(sender, seq, exact=True)  # a gap is pulled up to this push
        actions = self.senders.pushed(sender, seq, row, prev if isinstance(prev, int) else None)
        await self.drive_push(self.senders, actions, self._step)

    async def _commit_rows(self, sender: str, rows: list[dict[str, Any]], covered: int) -> None:
        events = []
        for row in rows:
            event, spk_used = await self.session.decode_row(self.link.gateway, row, sender)
            events.append(event)
            if event.kind == "message.undecryptable":
                self.stats["undecryptable"] += 1
            if spk_used and spk_used == self.session.current_spk_id:
                self._rotate = True
        new = await self.inbox.commit(self.aid, events, ack=(self.device_id, self.slot_key, sender, covered))
        self.stats["committed"] += len(new)
        self.stats["duplicates"] += len(events) - len(new)

    async def sync_sender(self, sender: str, head: int | None = None) -> None:
        """Pull everything from `sender` after what the inbox holds, page by page (at most `head`
        minus the cursor rows per page, when the head is known)."""
        self.senders.head_seen(sender, head, exact=True)
        await self._ack_of(sender)
        await self.drive(self.senders, self.senders.sync(sender), self._step)

    async def _step(self, action) -> list:
        sender = action.key
        if isinstance(action, Pull):
            return await self._pull(sender, action.after, action.limit)
        if isinstance(action, Commit):
            await self._commit_rows(sender, list(action.rows), action.new_cursor)
            return self.senders.committed(sender, action.new_cursor)
        if isinstance(action, AckUpstream):
            # committed: now tell the gateway (a lost ack only means the rows come again, deduplicated,
            # and the next full sync repeats it)
            await self._ack_upstream(sender, action.up_to)
            if self._rotate:
                self._rotate = False
                await self.session.publish_prekey(self.link, rotate=True)
        if isinstance(action, Skip):
            return await self._skip_row(action)
        return []

    async def _pull(self, sender: str, after: int, limit: int) -> list:
        namespace = f"p2p.peer.v1/{sender}"
        params = {"cursor_scope": "peer", "sender_aid": sender, "after_seq": after, "limit": limit,
                  "device_id": self.device_id, "slot_id": self.slot_id}
        key = f"{namespace}|forward|{after}|limit={limit}"
        try:
            page = await self.link.pull(namespace, key, "message.v2.pull", params, background=True)
        except AundError as exc:
            if self.pages.too_big(exc, namespace, after, limit):
                await self.drive(self.senders, self.senders.too_big(sender, after), self._step)
            raise
        self.pages.fitted(namespace, limit)
        self.stats["pulls"] += 1
        try:
            verify_peer_page(params, page, local_ack=after)
        except CoverageProofError as exc:
            self.stats["pages_rejected"] += 1
            log.error("sync.proof_rejected", aid=self.aid, sender=sender, reason=exc.reason, detail=str(exc))
            if self.on_notice is not None:
                self.on_notice(self.aid, "sync.proof_rejected", {"sender": sender, "reason": exc.reason})
            return self.senders.pull_failed(sender, after)  # not trusted, not acked; the next push or connect tries again
        # volatile rows (a pull page may mix them in) are never stored: handed on, delivered live
        rows, volatile = {}, False
        for row in page["messages"]:
            if isinstance(row, dict) and row.get("storage") == "volatile":
                volatile = True
                if self.on_volatile is not None:
                    self.on_volatile(row)
            else:
                rows[row["seq"]] = row
        return self.senders.page(sender, after, rows, page["covered_through_seq"], page["has_more"],
                                 head=page["head_seq"], unstored=volatile)

    async def _skip_row(self, skip: Skip) -> list:
        """Move past the row after the cursor that fits in no page, recording it for apps. Its seq is
        the `next_pending_seq` the gateway last named for that cursor (seqs are sparse per sender),
        else the cursor + 1 (a hole skipped so costs another round). Acked upstream by the next
        `full_sync` (the link is down now: it closed with 1009)."""
        sender, seq = skip.key, skip.seq
        event = skipped_row(aid=self.aid, sender=sender, seq=seq, after=skip.after,
                            max_frame=self.link.config.max_frame, dedupe_key=f"skipped:{seq}")
        await self.inbox.commit(self.aid, [event], ack=(self.device_id, self.slot_key, sender, skip.new_cursor))
        self.stats["skipped"] += 1
        return self.senders.skipped(sender, skip.new_cursor)

    async def _ack_upstream(self, sender: str, up_to: int) -> None:
        try:
            await self.link.call("message.v2.ack", {"up_to_seq": up_to, "cursor_scope": "peer", "sender_aid": sender,
                                                    "device_id": self.device_id, "slot_id": self.slot_id},
                                 background=True)
            self.senders.acked_upstream(sender, up_to)
        except AundError as exc:
            log.info("sync.ack_deferred", aid=self.aid, sender=sender, error=str(exc))

    async def full_sync(self) -> None:
        """Catch up with every sender the gateway lists as pending; and where the gateway's cursor
        lags what the inbox already holds (an ack lost to a crash or a failure), ack again."""
        result = await self.link.call("message.peers", {"filter": "pending"}, background=True)
        for peer in result.get("peers") or []:
            sender = peer.get("sender_aid") if isinstance(peer, dict) else None
            if isinstance(sender, str) and isinstance(peer.get("head_seq"), int):
                local = await self._ack_of(sender)
                pending = peer.get("next_pending_seq")
                if peer.get("server_ack_seq") == local and isinstance(pending, int) and pending > local:
                    self.senders.hint(sender, local, pending)
                if peer["head_seq"] > local or peer.get("volatile_has_more") is True:  # volatile rows: not stored
                    await self.sync_sender(sender, peer["head_seq"] if peer["head_seq"] > local else None)
                server_ack = peer.get("server_ack_seq")
                if isinstance(server_ack, int):
                    again = self.senders.reack(sender, server_ack)
                    self.stats["reacks"] += len(again)
                    await self.drive(self.senders, again, self._step)
