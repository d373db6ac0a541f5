"""AUN layer: what becomes of every `event/...` notification a gateway pushes (docs/local-protocol.md
"Event kinds").

The official SDK 0.5.25 (transport.py EVENT_NAME_MAP, client.py's `_raw.*` subscriptions,
_client/delivery.py) treats the gateway's events in three ways: it consumes message pushes
itself (pull, decrypt, ack: aund's PeerSync and GroupSync do that), it dedupes and keeps state for
the ones that are data (recalls, read positions, invites), and it passes the rest through. aund
does the same per AID, with one difference: what the SDK treats as data is made durable here,
written to the inbox (one row per dedupe key, so a replayed push is stored once) and acked by
consumers like messages; everything else is live, fanned out to the current subscribers only.

`RULES` is the one table: gateway event name -> (aund kind, durable?, what the SDK does). Names
with the prefixes in `PREFIX_KINDS` (`app.*`, `org.*`, `credential.*`) are live under their own
name; anything else a gateway pushes reaches apps live as `gateway.event` `{event, params}`.

Volatile messages (`message.send` with `ttl` > 0: `storage: "volatile"`, no persistent seq, a
`volatile_cursor`) come as ordinary message pushes; `is_volatile()` tells them apart, and
`GatewayEvents` decrypts them like any message and delivers them live as `message.volatile`,
deduped by (sender, message id) until they expire, never written to the inbox, and acks their
cursor upstream (`message.v2.ack` with `volatile_cursors`).
"""
from __future__ import annotations

import hashlib
import json
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import structlog
import trio

from aund.errors import AundError
from aund.inbox import NewEvent

log = structlog.get_logger("aund.events")

VOLATILE_KIND = "message.volatile"
OTHER_KIND = "gateway.event"  # a gateway event no rule names: {event, params}, live
#: Gateway events handled elsewhere: message pushes (PeerSync), group pushes (GroupSync), and
#: `gateway.disconnect`, which the link itself reads and then publishes as a link event.
MESSAGE_PUSHES = frozenset({"message.received", "peer.v2.message_received"})
PREFIX_KINDS = ("app.", "org.", "credential.")
VOLATILE_SEEN_LIMIT = 4096
VOLATILE_MIN_SECONDS = 60.0  # a volatile message id is remembered at least this long
VOLATILE_DEFAULT_SECONDS = 1800.0  # ... and this long when it names no expiry
EVENT_QUEUE = 1024
MAX_KEY_CHARS = 2048


@dataclass(frozen=True)
class Rule:
    kind: str      # the kind apps subscribe to
    durable: bool  # True: inbox (acked by consumers); False: live, current subscribers only
    sdk: str       # what the SDK 0.5.25 does with it (documentation)


def _text(value: Any) -> str:
    return value.strip() if isinstance(value, str) else ""


def _ids(value: Any) -> list[str]:
    items = value if isinstance(value, list) else [value]
    out = {_text(v) if isinstance(v, str) else str(v) if type(v) is int else "" for v in items}
    return sorted(s for s in out if s)


def _digest(parts: list[str]) -> str:
    return hashlib.sha256(json.dumps(parts, ensure_ascii=False).encode("utf-8")).hexdigest()


def recalled_ids(params: dict[str, Any]) -> list[str]:
    """The message ids a recall names (`message_ids`, else one of the single-id fields)."""
    ids = _ids(params.get("message_ids"))
    if not ids:
        for key in ("recalled_message_id", "target_message_id", "original_message_id"):
            ids = _ids(params.get(key))
            if ids:
                break
    return ids


# --- durable events: (sender, dedupe key, data) or None when the event cannot be one --------------
Keyed = tuple[str, str, dict[str, Any]] | None


def _message_recalled(aid: str, p: dict[str, Any]) -> Keyed:
    sender = _text(p.get("from") or p.get("from_aid") or p.get("sender_aid")).lower()
    ids = recalled_ids(p)
    if not sender or not ids:
        return None
    return sender, "recall|" + ",".join(ids), dict(p, message_ids=ids, **{"from": sender})


def _group_message_recalled(aid: str, p: dict[str, Any]) -> Keyed:
    gid = _text(p.get("group_id") or p.get("group_aid")).lower()
    ids = recalled_ids(p) or _ids(p.get("target_message_seqs"))
    if not gid or not ids:
        return None
    return gid, "recall|" + ",".join(ids), dict(p, group_id=gid, message_ids=recalled_ids(p))


def _read_changed(scope: str) -> Callable[[str, dict[str, Any]], Keyed]:
    def key(aid: str, p: dict[str, Any]) -> Keyed:
        # as the SDK: a read position of this AID only (owner_aid), of this scope, with an order
        owner, topic, last = _text(p.get("owner_aid")).lower(), p.get("topic_key"), _text(p.get("last_read_message_id"))
        order = p.get("last_read_order")
        gid = _text(p.get("group_id")).lower() if scope == "group" else ""
        if (owner != aid or p.get("scope") != scope or not isinstance(topic, str) or not topic or not last
                or type(order) is not int or order <= 0 or (scope == "group" and not gid)):
            return None
        return (gid or owner), "read|" + _digest([owner, gid, topic, last]), dict(p)
    return key


def _invite(final: bool) -> Callable[[str, dict[str, Any]], Keyed]:
    def key(aid: str, p: dict[str, Any]) -> Keyed:
        gid = _text(p.get("group_id") or p.get("group_aid")).lower()
        invitee = _text(p.get("invitee_aid")).lower() or aid
        invites = _ids(p.get("invite_ids")) + _ids(p.get("invite_id"))
        if not gid or invitee != aid or not invites:
            return None
        status = _text(p.get("status")).lower() or ("ended" if final else "pending")
        data = dict(p, group_id=gid, invitee_aid=invitee, invite_ids=sorted(set(invites)), status=status)
        return gid, ("final|" if final else "invite|") + status + "|" + ",".join(sorted(set(invites))), data
    return key


RULES: dict[str, Rule] = {
    # durable: the SDK dedupes these and keeps state for them
    "message.recalled": Rule("message.recalled", True, "published as message.recalled, deduped by the recalled ids"),
    "group.message_recalled": Rule("group.message_recalled", True,
                                   "published as group.message_recalled, deduped by (group, recalled ids)"),
    "message.read_changed": Rule("message.read_changed", True,
                                 "published when owner_aid is this AID and the position advances"),
    "group.read_changed": Rule("group.read_changed", True,
                               "published when owner_aid is this AID and the position advances"),
    "group.invite_created": Rule("group.invite_received", True,
                                 "kept as a pending invite, published as group.invite_received"),
    "group.invite_finalized": Rule("group.invite_finalized", True, "ends the pending invite (not published)"),
    # live: the SDK passes these through
    "message.ack": Rule("message.ack", False, "passed through"),
    "push.offline_message": Rule("push.offline_message", False, "passed through"),
    "storage.object_changed": Rule("storage.object_changed", False, "passed through"),
    "stream/created": Rule("stream.created", False, "passed through (as stream/created)"),
    "stream/closed": Rule("stream.closed", False, "passed through (as stream/closed)"),
    "group.state_committed": Rule("group.state_committed", False, "checked against the state hash chain, not published"),
}
KEYS: dict[str, Callable[[str, dict[str, Any]], Keyed]] = {
    "message.recalled": _message_recalled, "group.message_recalled": _group_message_recalled,
    "message.read_changed": _read_changed("p2p"), "group.read_changed": _read_changed("group"),
    "group.invite_created": _invite(False), "group.invite_finalized": _invite(True),
}
assert set(KEYS) == {name for name, rule in RULES.items() if rule.durable}
DURABLE_KINDS = frozenset(r.kind for r in RULES.values() if r.durable)
LIVE_KINDS = frozenset({r.kind for r in RULES.values() if not r.durable} | {VOLATILE_KIND, OTHER_KIND})
FAMILIES = frozenset(p + "*" for p in PREFIX_KINDS)  # subscribe to a whole family: "app.*"


def rule_for(name: str) -> Rule:
    """The rule of a gateway event (its name without `event/`); an unnamed one is live `gateway.event`."""
    rule = RULES.get(name)
    if rule is not None:
        return rule
    if name.startswith(PREFIX_KINDS) and len(name) > max(len(p) for p in PREFIX_KINDS if name.startswith(p)):
        return Rule(name, False, "passed through (org.* and credential.* after the SDK verifies them)")
    return Rule(OTHER_KIND, False, "not handled by the SDK")


def durable_event(aid: str, name: str, params: Any) -> NewEvent | None:
    """The inbox row of a durable gateway event, or None when it lacks what its dedupe key needs
    (or names another AID). Never raises."""
    keyed = KEYS[name](aid, params) if isinstance(params, dict) else None
    if keyed is None:
        return None
    sender, key, data = keyed
    if len(key) > MAX_KEY_CHARS:
        key = key[:64] + "|" + hashlib.sha256(key.encode("utf-8", "replace")).hexdigest()
    return NewEvent(RULES[name].kind, sender[:512], key, 0, data)


def catch_up_events(aid: str, method: str, result: Any) -> list[tuple[str, dict[str, Any]]]:
    """(gateway event name, params) for what a catch-up call answered: a pending invite per invite
    id (the list groups them per group), a read position per state with `owner_aid` set."""
    out: list[tuple[str, dict[str, Any]]] = []
    if not isinstance(result, dict):
        return out
    if method == "group.list_my_invites":
        items = result.get("items", result.get("invites"))
        for item in items if isinstance(items, list) else []:
            if not isinstance(item, dict) or (_text(item.get("status")).lower() or "pending") != "pending":
                continue
            ids = item.get("invite_ids") if isinstance(item.get("invite_ids"), list) else [item.get("invite_id")]
            inviters = item.get("inviter_aids") if isinstance(item.get("inviter_aids"), list) else []
            for i, invite_id in enumerate(ids):
                one = dict(item, invite_id=invite_id, invite_ids=[invite_id], status="pending")
                if len(inviters) == len(ids):
                    one.update(inviter_aid=inviters[i], inviter_aids=[inviters[i]])
                out.append(("group.invite_created", one))
    elif method == "message.read_state":
        states = result.get("states")
        for state in states if isinstance(states, list) else []:
            if isinstance(state, dict):
                out.append(("message.read_changed", dict(state, owner_aid=aid, scope=state.get("scope") or "p2p")))
    return out


def is_volatile(params: Any) -> bool:
    """A message push of a volatile message (`storage: "volatile"` on the push or its inline row)."""
    if not isinstance(params, dict):
        return False
    row = params.get("inline_message")
    return params.get("storage") == "volatile" or (isinstance(row, dict) and row.get("storage") == "volatile")


def kind_matches(wanted: frozenset[str], kind: str) -> bool:
    return kind in wanted or any(kind.startswith(f[:-1]) for f in wanted if f in FAMILIES)


def is_known_kind(kind: str) -> bool:
    """A kind `subscribe` accepts besides the message and link kinds: the table's, a family, or one
    member of a family (`app.typing`)."""
    return kind in DURABLE_KINDS or kind in LIVE_KINDS or kind in FAMILIES or (
        kind.startswith(PREFIX_KINDS) and rule_for(kind).kind == kind)


class VolatileSeen:
    """(sender, message id) of volatile messages delivered, each until max(its expiry, now + 60 s),
    at most VOLATILE_SEEN_LIMIT (the oldest forgotten first)."""

    def __init__(self, now: Callable[[], float] = time.time, limit: int = VOLATILE_SEEN_LIMIT) -> None:
        self.now, self.limit = now, limit
        self._until: OrderedDict[tuple[str, str], float] = OrderedDict()

    def seen(self, key: tuple[str, str]) -> bool:
        until = self._until.get(key)
        if until is None:
            return False
        if until <= self.now():
            del self._until[key]
            return False
        return True

    def add(self, key: tuple[str, str], expires_at_ms: Any) -> None:
        now = self.now()
        expiry = expires_at_ms / 1000 if isinstance(expires_at_ms, int) and not isinstance(expires_at_ms, bool) \
            else now + VOLATILE_DEFAULT_SECONDS
        self._until[key] = max(now + VOLATILE_MIN_SECONDS, min(expiry, now + 86400.0))
        self._until.move_to_end(key)
        while len(self._until) > self.limit:
            self._until.popitem(last=False)


class GatewayEvents:
    """One link's durable gateway events (committed to the inbox by one task) and volatile messages
    (decrypted, deduped, published live, acked upstream). Live events need no task: the daemon
    publishes them from the reader."""

    def __init__(self, link: Any, session: Any, inbox: Any, publish: Callable[[str, str, dict[str, Any]], None],
                 *, now: Callable[[], float] = time.time) -> None:
        self.link, self.session, self.inbox, self.publish = link, session, inbox, publish
        self.aid = link.aid
        self.volatile_seen = VolatileSeen(now)
        self._send, self._recv = trio.open_memory_channel[tuple[str, str, Any]](EVENT_QUEUE)
        self._overflowed = False
        self.stats = {"durable": 0, "duplicates": 0, "malformed": 0, "volatile": 0, "volatile_duplicates": 0,
                      "dropped": 0}

    # called by the link's reader: never blocks
    def on_event(self, name: str, params: Any) -> None:
        what = "volatile" if name in MESSAGE_PUSHES else "durable"
        try:
            self._send.send_nowait((what, name, params))
        except trio.WouldBlock:
            self.stats["dropped"] += 1
            self._overflowed = True  # once the queue drains, a catch-up asks for what can be asked for
            log.warning("events.queue_full", aid=self.aid, gateway_event=name)

    def on_connected(self) -> None:
        """After a (re)connect: ask the gateway for what may have changed while we were away."""
        try:
            self._send.send_nowait(("catch_up", "", None))
        except trio.WouldBlock:
            self._overflowed = True

    async def run(self) -> None:
        while True:
            if self._overflowed and self._recv.statistics().current_buffer_used == 0:
                self._overflowed = False
                what, name, params = "catch_up", "", None
            else:
                what, name, params = await self._recv.receive()
            try:
                if what == "durable":
                    await self._durable(name, params)
                elif what == "catch_up":
                    await self.catch_up()
                else:
                    await self._volatile(params)
            except AundError as exc:  # storage full, gateway gone: said, and the next event goes on
                log.warning("events.failed", aid=self.aid, gateway_event=name, error=str(exc))
            except Exception as exc:  # a bug on odd input must not take the link (and the daemon) down
                log.error("events.failed", aid=self.aid, gateway_event=name, error=f"{type(exc).__name__}: {exc}"[:300])

    async def catch_up(self) -> None:
        """What the SDK restores after a connect, stored as the events it missed (each deduped
        against the push it may also have had): pending invites (`group.list_my_invites`, one
        event per invite, as they are pushed) and the AID's read positions (`message.read_state`)."""
        for method, params in (("group.list_my_invites", {"page": 1, "size": 200}), ("message.read_state", {})):
            try:
                result = await self.link.call(method, params, background=True)
            except AundError as exc:  # an older gateway without the method, or it is gone: the pushes remain
                log.info("events.catch_up_failed", aid=self.aid, method=method, error=str(exc)[:300])
                continue
            for name, item in catch_up_events(self.aid, method, result):
                await self._durable(name, item)

    async def _durable(self, name: str, params: Any) -> None:
        event = durable_event(self.aid, name, params)
        if event is None:
            self.stats["malformed"] += 1
            log.info("events.ignored", aid=self.aid, gateway_event=name,
                     reason="not for this AID or without the fields it is keyed by")
            return
        new = await self.inbox.commit(self.aid, [event])
        self.stats["durable" if new else "duplicates"] += 1
        log.debug("events.stored" if new else "events.duplicate", aid=self.aid, gateway_event=name, kind=event.kind)

    async def _volatile(self, params: Any) -> None:
        row = params.get("inline_message") if isinstance(params, dict) else None
        row = row if isinstance(row, dict) else params
        if not isinstance(row, dict):
            return
        sender = _text(row.get("from_aid") or row.get("sender_aid") or row.get("from")
                       or params.get("from_aid") or params.get("sender_aid")).lower()
        message_id = _text(row.get("message_id") or params.get("message_id"))
        cursor = _text(row.get("volatile_cursor") or params.get("volatile_cursor"))
        if not sender or not message_id:
            self.stats["malformed"] += 1
            log.info("events.ignored", aid=self.aid, gateway_event="volatile", reason="no sender or message id")
            return
        key = (sender, message_id)
        if self.volatile_seen.seen(key):
            self.stats["volatile_duplicates"] += 1
        else:
            event, spk_used = await self.session.decode_row(self.link.gateway, dict(row, seq=None), sender)
            data = dict(event.data, storage="volatile", volatile_cursor=cursor,
                        expires_at=row.get("expires_at"), created_at=row.get("created_at"))
            data.pop("seq", None)
            kind = VOLATILE_KIND if event.kind == "message.received" else event.kind
            self.volatile_seen.add(key, row.get("expires_at"))
            self.stats["volatile"] += 1
            log.debug("events.volatile", aid=self.aid, sender=sender, message_id=message_id, kind=kind)
            self.publish(self.aid, kind, data)
            if spk_used and spk_used == self.session.current_spk_id:
                await self.session.publish_prekey(self.link, rotate=True)
        if cursor:  # delivered (or already): the gateway may forget it
            try:
                await self.link.call("message.v2.ack", {"cursor_scope": "peer", "sender_aid": sender,
                                                        "volatile_cursors": [cursor],
                                                        "device_id": self.link.config.device_id,
                                                        "slot_id": self.link.config.slot_id}, background=True)
            except AundError as exc:
                log.info("events.volatile_ack_deferred", aid=self.aid, sender=sender, error=str(exc))
