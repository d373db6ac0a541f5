"""AUN layer: E2EE v2 groups for one AID on this device, and group sync for one link
(docs/groups.md).

`GroupKeys` (one per AID, beside its `P2PKeys`, whose identity key, P2P prekeys and
PKI-verified peer keys it reuses): group prekeys (`group.v2.put_group_pk`, one per group, kept
in the identity store and never deleted, rotated when a message wrapped to the current one is
read or the membership changes), a bootstrap cache per group (dropped on `group.changed` and
`group.v2.state_confirmed`), verification of the signed membership state before any send (5.2:
the proposer's signature, the commitment, no rollback, and no wrap target the signed state does
not name), `send()` for `group.send` (E2EE by default: `group.v2.send`; protected headers sealed
into the envelope), `thought_put()` / `decrypt_thoughts()`, the owner/admin proposal flow (5.4)
and `decode_row()` (decrypt with every check, or a `message.undecryptable` event).

`GroupSync` (one per link): inline `event/group.v2.message_created` pushes, `group.v2.pull`
pages through the link's pull gate (namespace `group:{gid}`, sized by the link's `PageSizer`, see
aund.aun.paging: a row that fits in no page becomes `message.undecryptable` `too_large`), `group.changed` ->
`group.pull_events` (namespace `group-events:{gid}`). Rows and events are committed to the inbox
together with the new cursor in one transaction, and only then acked upstream (`group.v2.ack`,
`group.ack_events`). Group cursors live in the inbox's `peer_acks` table under the pseudo senders
`group:{gid}` and `group-events:{gid}`.
"""
from __future__ import annotations

import functools
import json
import time
import uuid
from dataclasses import dataclass
from typing import Any

import structlog
import trio

from aund.aun.e2ee import E2EEDecryptError, E2EEEncryptError, Target
from aund.aun.e2ee.group import (GROUP_ENVELOPE_TYPE, decrypt_group, encrypt_group, snapshot_json, state_commitment,
                                 state_sign_input)
from aund.aun import codes, methods
from aund.aun import group_index as gindex
from aund.aun.group_identity import NEEDS_CARD, NEEDS_CERT, GroupIdentities
from aund.aun.link import Link, wait_ready_or_forever
from aund.aun.messaging import (BOOTSTRAP_TTL, PREKEY_RETRY_CODES, PUSH_QUEUE, WRAP_CAPABILITIES, P2PKeys,
                                LinkSync, append_prekey, history_entry, history_rows, history_window, merged_headers,
                                new_prekey_record, prekey_wire, row_content)
from aund.aun.paging import skipped_row
from aund.errors import AundError, E2EEError, GatewayError, InvalidParams
from aund.identity import pki
from aund.inbox import Inbox, NewEvent
from aund.sync import AckUpstream, Commit, Pull, Skip, Stream, SyncCore

log = structlog.get_logger("aund.groups")

#: Gateway events GroupSync consumes (names without the `event/` prefix).
GROUP_EVENTS = frozenset({"group.v2.message_created", "group.message_created", "group.changed",
                          "group.v2.state_confirmed", "group.v2.state_proposed", "group.v2.state_retry_needed"})
#: Inbox event kinds this module writes (besides `message.undecryptable`).
GROUP_MESSAGE_KIND = "group.message.received"
GROUP_CHANGED_KIND = "group.changed"

JOIN_ACTIONS = frozenset({"member_added", "joined", "join_approved", "invite_code_used"})
LEAVE_ACTIONS = frozenset({"member_removed", "member_left"})
MEMBERSHIP_ACTIONS = JOIN_ACTIONS | LEAVE_ACTIONS | {"role_changed", "owner_transferred"}
DISSOLVED = "dissolved"
TRANSFER_PENDING = "owner_transfer_rekey_pending"
GROUP_STATE_INVALID = codes.GROUP_STATE_INVALID  # the gateway's code for a group that is not active
PROPOSE_ACTIONS = MEMBERSHIP_ACTIONS | {"upsert", "member_banned"}  # a ban demotes a banned admin
NO_TARGETS = codes.NO_TARGETS  # local: the bootstrap named no device to wrap for (the SDK's code)
STATE_CONFLICT = codes.STATE_CONFLICT
ADMIN_ROLES = ("owner", "admin")
PAGE_LIMIT = 100
EVENTS_LIMIT = 50
EVENT_STREAM = Stream("group-events", page_rows=EVENTS_LIMIT)  # a refusal ends the round, stops nothing
# group messages: seqs with holes (rows for other devices) and our own sends; a page goes on while it
# brings rows and the head is ahead; a refusal stops the group until readmitted or reconnected (9.3)
MESSAGE_STREAM = Stream("group", page_rows=PAGE_LIMIT, rows_to_continue=True, head_continues=True,
                        block_on_refusal=True)
HISTORY_LIMIT = 50  # group.history page size cap (the SDK's)
MEMBERS_PAGE = 200
_THOUGHT_RETRY_WORDS = ("member", "device", "recipient", "stale", "epoch")
#: what a refusal's message says when its code does not tell (the SDK's list)
REFUSAL_TEXTS = ("banned members", "blocked members", "member is banned", "member is blocked", "group is not active",
                 "group is dissolved", "group is suspended", "group not found", "member not found", "not a member")
#: ... and what makes even a refusal's code a passing fault (the gateway's RPC timeout is -32004 too)
TRANSIENT_TEXTS = ("timeout", "deadline exceeded", "gateway service degraded")
#: a group's states in which it still has messages to sync (a suspended group's owner and admins speak)
SYNCED_STATES = ("active", "suspended")
BLOCKED, UNBLOCKED = "member_blocked", "member_unblocked"
JOINING_CALLS = ("group.create", "group.use_invite_code")  # after these this device publishes its group prekey


def group_id_of(params: dict[str, Any] | None) -> str:
    """The group id an RPC or event names (`group_id`, else `group_aid`), stripped and lower-case."""
    if not isinstance(params, dict):
        return ""
    value = params.get("group_id") or params.get("group_aid")
    return value.strip().lower() if isinstance(value, str) else ""


def _require_gid(params: dict[str, Any]) -> str:
    gid = group_id_of(params)
    if not gid or "." not in gid:
        raise InvalidParams("group_id must be a full group id (base.issuer)")
    return gid


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _remote_code(exc: AundError) -> int | None:
    return _int(exc.data.get("remote_code"))


def _is_refusal(exc: AundError) -> bool:
    """A refusal that ends background pulls of a group until re-admission or reconnect (9.3)."""
    code = _remote_code(exc)
    text = str(exc).lower()
    if any(words in text for words in TRANSIENT_TEXTS):
        return False
    if code == codes.AGENT_MD_REQUIRED and (NEEDS_CERT in text or NEEDS_CARD in text):
        return False  # the group's owner has yet to publish (e.g. just after a transfer): try again later
    if code in (codes.UNAUTHORIZED, codes.AGENT_MD_REQUIRED, codes.FORBIDDEN, codes.INVALID_REQUEST,
                codes.METHOD_NOT_FOUND, codes.INVALID_PARAMS) or code in codes.GROUP_REFUSALS:
        return True
    return any(words in text for words in REFUSAL_TEXTS)


@dataclass(frozen=True)
class Bootstrap:
    """What a verified `group.v2.bootstrap` lets us encrypt to."""

    epoch: int
    targets: list[Target]
    commitment: dict[str, Any]
    member_aids: frozenset[str]
    pending_adds: tuple[str, ...]


class _NoTargets(Exception):
    pass


class GroupKeys:
    """Group E2EE for one AID on this device (shares keys and peer keys with its P2PKeys)."""

    def __init__(self, e2ee: P2PKeys) -> None:
        self.e2ee = e2ee
        self.identity = e2ee.identity
        self.aid, self.device_id = e2ee.aid, e2ee.device_id
        self.store = e2ee.store
        self._current: dict[str, dict[str, Any]] = {}   # gid -> newest group prekey of this device
        self._private: dict[str, Any] = {}               # spk_id -> private key (every group, never dropped)
        self._boot: dict[str, tuple[float, Bootstrap]] = {}
        self._state_seen: dict[str, int] = {}            # gid -> highest signed state version verified
        self._key_lock = trio.Lock()
        self._propose_locks: dict[str, trio.Lock] = {}
        self.dissolved: set[str] = set()                 # groups seen dissolved (memory: the gateway refuses too)
        self.stats = {"bootstraps": 0, "prekeys_put": 0, "rotations": 0, "proposals": 0, "confirmed_pending": 0,
                      "send_retries": 0}

    @functools.cached_property
    def identities(self) -> GroupIdentities:
        """The group AIDs this AID owns (their keys in the identity store's `AIDs/_groups/`)."""
        return GroupIdentities(self.store, self.identity)

    # --- group prekeys ------------------------------------------------------------------------------
    async def load(self) -> None:
        records = await trio.to_thread.run_sync(self.store.load_group_prekeys, self.aid)
        for record in records:
            if record.get("device_id") == self.device_id and isinstance(record.get("group_id"), str):
                self._private[record["spk_id"]] = pki.load_private_key_pem(record["private_pem"].encode())
                self._current[record["group_id"]] = record  # stored oldest first: the last one wins

    def current_spk_id(self, gid: str) -> str:
        record = self._current.get(gid)
        return record["spk_id"] if record else ""

    def spk_lookup(self, spk_id: str):
        """Group prekeys first, then the device's P2P prekeys (and the IK alias), as the SDK looks up."""
        key = self._private.get(spk_id)
        return key if key is not None else self.e2ee._spk_lookup(spk_id)

    async def register(self, link: Link, gid: str, *, rotate: bool = False) -> str:
        """Make a group prekey if there is none (or `rotate`), then publish the current one."""
        async with self._key_lock:
            record = self._current.get(gid)
            if rotate or record is None:
                record, key = new_prekey_record(self.identity, self.device_id, group_id=gid)
                await append_prekey(self.store.append_group_prekey, self.aid, record)
                self._private[record["spk_id"]] = key
                self._current[gid] = record
        await link.call("group.v2.put_group_pk", {"group_id": gid, "key_source": "group_device_prekey",
                                                  **prekey_wire(record)}, background=True)
        self.stats["prekeys_put"] += 1
        if rotate:
            self.stats["rotations"] += 1
            log.info("groups.prekey_rotated", aid=self.aid, group_id=gid, spk_id=record["spk_id"])
        return record["spk_id"]

    # --- bootstrap and the signed state ---------------------------------------------------------------
    def invalidate(self, gid: str) -> None:
        """Forget the cached wrap set of a group: the next send bootstraps again."""
        self._boot.pop(gid, None)

    async def bootstrap(self, link: Link, gid: str, *, fresh: bool = False) -> Bootstrap:
        cached = self._boot.get(gid)
        if not fresh and cached is not None and cached[0] > time.monotonic():
            return cached[1]
        boot = await link.call("group.v2.bootstrap", {"group_id": gid, "e2ee_wrap_capabilities": WRAP_CAPABILITIES})
        self.stats["bootstraps"] += 1
        commitment = await self.verify_state(link.gateway, gid, boot)
        epoch = _int(boot.get("epoch"))
        if epoch is None:
            raise E2EEError(f"bootstrap of {gid} has no integer epoch", data={"reason": "malformed_bootstrap"})
        policy = boot.get("e2ee_wrap_policy") if isinstance(boot.get("e2ee_wrap_policy"), dict) else {}
        only_1dh = policy.get("protocol") == "1DH" or policy.get("scope") == "aid"
        targets: list[Target] = []
        for role, devices in (("member", boot.get("devices")), ("audit", boot.get("audit_recipients"))):
            targets += await self._targets(link.gateway, role, devices if isinstance(devices, list) else [], only_1dh)
        if policy.get("scope") == "aid":  # one wrap per AID, valid on every device
            per_aid = {(t.aid, t.role): Target(t.aid, "", t.role, "aid_master", t.ik_public) for t in targets}
            targets = list(per_aid.values())
        members = boot.get("member_aids") if isinstance(boot.get("member_aids"), list) else []
        pending = boot.get("pending_adds") if isinstance(boot.get("pending_adds"), list) else []
        result = Bootstrap(epoch, targets, commitment, frozenset(str(a).lower() for a in members),
                           tuple(str(a) for a in pending))
        if targets:
            self._boot[gid] = (time.monotonic() + BOOTSTRAP_TTL, result)
        return result

    async def _targets(self, gateway: str, role: str, devices: list[Any], only_1dh: bool) -> list[Target]:
        out: list[Target] = []
        for dev in devices:
            if not isinstance(dev, dict) or not isinstance(dev.get("aid"), str):
                continue
            owner = dev["aid"].strip().lower()
            if role == "member" and owner == self.aid and dev.get("device_id") == self.device_id:
                continue  # the sending device does not wrap for itself
            wrap_role = "self_sync" if role == "member" and owner == self.aid else role
            ik = await self.e2ee.peer_ik(gateway, owner)
            target = self.e2ee._verified_target(wrap_role, owner, ik, dev, only_1dh)
            if target is not None:
                out.append(target)
        return out

    async def verify_state(self, gateway: str, gid: str, boot: dict[str, Any]) -> dict[str, Any]:
        """Check the signed membership state a bootstrap presents (5.2) and return the AAD
        `state_commitment`. Refuses: a version below one already verified (a server replaying an
        older state could bring back a removed member), a missing or bad proposer signature, a
        snapshot that does not hash to the signed state hash, a proposer outside the admin set it
        signed, and (end-to-end groups) a wrap target the signed snapshot does not name."""
        version = _int(boot.get("state_version", 0))
        if version is None or version < 0:
            raise E2EEError(f"bootstrap of {gid}: bad state_version", data={"reason": "malformed_bootstrap"})
        known = self._state_seen.get(gid, 0)
        if version < known:
            raise E2EEError(f"bootstrap of {gid} presents signed state {version}, older than {known} already seen",
                            data={"reason": "state_rollback", "group_id": gid})
        signed_hash = str(boot.get("state_hash_signed") or boot.get("state_hash") or "")
        chain = str(boot.get("state_chain") or "")
        if version > 0:
            members = await self._verify_signed_state(gateway, gid, version, signed_hash, boot)
            if boot.get("e2ee_security_level", "end_to_end") != "transport":
                wrapped = {str(d.get("aid", "")).strip().lower() for d in boot.get("devices") or []
                           if isinstance(d, dict)}
                unsigned = sorted(wrapped - members)
                if unsigned:
                    raise E2EEError(f"bootstrap of {gid} wraps for {unsigned}, whom the signed state does not name",
                                    data={"reason": "wrap_set_unsigned", "group_id": gid, "aids": unsigned})
        self._state_seen[gid] = max(known, version)
        return {"state_version": version, "state_hash": signed_hash, "state_chain": chain}

    async def _verify_signed_state(self, gateway: str, gid: str, version: int, signed_hash: str,
                                   boot: dict[str, Any]) -> set[str]:
        signature, actor = boot.get("state_signature"), boot.get("state_actor_aid")
        snapshot = boot.get("state_membership_snapshot")

        def bad(why: str) -> E2EEError:
            return E2EEError(f"signed state {version} of {gid}: {why}", data={"reason": "bad_state_signature",
                                                                              "group_id": gid})

        if not all(isinstance(v, str) and v for v in (signature, actor, snapshot, signed_hash)):
            raise bad("signature, proposer, snapshot or hash missing")
        ik = await self.e2ee.peer_ik(gateway, actor.strip().lower())
        try:
            sig = pki.b64d(signature)
        except pki.PKIError:
            raise bad("signature is not base64") from None
        if not pki.verify_signature(ik, sig, state_sign_input(gid, version, signed_hash, snapshot)):
            raise bad(f"signature does not verify with {actor}'s certificate")
        try:
            parsed = json.loads(snapshot)
        except ValueError:
            raise bad("snapshot is not JSON") from None
        if isinstance(parsed, list):  # a legacy snapshot: a list of AIDs, signed but not hash-bound
            return {str(a).strip().lower() for a in parsed if isinstance(a, str)}
        if not isinstance(parsed, dict) or not isinstance(parsed.get("members"), list):
            raise bad("snapshot is not an object with members")
        try:
            if state_commitment(gid, version, parsed) != signed_hash:
                raise bad("snapshot does not hash to the signed state hash")
        except (TypeError, ValueError):
            raise bad("snapshot cannot be hashed") from None
        admin_set = parsed.get("admin_set")
        admins = admin_set.get("admin_aids") if isinstance(admin_set, dict) else None
        if not isinstance(admins, list) or actor.strip().lower() not in {str(a).lower() for a in admins}:
            raise bad(f"proposer {actor} is not in the admin set it signed")
        return {str(m.get("aid", "")).strip().lower() for m in parsed["members"] if isinstance(m, dict)}

    # --- send ------------------------------------------------------------------------------------------
    def _encrypt(self, gid: str, boot: Bootstrap, payload: dict[str, Any], message_id: str,
                 headers: dict[str, Any] | None, context: Any, need_render: bool) -> dict[str, Any]:
        try:
            return encrypt_group(
                sender_aid=self.aid, sender_device_id=self.device_id, sender_ik_private=self.identity.private_key,
                group_id=gid, epoch=boot.epoch, targets=boot.targets, payload=payload, message_id=message_id,
                timestamp_ms=int(time.time() * 1000), state_commitment=boot.commitment,
                protected_headers=headers or None, context=context if isinstance(context, dict) else None,
                need_render=need_render)
        except E2EEEncryptError as exc:
            raise InvalidParams(f"cannot encrypt: {exc}", data={"reason": exc.reason_code}) from None

    async def _with_bootstrap(self, link: Link, gid: str, attempt, *, retry_on_text: bool = False) -> dict[str, Any]:
        """Run `attempt(bootstrap)`; on the gateway's stale-keys codes (and an empty wrap set) drop the
        cache, bootstrap again and retry (once; twice for an empty wrap set), as the SDK does."""
        retries, fresh = 0, False
        while True:
            try:
                boot = await self.bootstrap(link, gid, fresh=fresh)
                if not boot.targets:
                    if boot.member_aids - {self.aid}:
                        raise _NoTargets()
                    raise InvalidParams(f"{gid} has no other member to encrypt for")
                return await attempt(boot)
            except _NoTargets:
                code, error = NO_TARGETS, E2EEError(f"no devices found for the members of {gid} (bootstrap may be "
                                                    "stale)", data={"reason": "no_devices", "group_id": gid})
            except AundError as exc:
                code, error = _remote_code(exc), exc
                words = retry_on_text and any(w in str(exc).lower() for w in _THOUGHT_RETRY_WORDS)
                if code not in PREKEY_RETRY_CODES and not words:
                    raise
            if retries >= (2 if code == NO_TARGETS else 1):
                raise error
            retries, fresh = retries + 1, True
            self.invalidate(gid)
            self.stats["send_retries"] += 1
            if code == NO_TARGETS and retries > 1:
                await trio.sleep(0.25)

    def mark_dissolved(self, gid: str) -> None:
        self.dissolved.add(gid)
        self.invalidate(gid)

    def refuse_dissolved(self, method: str, gid: str) -> None:
        """A clear refusal, before any bootstrap, for a group this AID saw dissolved."""
        if gid in self.dissolved:
            raise GatewayError(f"{method}: group {gid} is dissolved (its owner ended it); nothing can be sent there",
                               remote_code=GROUP_STATE_INVALID, retryable=False, data={"method": method})

    async def send(self, link: Link, params: dict[str, Any], headers: dict[str, str] | None, *,
                   timeout: float | None = None) -> dict[str, Any]:
        """`group.send` as the SDK does it: `group.v2.send` of an E2EE envelope unless `encrypt` is false."""
        gid = _require_gid(params)
        self.refuse_dissolved("group.send", gid)
        payload = params.get("payload")
        if not isinstance(payload, dict):
            raise InvalidParams("group.send needs `group_id` and `payload` (an object)")
        out = {k: v for k, v in params.items() if k not in ("encrypt", "protected_headers", "headers", "group_aid")}
        out["group_id"] = gid
        out.setdefault("message_id", "m-" + uuid.uuid4().hex)
        if params.get("encrypt", True) is False:
            return await link.call("group.send", out, timeout=timeout)
        merged = merged_headers(headers, params)
        need_render = bool(params.get("need_render", True))

        async def attempt(boot: Bootstrap) -> dict[str, Any]:
            envelope = self._encrypt(gid, boot, payload, out["message_id"], merged, params.get("context"), need_render)
            return await link.call("group.v2.send", {"group_id": gid, "group_aid": "", "message_id": out["message_id"],
                                                     "envelope": envelope, "need_render": need_render}, timeout=timeout)

        return await self._with_bootstrap(link, gid, attempt)

    async def thought_put(self, link: Link, params: dict[str, Any], headers: dict[str, str] | None, *,
                          timeout: float | None = None) -> dict[str, Any]:
        """`group.thought.put` with the payload sealed as a group envelope whose message id is the thought id."""
        gid = _require_gid(params)
        self.refuse_dissolved("group.thought.put", gid)
        payload, context = params.get("payload"), params.get("context")
        if not isinstance(payload, dict) or not isinstance(context, dict):
            raise InvalidParams("group.thought.put needs `group_id`, `context` {type, id} and `payload` (an object)")
        thought_id = str(params.get("thought_id") or f"gt-{uuid.uuid4()}").strip()
        timestamp = _int(params.get("timestamp")) or int(time.time() * 1000)
        merged = merged_headers(headers, params)

        async def attempt(boot: Bootstrap) -> dict[str, Any]:
            envelope = self._encrypt(gid, boot, payload, thought_id, merged, context, True)
            return await link.call("group.thought.put", {"group_id": gid, "payload": envelope, "encrypted": True,
                                                         "thought_id": thought_id, "timestamp": timestamp,
                                                         "context": context}, timeout=timeout)

        return await self._with_bootstrap(link, gid, attempt, retry_on_text=True)

    async def decrypt_thoughts(self, gateway: str, gid: str, result: dict[str, Any]) -> dict[str, Any]:
        """Open the envelopes of a `group.thought.get` result in place (payload, or `decrypt_error`)."""
        sender = str(result.get("sender_aid") or "").strip().lower()
        thoughts = result.get("thoughts") if isinstance(result.get("thoughts"), list) else []
        for thought in thoughts:
            envelope = thought.get("payload") if isinstance(thought, dict) else None
            if not isinstance(envelope, dict) or envelope.get("type") != GROUP_ENVELOPE_TYPE:
                continue
            try:
                ik = await self.e2ee.peer_ik(gateway, sender, str(envelope.get("sender_cert_fingerprint") or ""))
                opened = decrypt_group(envelope, my_aid=self.aid, my_device_id=self.device_id,
                                       my_ik_private=self.identity.private_key, spk_lookup=self.spk_lookup,
                                       sender_ik_public=ik, expected_group_id=gid, expected_from=sender,
                                       expected_message_id=str(thought.get("thought_id") or "") or None)
            except (E2EEDecryptError, AundError) as exc:
                thought.update(payload=None, encrypted=True, decrypt_error=getattr(exc, "reason_code", None)
                               or exc.data.get("reason", "sender_key_unavailable"))
                continue
            thought.update(payload=opened.payload, encrypted=True, protected_headers=opened.protected_headers)
        return result

    async def history(self, link: Link, params: dict[str, Any], *, timeout: float | None = None) -> dict[str, Any]:
        """`group.history` as the SDK reads it: one read-only page of the group's messages before
        `before_seq`, each row decrypted as a received group message is (`decode_row`); rows that
        do not open come back with `payload: None` and a `history_error`. Moves no cursor."""
        gid = _require_gid(params)
        before, limit = history_window(params, HISTORY_LIMIT)
        request = {"group_id": gid, "before_seq": before, "limit": limit, "device_id": self.device_id,
                   "slot_id": link.config.slot_id}
        result = await link.call("group.history", request, timeout=timeout)
        if group_id_of(result) not in ("", gid):
            raise GatewayError("group.history: the gateway answered for another group", retryable=False)
        rows = history_rows(result, before)
        out = []
        for row in rows:
            event, _ = await self.decode_row(link.gateway, gid, row)
            out.append(history_entry(event))
        return dict(result, messages=out)

    # --- settings with the signed group.index (3.5) ----------------------------------------------------------
    async def set_settings(self, link: Link, params: dict[str, Any], *, timeout: float | None = None) -> dict[str, Any]:
        """`group.set_settings`; indexed settings (announcement, rules, join requirements, documents)
        get a `group.index` signed with this AID's key, merged on the current one and CAS'd on its
        etag, retried once after a lost race (as the SDK's update_group_index)."""
        settings = params.get("settings")
        if not isinstance(settings, dict) or gindex.KEY in settings \
                or not any(gindex.is_indexed(str(k)) for k in settings):
            return await link.call("group.set_settings", params, timeout=timeout)
        gid = _require_gid(params)
        for attempt in (0, 1):
            current = await link.call("group.get_settings", {"group_id": gid, "keys": [gindex.KEY]}, timeout=timeout)
            base = next((s.get("value") for s in current.get("settings") or []
                         if isinstance(s, dict) and s.get("key") == gindex.KEY), None)
            try:
                etag = str(gindex.parse(base)[0].get("etag") or "") if base else ""
                index = gindex.build(gid, self.aid, self.identity.private_key, dict(settings), base=base,
                                     now_ms=int(time.time() * 1000))
            except ValueError as exc:
                raise GatewayError(f"group.set_settings: the group's current group.index is unreadable: {exc}",
                                   retryable=False, data={"method": "group.set_settings"}) from None
            try:
                return await link.call("group.set_settings", dict(params, group_id=gid, expected_index_etag=etag,
                                                                  settings={**settings, gindex.KEY: index}),
                                       timeout=timeout)
            except GatewayError as exc:
                if attempt == 0 and "etag conflict" in str(exc):
                    continue
                raise
        raise AssertionError("unreachable")  # pragma: no cover

    # --- membership and the signed state chain (5.4) --------------------------------------------------------
    async def membership_call(self, link: Link, method: str, params: dict[str, Any], *,
                              timeout: float | None = None) -> dict[str, Any]:
        """A membership change, then (owner/admin) a signed state naming the new member set.

        The proposal is awaited inside the app's call, as the SDK does; its failure is logged and
        never fails the call (the group keeps working under its older signed state)."""
        if method == "group.create":
            result = await self.identities.create(link, params, timeout=timeout)
        elif method == "group.complete_transfer":
            result = await self.identities.complete_transfer(link, params, timeout=timeout)
        else:
            result = await link.call(method, params, timeout=timeout)
        gid = group_id_of(result.get("group") if isinstance(result.get("group"), dict) else None) \
            or group_id_of(result) or group_id_of(params)
        if gid:
            self.invalidate(gid)
            if method in JOINING_CALLS:
                await _quietly(self.register(link, gid), "groups.prekey_failed", self.aid, gid)
            await _quietly(self.propose(link, gid), "groups.propose_failed", self.aid, gid)
        return result

    async def _members(self, link: Link, gid: str) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        page = 1
        while True:
            reply = await link.call("group.get_members", {"group_id": gid, "page": page, "size": MEMBERS_PAGE},
                                    background=True)
            items = [m for m in (reply.get("members") or reply.get("items") or []) if isinstance(m, dict)]
            out += items
            total = _int(reply.get("total"))
            if not items or total is None or len(out) >= total:
                return out
            page += 1

    @staticmethod
    def _verified_base(gid: str, state: dict[str, Any]) -> tuple[int, str, int] | None:
        """(state_version, state_hash, key_epoch) of the committed state, if its snapshot hashes right."""
        version, epoch = _int(state.get("state_version")), _int(state.get("key_epoch"))
        state_hash = str(state.get("state_hash") or "")
        if version is None or epoch is None:
            return None
        if version > 0:
            try:
                parsed = json.loads(str(state.get("membership_snapshot") or ""))
                if isinstance(parsed, dict) and state_commitment(gid, version, parsed) != state_hash:
                    return None
                if not isinstance(parsed, (dict, list)):
                    return None
            except (TypeError, ValueError):
                return None
        return version, state_hash, epoch

    @staticmethod
    def _pending_follows(gid: str, proposal: Any, version: int, state_hash: str, member_aids: set[str]) -> bool:
        if not isinstance(proposal, dict) or not proposal.get("proposal_id"):
            return False
        if proposal.get("state_version") != version + 1 or proposal.get("prev_state_hash") != state_hash:
            return False
        try:
            parsed = json.loads(str(proposal.get("membership_snapshot") or ""))
            ok = isinstance(parsed, dict) and state_commitment(gid, version + 1, parsed) == proposal.get("state_hash")
        except (TypeError, ValueError):
            return False
        if not ok:
            return False
        named = {str(m.get("aid", "")).lower() for m in parsed.get("members", []) if isinstance(m, dict)}
        return named == member_aids

    async def propose(self, link: Link, gid: str) -> str:
        """Sign and commit a state naming the current members, if we are owner/admin and it changed.

        Returns what happened: not_admin, bad_base, confirmed_pending, unchanged or committed."""
        async with self._propose_locks.setdefault(gid, trio.Lock()):
            for attempt in (0, 1):
                try:
                    return await self._propose_once(link, gid)
                except GatewayError as exc:
                    if attempt == 0 and exc.remote_code == STATE_CONFLICT:
                        continue  # the state moved under us: build on the new one
                    raise
        raise AssertionError("unreachable")  # pragma: no cover

    async def _propose_once(self, link: Link, gid: str) -> str:
        members = await self._members(link, gid)
        roles = {str(m.get("aid", "")).strip().lower(): str(m.get("role") or "") for m in members}
        if roles.get(self.aid) not in ADMIN_ROLES:
            return "not_admin"
        state = await link.call("group.get_state", {"group_id": gid}, background=True)
        base = self._verified_base(gid, state)
        if base is None:
            log.warning("groups.bad_state_base", aid=self.aid, group_id=gid)
            return "bad_base"
        version, state_hash, epoch = base
        pending = (await link.call("group.v2.get_proposal", {"group_id": gid}, background=True)).get("proposal")
        if self._pending_follows(gid, pending, version, state_hash, set(roles)):
            await link.call("group.v2.confirm_state", {"proposal_id": pending["proposal_id"], "group_id": gid},
                            background=True)
            self.stats["confirmed_pending"] += 1
            self.invalidate(gid)
            return "confirmed_pending"
        boot = await link.call("group.v2.bootstrap", {"group_id": gid, "e2ee_wrap_capabilities": WRAP_CAPABILITIES},
                               background=True)
        devices: dict[str, list[dict[str, str]]] = {aid: [] for aid in roles}
        for dev in boot.get("devices") or []:
            owner = str(dev.get("aid", "")).strip().lower() if isinstance(dev, dict) else ""
            if owner in devices:
                devices[owner].append({"device_id": str(dev.get("device_id") or ""),
                                       "ik_fp": str(dev.get("ik_fp") or "")})
        audit = sorted({str(r.get("aid", "")).strip() for r in boot.get("audit_recipients") or []
                        if isinstance(r, dict) and r.get("aid")})
        payload = {"members": [{"aid": aid, "devices": devs} for aid, devs in devices.items()], "audit_aids": audit,
                   "admin_set": {"admin_aids": sorted(a for a, r in roles.items() if r in ADMIN_ROLES), "threshold": 1},
                   "join_policy_hash": None, "recovery_quorum": None, "history_policy": "recent_7_days",
                   "wrap_protocol": "3DH"}
        snapshot = snapshot_json(payload)
        if snapshot == state.get("membership_snapshot"):
            return "unchanged"
        new_hash = state_commitment(gid, version + 1, payload)
        signature = pki.b64e(pki.sign_der(self.identity.private_key,
                                          state_sign_input(gid, version + 1, new_hash, snapshot)))
        proposal = await link.call("group.v2.propose_state", {
            "group_id": gid, "state_version": version + 1, "key_epoch": epoch, "state_hash": new_hash,
            "prev_state_hash": state_hash, "membership_snapshot": snapshot, "signature": signature,
            "reason": "membership_changed", "auto_confirm_seconds": 30}, background=True)
        await link.call("group.v2.confirm_state", {"proposal_id": proposal.get("proposal_id"), "group_id": gid},
                        background=True)
        self.stats["proposals"] += 1
        self.invalidate(gid)
        log.info("groups.state_committed", aid=self.aid, group_id=gid, state_version=version + 1,
                 members=len(roles))
        return "committed"

    # --- receive -----------------------------------------------------------------------------------------
    async def decode_row(self, gateway: str, gid: str, row: dict[str, Any]) -> tuple[NewEvent, str]:
        """(inbox event, spk_id used or "") for one group row of `gid`; never raises for a bad message."""
        seq, message_id = row.get("seq"), str(row.get("message_id") or "")
        sender = str(row.get("from_aid") or row.get("sender_aid") or row.get("from") or "").strip().lower()
        sender_device = row.get("sender_device_id")
        base = {"group_id": gid, "from": sender, "seq": seq, "message_id": message_id,
                "timestamp": row.get("t_server") or row.get("timestamp"), "need_render": row.get("need_render", True),
                "sender_device_id": sender_device if isinstance(sender_device, str) else ""}
        key = f"{gid}/{message_id}" if message_id else ""
        if group_id_of(row) not in ("", gid):
            return self._undecryptable(base, key, "row_mismatch", "row names another group"), ""
        kind, envelope = row_content(row, GROUP_ENVELOPE_TYPE)
        if kind in ("malformed", "unsupported"):
            return self._undecryptable(base, key, f"{kind}_envelope", envelope), ""
        if kind == "plain":
            data = dict(base, payload=envelope, encrypted=False, protected_headers={})
            return NewEvent(GROUP_MESSAGE_KIND, sender, key, _int(seq) or 0, data), ""
        try:
            ik = await self.e2ee.peer_ik(gateway, sender, str(envelope.get("sender_cert_fingerprint") or ""))
            result = decrypt_group(
                envelope, my_aid=self.aid, my_device_id=self.device_id, my_ik_private=self.identity.private_key,
                spk_lookup=self.spk_lookup, sender_ik_public=ik, expected_group_id=gid, expected_from=sender,
                expected_from_device=sender_device if isinstance(sender_device, str) and sender_device else None,
                expected_message_id=message_id or None, expected_epoch=_int(row.get("epoch")))
        except E2EEDecryptError as exc:
            return self._undecryptable(base, key, exc.reason_code, exc.message), ""
        except AundError as exc:
            return self._undecryptable(base, key, exc.data.get("reason", "sender_key_unavailable"), str(exc)), ""
        data = dict(base, payload=result.payload, encrypted=True, protected_headers=result.protected_headers,
                    headers_verified=True, context=result.context, epoch=result.aad.get("epoch"))
        return NewEvent(GROUP_MESSAGE_KIND, sender, key, _int(seq) or 0, data), result.spk_id_used or ""

    def _undecryptable(self, base: dict[str, Any], key: str, reason: str, detail: str) -> NewEvent:
        log.warning("groups.undecryptable", aid=self.aid, group_id=base["group_id"], sender=base["from"],
                    seq=base["seq"], reason=reason, detail=detail[:200])
        data = dict(base, reason=reason, detail=detail[:500], encrypted=True)
        return NewEvent("message.undecryptable", base["from"], key, _int(base["seq"]) or 0, data)


async def _quietly(awaitable, event: str, aid: str, gid: str) -> Any:
    """Await a best-effort group step; log (not raise) what fails."""
    try:
        return await awaitable
    except (AundError, E2EEDecryptError) as exc:
        log.info(event, aid=aid, group_id=gid, error=str(exc))
        return None


class GroupSync(LinkSync):
    """Lossless inbound group sync for one link: pushes, pulls and events, committed before acked."""

    page_rows = PAGE_LIMIT

    def __init__(self, link: Link, session: GroupKeys, inbox: Inbox, *, poll_seconds: float = 30.0) -> None:
        super().__init__(link, inbox, poll_seconds)
        self.session = session
        # the message cursor per group: inbox ack, head named, own sends, refused / removed (9.3)
        self.messages = SyncCore(MESSAGE_STREAM, limit=lambda _gid, left: self.pages.rows(left))
        self.events = SyncCore(EVENT_STREAM)     # the group event cursor per group
        self._rotate: set[str] = set()            # groups whose prekey is replaced once the ack is out
        self._dirty: set[str] = set()             # groups whose last sync failed: retried with backoff
        self._send, self._recv = trio.open_memory_channel[tuple[str, Any, Any]](PUSH_QUEUE)
        self._nursery: trio.Nursery | None = None
        self.identity_checks = True  # after a connect, bind or republish the identity of groups we own
        self.stats = {"pushes": 0, "inline": 0, "gaps": 0, "pulls": 0, "committed": 0, "duplicates": 0,
                      "undecryptable": 0, "events": 0, "event_pulls": 0, "ignored": 0, "failures": 0, "blocked": 0,
                      "skipped": 0}

    # --- app calls -------------------------------------------------------------------------------------------
    async def call(self, method: str, params: dict[str, Any], headers: dict[str, str] | None, *,
                   timeout: float | None = None) -> dict[str, Any]:
        """The group calls the daemon routes here (`route == "group"` in aund.aun.methods)."""
        if method == "group.send":
            result = await self.session.send(self.link, params, headers, timeout=timeout)
            seq = _int(result.get("seq"))
            if seq is not None and result.get("status") != "duplicate":
                self.note_own(_require_gid(params), seq)
            return result
        if method == "group.thought.put":
            return await self.session.thought_put(self.link, params, headers, timeout=timeout)
        if method == "group.thought.get":
            result = await self.link.call(method, params, timeout=timeout)
            return await self.session.decrypt_thoughts(self.link.gateway, _require_gid(params), result)
        if method == "group.history":
            return await self.session.history(self.link, params, timeout=timeout)
        if method in methods.MEMBERSHIP:
            return await self.session.membership_call(self.link, method, params, timeout=timeout)
        if method == "group.set_settings":
            return await self.session.set_settings(self.link, params, timeout=timeout)
        if method == "group.bind_group_aid":
            return await self.session.identities.bind(self.link, params, timeout=timeout)
        if method == "group.renew_group_aid":
            return await self.session.identities.renew(self.link, params, timeout=timeout)
        if method == "group.transfer_owner":
            return await self.session.identities.transfer(self.link, params, timeout=timeout)
        if method == "group.unblock":
            result = await self.link.call(method, params, timeout=timeout)
            if str(params.get("subject") or params.get("aid") or "").strip().lower() == self.aid:
                self._resume(_require_gid(params), "unblocked itself")  # as the SDK: its pulls start again
            return result
        raise InvalidParams(f"{method} is not a group method aund routes")

    def note_own(self, gid: str, seq: int) -> None:
        """Our own send got `seq`: this device has nothing to receive there."""
        self.messages.own_sent(gid, seq)

    def _advance(self, gid: str, ack: int) -> int:
        """The cursor of `gid` once the inbox holds `ack` (stepped past our own sends)."""
        self.messages.load(gid, ack)
        return self.messages.cursor(gid)

    @property
    def _blocked(self) -> set[str]:
        """The groups refused or left: no background pulls (9.3)."""
        return {gid for gid in self.messages.known() if self.messages.blocked(gid)}

    @property
    def _own(self) -> dict[str, set[int]]:
        return {gid: self.messages.own(gid) for gid in self.messages.known()}

    # --- events from the link's reader (never block) --------------------------------------------------------
    def on_event(self, name: str, params: dict[str, Any]) -> None:
        if name not in GROUP_EVENTS or not isinstance(params, dict):
            return
        gid = group_id_of(params)
        if not gid:
            return
        if name in ("group.v2.state_confirmed", "group.changed"):
            self.session.invalidate(gid)  # at once: the next send must see the new wrap set
        if name == "group.v2.state_confirmed":
            return
        if name in ("group.v2.state_proposed", "group.v2.state_retry_needed"):
            self._queue(("propose", gid, None))
        elif name == "group.changed":
            self._queue(("changed", gid, params))
        else:
            self._queue(("push", gid, (name, params)))

    def _queue(self, item: tuple[str, Any, Any]) -> None:
        try:
            self._send.send_nowait(item)
        except trio.WouldBlock:
            self._dirty.add(item[1])  # overflow: the group is pulled again once the queue drains

    # --- the task ---------------------------------------------------------------------------------------------
    async def run(self) -> None:
        """Handle pushes, events and sync requests one at a time; background steps (proposals, prekey
        rotations) run beside. A failed group is retried with backoff; every `poll_seconds` of quiet,
        `group.list_my` catches a last push the gateway dropped."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            retry = 0.0
            while True:
                item = None
                with trio.move_on_after(retry or self.poll_seconds):
                    item = await self._recv.receive()
                if item is None and not self.link.is_ready:
                    await wait_ready_or_forever(self.link)  # the connect's own resync catches up
                    continue
                gid = item[1] if item is not None else ""
                try:
                    if item is None:
                        if self._dirty:
                            for dirty in sorted(self._dirty):
                                await self._sync_messages_and_events(dirty)
                        else:
                            await self.poll()
                    else:
                        await self._handle(item)
                    retry = 0.0
                except AundError as exc:
                    retry = min(max(retry * 2, 0.5), 30.0)
                    if gid:
                        self._dirty.add(gid)
                    self.stats["failures"] += 1
                    log.warning("groups.sync_failed", aid=self.aid, group_id=gid, error=str(exc), retry_in=retry)

    async def _handle(self, item: tuple[str, Any, Any]) -> None:
        kind, gid, data = item
        if kind == "push":
            await self._on_push(gid, *data)
        elif kind == "changed":
            await self._on_changed(gid, data)
        elif kind == "sync":
            await self.sync_group(gid)
        elif kind == "events":
            await self.sync_events(gid)
        elif kind == "propose":
            self._spawn(self.session.propose(self.link, gid), "groups.propose_failed", gid)
        elif kind == "identity":
            self._spawn(self.session.identities.check_owned(self.link, data), "groups.identity_check_failed", gid)

    def _spawn(self, awaitable, event: str, gid: str) -> None:
        if self._nursery is None:
            awaitable.close()
            return
        self._nursery.start_soon(_quietly, awaitable, event, self.aid, gid)

    async def _sync_messages_and_events(self, gid: str) -> None:
        await self.sync_group(gid)
        await self.sync_events(gid)
        self._dirty.discard(gid)

    # --- connect and poll -------------------------------------------------------------------------------------
    async def on_connected(self) -> None:
        """After every (re)connect: a fresh session unblocks refused groups; register the group
        prekey of every active group (concurrently, within the link's background budget), propose
        where we are owner/admin, and queue a catch-up of messages and events where the heads moved."""
        self.messages.reconnected(abandon_pulls=False)  # our pulls end by themselves (a page or a failure)
        self.events.reconnected(abandon_pulls=False)
        try:
            groups = await self._my_groups()
        except AundError as exc:  # a gateway without groups must not fail the connect
            log.warning("groups.list_failed", aid=self.aid, error=str(exc))
            return
        async with trio.open_nursery() as nursery:
            for gid, _group in groups:
                nursery.start_soon(_quietly, self.session.register(self.link, gid), "groups.prekey_failed",
                                   self.aid, gid)
        for gid, group in groups:
            if group.get("role") in ADMIN_ROLES or group.get("my_role") in ADMIN_ROLES:
                self._queue(("propose", gid, None))
            if self.identity_checks and "owner" in (group.get("role"), group.get("my_role")):
                self._queue(("identity", gid, group))  # as the SDK after a connect: bind, or publish the card
            await self._queue_catch_up(gid, group)

    async def _my_groups(self) -> list[tuple[str, dict[str, Any]]]:
        reply = await self.link.call("group.list_my", {"size": 200}, background=True)
        out = []
        for group in reply.get("items") or reply.get("groups") or []:
            gid = group_id_of(group)
            if gid and str(group.get("status") or "active").lower() in SYNCED_STATES:
                out.append((gid, group))
        return out

    async def _queue_catch_up(self, gid: str, group: dict[str, Any]) -> None:
        head, event_head = _int(group.get("message_seq")), _int(group.get("event_seq"))
        if head is not None:
            self.messages.head_seen(gid, head, exact=True)
        await self._ack_of(gid)
        if self.messages.behind(gid):
            self._queue(("sync", gid, None))
        if event_head is None or event_head > await self._event_ack_of(gid):
            self._queue(("events", gid, None))

    async def poll(self) -> None:
        for gid, group in await self._my_groups():
            if not self.messages.blocked(gid):
                await self._queue_catch_up(gid, group)

    # --- messages ---------------------------------------------------------------------------------------------
    async def _ack_of(self, gid: str) -> int:
        if not self.messages.loaded(gid):
            self.messages.load(gid, await self.inbox.peer_ack(self.aid, self.device_id, self.slot_key, f"group:{gid}"))
        return self.messages.ack(gid)

    def _inline_row(self, name: str, gid: str, seq: int, params: dict[str, Any]) -> dict[str, Any] | None:
        """The pushed row if it can be consumed without a pull (8.1: head and row agree, for this device)."""
        row = params.get("inline_message")
        if not isinstance(row, dict) or row.get("seq") != seq or group_id_of(row) not in ("", gid):
            return None
        sender = str(params.get("sender_aid") or params.get("from_aid") or "").lower()
        row_sender = str(row.get("from_aid") or row.get("sender_aid") or row.get("from") or "").lower()
        if not sender or row_sender != sender or row.get("message_id") != params.get("message_id"):
            return None
        if params.get("sender_device_id") is not None and row.get("sender_device_id") != params["sender_device_id"]:
            return None
        for target in (params.get("target_device_id") or params.get("device_id"),
                       row.get("target_device_id") or row.get("device_id")):
            if target not in (None, "", self.device_id):
                return None
        if name == "group.v2.message_created":
            ok = row.get("version") == "v2" and isinstance(row.get("envelope_json"), str) and "payload" not in row
        else:
            ok = row.get("version") == "v1" and "payload" in row and "envelope_json" not in row
        return row if ok and "legacy_v1" not in row else None

    async def _on_push(self, gid: str, name: str, params: dict[str, Any]) -> None:
        self.stats["pushes"] += 1
        if self.messages.blocked(gid):
            self.stats["ignored"] += 1
            return
        seq = _int(params.get("seq"))
        if seq is None or params.get("kind") == "group.online_unread_hint":
            await self.sync_group(gid)
            return
        await self._ack_of(gid)
        row = self._inline_row(name, gid, seq, params) if seq == self.messages.cursor(gid) + 1 else None
        actions = self.messages.pushed(gid, seq, row)
        await self.drive_push(self.messages, actions, self._message_step)

    async def fetch_page(self, gid: str, after: int, limit: int | None = None) -> dict[str, Any] | None:
        """One forward `group.v2.pull` page through the pull gate (one pull per group at a time,
        identical ones shared); None once the gateway refused us for this group. At most the
        link's page limit, and no more rows than the head last named leaves."""
        namespace = f"group:{gid}"
        if limit is None:
            head = self.messages.head(gid)
            limit = self.pages.rows(None if head is None else head - after)
        params = {"group_id": gid, "after_seq": after, "limit": limit, "device_id": self.device_id,
                  "slot_id": self.slot_id}
        key = f"{namespace}|forward|{after}|limit={limit}"
        try:
            page = await self.link.pull(namespace, key, "group.v2.pull", params, background=True)
        except AundError as exc:
            if _is_refusal(exc):
                self._block(gid, str(exc))
                return None
            if self.pages.too_big(exc, namespace, after, limit):
                await self.drive(self.messages, self.messages.too_big(gid, after), self._message_step)
            raise
        self.pages.fitted(namespace, limit)
        self.stats["pulls"] += 1
        return page

    async def _skip_row(self, skip: Skip) -> list:
        """Move past the row that fits in no page, recording it for apps. Group seqs have holes (rows
        for other devices): the row is taken to be the one after the cursor, so a hole in front of it
        costs another round and another event. Acked upstream by the next sync of the group."""
        gid, seq = skip.key, skip.seq
        event = skipped_row(aid=self.aid, sender="", seq=seq, after=skip.after, max_frame=self.link.config.max_frame,
                            dedupe_key=f"{gid}/skipped:{seq}", group_id=gid)
        await self.inbox.commit(self.aid, [event], ack=(self.device_id, self.slot_key, f"group:{gid}", skip.new_cursor))
        self.stats["skipped"] += 1
        return self.messages.skipped(gid, skip.new_cursor)

    def _block(self, gid: str, why: str) -> None:
        if self.messages.block(gid):
            self.stats["blocked"] += 1
            log.info("groups.sync_stopped", aid=self.aid, group_id=gid, reason=why[:200])
        self.session.invalidate(gid)

    def _resume(self, gid: str, why: str) -> None:
        """Sync `gid` again after a refusal stopped it (readmitted, unblocked)."""
        if self.messages.resume(gid):
            log.info("groups.sync_resumed", aid=self.aid, group_id=gid, reason=why)
        self._queue(("sync", gid, None))

    async def sync_group(self, gid: str) -> None:
        """Pull every message of `gid` after what the inbox holds, page by page (no coverage proof
        exists for groups: holes inside a page are messages not wrapped for this device)."""
        if self.messages.blocked(gid):
            return
        await self._ack_of(gid)
        await self.drive(self.messages, self.messages.sync(gid), self._message_step)

    async def _message_step(self, action) -> list:
        gid = action.key
        if isinstance(action, Pull):
            after = action.after
            page = await self.fetch_page(gid, after, action.limit)
            if page is None:
                return self.messages.refused(gid, after)
            rows: dict[int, dict[str, Any]] = {}
            for row in page.get("messages") or []:
                seq = _int(row.get("seq")) if isinstance(row, dict) else None
                if seq is not None and seq > after:
                    rows.setdefault(seq, row)
            cursor = page.get("cursor") if isinstance(page.get("cursor"), dict) else {}
            floor = max([_int(page.get("retention_floor_message_seq")) or 0, _int(cursor.get("join_seq")) or 0,
                         (_int(page.get("earliest_available_message_seq")) or 1) - 1])
            head = _int(page.get("latest_message_seq")) or _int(cursor.get("latest_seq"))
            return self.messages.page(gid, after, rows, floor, page.get("has_more") is True, head=head,
                                      server_ack=_int(cursor.get("current_seq")))
        if isinstance(action, Commit):
            await self._commit(gid, list(action.rows), action.new_cursor)
            return self.messages.committed(gid, action.new_cursor)
        if isinstance(action, AckUpstream):
            # committed: now tell the gateway (a lost ack only means the rows come again, deduplicated)
            await self._ack_upstream(gid, action.up_to)
            if gid in self._rotate:  # a message used our current group prekey: replace it (the old one is kept)
                self._rotate.discard(gid)
                self._spawn(self.session.register(self.link, gid, rotate=True), "groups.prekey_failed", gid)
        if isinstance(action, Skip):
            return await self._skip_row(action)
        return []

    async def _commit(self, gid: str, rows: list[dict[str, Any]], covered: int) -> None:
        events, rotate = [], False
        current = self.session.current_spk_id(gid)
        for row in rows:
            event, spk_used = await self.session.decode_row(self.link.gateway, gid, row)
            events.append(event)
            if event.kind == "message.undecryptable":
                self.stats["undecryptable"] += 1
            if spk_used and spk_used == current:
                rotate = True
        new = await self.inbox.commit(self.aid, events, ack=(self.device_id, self.slot_key, f"group:{gid}", covered))
        self.stats["committed"] += len(new)
        self.stats["duplicates"] += len(events) - len(new)
        if rotate:
            self._rotate.add(gid)

    async def _ack_upstream(self, gid: str, up_to: int) -> None:
        try:
            await self.link.call("group.v2.ack", {"group_id": gid, "up_to_seq": up_to, "device_id": self.device_id,
                                                  "slot_id": self.slot_id}, background=True)
            self.messages.acked_upstream(gid, up_to)
        except AundError as exc:
            log.info("groups.ack_deferred", aid=self.aid, group_id=gid, error=str(exc))

    # --- group events ------------------------------------------------------------------------------------------
    async def _event_ack_of(self, gid: str) -> int:
        if not self.events.loaded(gid):
            self.events.load(gid, await self.inbox.peer_ack(self.aid, self.device_id, self.slot_key,
                                                            f"group-events:{gid}"))
        return self.events.ack(gid)

    async def _on_changed(self, gid: str, event: dict[str, Any]) -> None:
        action = str(event.get("action") or "")
        subject = str(event.get("joined_aid") or event.get("member_aid") or event.get("aid") or "").strip().lower()
        if action == DISSOLVED:
            self.session.mark_dissolved(gid)
            self._spawn(self.session.identities.dissolved(gid), "groups.identity_invalidate_failed", gid)
        if action == "owner_transferred":
            new_owner = str(event.get("new_owner") or "").strip().lower()
            self._spawn(self.session.identities.owner_changed(gid, new_owner), "groups.identity_handover_failed", gid)
            self._block(gid, action)  # nothing more will come; the event itself is stored below
        elif action in LEAVE_ACTIONS and subject == self.aid:
            self._block(gid, action)  # our own removal: nothing more to pull (its event still is, below)
        elif action in JOIN_ACTIONS and subject == self.aid:
            self._spawn(self.session.register(self.link, gid), "groups.prekey_failed", gid)
            self._resume(gid, action)
        elif action == BLOCKED and subject == self.aid:
            self._block(gid, action)  # no messages for us until unblocked (the pulls would be refused)
        elif action == UNBLOCKED and subject == self.aid:
            self._resume(gid, action)
        elif action in MEMBERSHIP_ACTIONS and not self.messages.blocked(gid):
            self._spawn(self.session.register(self.link, gid, rotate=True), "groups.prekey_failed", gid)
        elif action == TRANSFER_PENDING and str(event.get("new_owner") or "").strip().lower() == self.aid \
                and event.get("status") == "pending_rekey":
            # as the SDK does: the named new owner completes at once (anonymous groups: no group key to rekey)
            self._spawn(self.session.membership_call(self.link, "group.complete_transfer", {"group_id": gid}),
                        "groups.transfer_complete_failed", gid)
        if action in PROPOSE_ACTIONS and not self.messages.blocked(gid) and gid not in self.session.dissolved:
            self._spawn(self.session.propose(self.link, gid), "groups.propose_failed", gid)
        if (_int(event.get("event_seq")) or 0) > 0:
            await self.sync_events(gid)
        else:  # not ours to pull (e.g. an applicant's rejection): store it as it came
            await self.inbox.commit(self.aid, [NewEvent(GROUP_CHANGED_KIND, gid, "", 0, dict(event))])
            self.stats["events"] += 1

    async def sync_events(self, gid: str) -> None:
        """`group.pull_events` from the inbox's event cursor; events committed, then `group.ack_events`."""
        await self._event_ack_of(gid)
        await self.drive(self.events, self.events.sync(gid), self._event_step)

    async def _event_step(self, action) -> list:
        gid = action.key
        if isinstance(action, Pull):
            after = action.after
            params = {"group_id": gid, "after_event_seq": after, "limit": action.limit,
                      "device_id": self.device_id, "slot_id": self.slot_id}
            key = f"group-events:{gid}|{after}|limit={action.limit}"
            try:
                page = await self.link.pull(f"group-events:{gid}", key, "group.pull_events", params, background=True)
            except AundError as exc:
                if _is_refusal(exc):
                    log.info("groups.events_refused", aid=self.aid, group_id=gid, error=str(exc))
                    return self.events.refused(gid, after)
                raise
            self.stats["event_pulls"] += 1
            found: dict[int, tuple[int, dict[str, Any]]] = {}
            for event in page.get("events") or []:
                seq = _int(event.get("event_seq")) if isinstance(event, dict) else None
                if seq is not None and seq > after and event.get("event_type") != "group.message_created":
                    found.setdefault(seq, (seq, event))
            cursor = page.get("cursor") if isinstance(page.get("cursor"), dict) else {}
            floor = max([_int(page.get("retention_floor_event_seq")) or 0, _int(cursor.get("join_seq")) or 0,
                         (_int(page.get("earliest_available_event_seq")) or 1) - 1])
            return self.events.page(gid, after, found, floor, page.get("has_more") is True)
        if isinstance(action, Commit):
            events = [NewEvent(GROUP_CHANGED_KIND, gid, f"{gid}#{s}", s, dict(event, group_id=gid))
                      for s, event in action.rows]
            new = await self.inbox.commit(self.aid, events,
                                          ack=(self.device_id, self.slot_key, f"group-events:{gid}", action.new_cursor))
            self.stats["events"] += len(new)
            return self.events.committed(gid, action.new_cursor)
        if isinstance(action, AckUpstream):
            try:
                await self.link.call("group.ack_events", {"group_id": gid, "event_seq": action.up_to,
                                                          "device_id": self.device_id, "slot_id": self.slot_id},
                                     background=True)
                self.events.acked_upstream(gid, action.up_to)
            except AundError as exc:
                log.info("groups.event_ack_deferred", aid=self.aid, group_id=gid, error=str(exc))
        return []
