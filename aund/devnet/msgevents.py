"""devnet: recall, read positions and volatile messages, and the events they push
(`event/message.recalled`, `event/message.read_changed`, volatile `event/peer.v2.message_received`).

- `message.recall {message_ids}`: the sender recalls messages it sent (to an AID of this devnet)
  within RECALL_WINDOW_SECONDS. Each receiver gets a tombstone in its message stream (a v1 row,
  `type: "message.recalled"`, so a pull finds it) and an `event/message.recalled` push on its long
  connections. Answer: `{success, accepted, recalled, errors: [{message_id, error}] | None}`
  (`not_found` / `not_sender` / `already_recalled` / `expired`).
- `group.recall {group_id, message_ids, reason?}`: the same for group messages (the sender's own,
  120 s); `event/group.message_recalled` to every member, without the production's two
  tombstones in the group's seq space.
- `message.read {states: [{scope, topic_key, last_read_message_id}]}` (or one state at the top):
  the AID's shared read position per topic, which only moves forward (order = the seq of that
  message in the AID's inbox; an id it never received is kept `unresolved` and not broadcast).
  An advance is pushed as `event/message.read_changed` to every long connection of the same AID
  (as the SDK expects: `owner_aid` is the receiving AID). `message.read_state` answers the states.
- `message.send` with `ttl` > 0 (clamped to 1..3600 s): not stored, no seq; pushed inline to the
  receiver's long connections with `storage: "volatile"`, a `volatile_cursor`, `created_at` and
  `expires_at`; kept in memory until it expires (a retry of the same id answers `duplicate`). A
  receiver's device and slot that has not acked one (`message.v2.ack` with `volatile_cursors`,
  `volatile_cursor` or `volatile_ids`) finds it in `message.v2.pull` pages (after
  `after_volatile_cursor`, within the page's limit, `volatile_has_more`) and its sender in
  `message.peers`; a devnet restart loses them, as production allows.

All of this is in memory except the tombstones (messages like any other).
"""
from __future__ import annotations

import heapq
import secrets
import time
from typing import TYPE_CHECKING, Any

from aund.aun import jsonrpc as rpc
from aund.devnet import federation
from aund.devnet import gateway as gw
from aund.devnet.gateway import RpcError
from aund.devnet.store import StoredMessage, dumps

if TYPE_CHECKING:
    from aund.devnet.gateway import Conn, Devnet

RECALL_WINDOW_SECONDS = 120.0
MAX_RECALL_IDS = 100
MAX_TTL_SECONDS = 3600
MAX_READ_STATES = 100
MAX_FIELD_CHARS = 128


def _state(net: "Devnet") -> dict[str, Any]:
    state = getattr(net, "msg_events", None)
    if state is None:
        # volatile: (to, from, message_id) -> item; by_to: to -> {key: item} (a receiver's own,
        # so a pull or `message.peers` looks at its messages only); expiry: (expires_at, key) heap
        state = net.msg_events = {"recalled": set(), "read": {}, "volatile": {}, "cursor": 0,
                                  "boot": secrets.token_hex(3), "by_to": {}, "expiry": []}
    return state


def push(net: "Devnet", aid: str, event: str, params: dict[str, Any]) -> int:
    """`event/{event}` to every long connection of `aid`; returns how many got it."""
    sent = 0
    for conn in list(net.live(aid)):
        if conn.kind != "long" or conn.closed:
            continue
        sent += _push_one(net, conn, event, dict(params, device_id=conn.device_id, slot_id=conn.slot_id))
    return sent


def _push_one(net: "Devnet", conn: "Conn", event: str, params: dict[str, Any]) -> int:
    """One push (twice while the replay fault is armed, as push_message does); 1 if it went out."""
    copies = 1
    if net.faults.replay_pushes > 0:
        net.faults.replay_pushes -= 1
        copies = 2
    ok = 0
    for _ in range(copies):
        if conn.push(rpc.notification("event/" + event, params)):
            net.stats.pushes += 1
            ok = 1
        else:
            net.stats.pushes_dropped += 1
    return ok


def push_http(net: "Devnet", body: bytes) -> tuple[int, Any, dict[str, str]]:
    """POST /devnet/push {"aid", "event", "params"}: push `event/{event}` with `params` as they are
    (any JSON value) to the AID's long connections (a test knob: events this devnet never makes)."""
    try:
        request = rpc.loads(body.decode("utf-8", "replace") or "{}")
    except rpc.FrameError as exc:
        return 400, {"error": str(exc)}, {}
    if not isinstance(request, dict) or not isinstance(request.get("aid"), str) \
            or not isinstance(request.get("event"), str) or not request["event"]:
        return 400, {"error": "body must be {aid, event, params}"}, {}
    aid = request["aid"].strip().lower()
    sent = 0
    for conn in list(net.live(aid)):
        if conn.kind == "long" and not conn.closed:
            sent += _push_one(net, conn, request["event"], request.get("params"))
    return 200, {"aid": aid, "event": request["event"], "sent": sent}, {}


# --- recall ---------------------------------------------------------------------------------------
def rpc_recall(conn: "Conn", params: dict[str, Any]) -> dict[str, Any]:
    ids = params.get("message_ids")
    if not isinstance(ids, list) or not ids or len(ids) > MAX_RECALL_IDS \
            or not all(isinstance(i, str) and i.strip() and len(i) <= MAX_FIELD_CHARS for i in ids):
        raise RpcError(rpc.INVALID_PARAMS, f"message_ids must be a list of 1..{MAX_RECALL_IDS} message ids")
    net, state = conn.net, _state(conn.net)
    now = time.time()
    errors: list[dict[str, str]] = []
    by_receiver: dict[str, list[str]] = {}
    for message_id in dict.fromkeys(i.strip() for i in ids):
        rows = net.store.db.execute("SELECT receiver, t_server FROM messages WHERE sender=? AND message_id=?",
                                    (conn.aid, message_id)).fetchall()
        if not rows:
            other = net.store.db.execute("SELECT 1 FROM messages WHERE message_id=? LIMIT 1", (message_id,)).fetchone()
            errors.append({"message_id": message_id, "error": "not_sender" if other else "not_found"})
            continue
        for receiver, t_server in rows:
            if (conn.aid, receiver, message_id) in state["recalled"]:
                errors.append({"message_id": message_id, "error": "already_recalled"})
            elif now - t_server / 1000 > RECALL_WINDOW_SECONDS:
                errors.append({"message_id": message_id, "error": "expired"})
            else:
                state["recalled"].add((conn.aid, receiver, message_id))
                by_receiver.setdefault(receiver, []).append(message_id)
    recalled = 0
    for receiver, recalled_ids in by_receiver.items():
        recalled += len(recalled_ids)
        tombstone = "recall-" + secrets.token_hex(12)
        body = {"type": "message.recalled", "kind": "message.recalled", "message_ids": recalled_ids,
                "recalled_by": conn.aid, "recalled_at": int(now * 1000)}
        msg, _ = net.store.append_message(receiver, conn.aid, conn.device_id, tombstone, "plain", dumps(body), False)
        push(net, receiver, "message.recalled", dict(
            body, message_id=tombstone, tombstone_message_id=tombstone, seq=msg.seq, timestamp=msg.t_server,
            **{"from": conn.aid, "from_aid": conn.aid, "sender_aid": conn.aid, "to": receiver}))
    return {"success": True, "accepted": len(ids), "recalled": recalled, "errors": errors or None}


def rpc_group_recall(conn: "Conn", params: dict[str, Any]) -> dict[str, Any]:
    """`group.recall {group_id, message_ids, reason?}`: the sender recalls its own group messages
    within RECALL_WINDOW_SECONDS; every member's long connections get `event/group.message_recalled`
    (no tombstones in the group's seq space here: the push only)."""
    from aund.devnet import groups as grp  # the group service (imported late: it imports the gateway)

    svc, gid = grp._ctx(conn, params)
    svc.require_member(gid, conn.aid)
    ids = params.get("message_ids")
    if not isinstance(ids, list) or not ids or len(ids) > MAX_RECALL_IDS \
            or not all(isinstance(i, str) and i.strip() and len(i) <= MAX_FIELD_CHARS for i in ids):
        raise RpcError(rpc.INVALID_PARAMS, f"message_ids must be a list of 1..{MAX_RECALL_IDS} message ids")
    reason = params.get("reason", "")
    if not isinstance(reason, str) or len(reason) > 255:
        raise RpcError(rpc.INVALID_PARAMS, "reason must be a string of at most 255 characters")
    state, now = _state(conn.net), time.time()
    recalled_set = state.setdefault("group_recalled", set())
    accepted, recalled, seqs, errors = [], [], [], []
    for message_id in dict.fromkeys(i.strip() for i in ids):
        row = svc.db.execute("SELECT seq, sender_aid, created_at FROM grp_messages WHERE group_id=? AND message_id=?",
                             (gid, message_id)).fetchone()
        error = ("not_found" if row is None else "not_sender" if row["sender_aid"] != conn.aid
                 else "already_recalled" if (gid, message_id) in recalled_set
                 else "expired" if now - row["created_at"] / 1000 > RECALL_WINDOW_SECONDS else "")
        if error:
            errors.append({"message_id": message_id, "error": error})
            continue
        accepted.append(message_id)
        recalled_set.add((gid, message_id))
        recalled.append(message_id)
        seqs.append(row["seq"])
    if recalled:
        tombstone = "grm-" + secrets.token_hex(12)
        body = {"module_id": "group", "type": "group.message_recalled", "kind": "group.message_recalled",
                "group_id": gid, "message_id": tombstone, "tombstone_message_id": tombstone, "message_ids": recalled,
                "target_message_seqs": seqs, "sender_aid": conn.aid, "recalled_by": conn.aid,
                "recalled_at": int(now * 1000), "timestamp": int(now * 1000), "reason": reason}
        for member in svc.members(gid):
            push(conn.net, member["aid"], "group.message_recalled", body)
    return {"success": True, "accepted": accepted, "recalled": recalled, "errors": errors}


# --- read positions -------------------------------------------------------------------------------
def _read_items(params: dict[str, Any]) -> list[dict[str, Any]]:
    if "states" in params:
        states = params["states"]
        if not isinstance(states, list) or not states or len(states) > MAX_READ_STATES:
            raise RpcError(rpc.INVALID_PARAMS, f"states must be a list of 1..{MAX_READ_STATES} read states")
    else:
        states = [params]
    out = []
    for item in states:
        if not isinstance(item, dict):
            raise RpcError(rpc.INVALID_PARAMS, "each read state is an object")
        scope = item.get("scope") or "p2p"
        topic, last = item.get("topic_key"), item.get("last_read_message_id")
        if scope != "p2p":
            raise RpcError(rpc.INVALID_PARAMS, "scope must be p2p")
        for name, value in (("topic_key", topic), ("last_read_message_id", last)):
            if not isinstance(value, str) or not value.strip() or len(value) > MAX_FIELD_CHARS:
                raise RpcError(rpc.INVALID_PARAMS, f"{name} must be a non-empty string of at most "
                                                   f"{MAX_FIELD_CHARS} characters")
        out.append({"scope": "p2p", "topic_key": topic, "last_read_message_id": last.strip()})
    return out


def rpc_read(conn: "Conn", params: dict[str, Any]) -> dict[str, Any]:
    items = _read_items(params)  # all checked before any is applied
    net, reads = conn.net, _state(conn.net)["read"]
    answers, updated, ignored = [], 0, 0
    for item in items:
        key = (conn.aid, item["topic_key"])
        row = net.store.db.execute("SELECT seq FROM messages WHERE receiver=? AND message_id=? ORDER BY seq LIMIT 1",
                                   (conn.aid, item["last_read_message_id"])).fetchone()
        order = row[0] if row else 0
        old = reads.get(key)
        changed = order > 0 and (old is None or order > old["last_read_order"])
        if changed:
            reads[key] = state = dict(item, owner_aid=conn.aid, last_read_order=order, updated_at=int(time.time() * 1000))
            push(net, conn.aid, "message.read_changed", state)
            updated += 1
        elif order == 0 and old is None:
            reads[key] = dict(item, owner_aid=conn.aid, last_read_order=0, updated_at=int(time.time() * 1000))
            updated += 1
        else:
            ignored += 1
        answers.append(dict(item, changed=changed))
    return {"updated": updated, "ignored": ignored, "states": answers}


def rpc_read_state(conn: "Conn", params: dict[str, Any]) -> dict[str, Any]:
    scope = params.get("scope") or "p2p"
    topic = params.get("topic_key")
    if scope != "p2p" or (topic is not None and not isinstance(topic, str)):
        raise RpcError(rpc.INVALID_PARAMS, "scope must be p2p and topic_key a string")
    if params.get("aid") not in (None, "", conn.aid):
        raise RpcError(rpc.PERMISSION_DENIED, "read state of another AID")
    states = []
    for (owner, key), state in sorted(_state(conn.net)["read"].items()):
        if owner == conn.aid and (topic is None or key == topic):
            states.append({k: v for k, v in state.items() if k != "owner_aid"}
                          | {"mapping_status": "resolved" if state["last_read_order"] else "unresolved"})
    result: dict[str, Any] = {"states": states}
    if len(states) == 1:
        result.update(states[0])
    return result


# --- volatile messages ----------------------------------------------------------------------------
def send_volatile(conn: "Conn", to: str, message_id: str, kind: str, body: str, need_render: bool,
                  sender_device: str, ttl: Any) -> dict[str, Any]:
    """`message.send` with ttl > 0: pushed, never stored."""
    if not isinstance(ttl, int) or isinstance(ttl, bool):
        raise RpcError(rpc.INVALID_PARAMS, "ttl must be an integer (seconds)")
    if federation.issuer_of(to) != conn.net.issuer:
        raise RpcError(rpc.INVALID_PARAMS, "this devnet does not route volatile messages to another issuer")
    net, state = conn.net, _state(conn.net)
    now_ms = int(time.time() * 1000)
    volatile = _live_volatile(state, now_ms)
    key = (to, conn.aid, message_id)
    known = volatile.get(key)
    if known is not None:
        return dict(known["answer"], status="duplicate")
    state["cursor"] += 1
    cursor = f"v1:{state['boot']}:{state['cursor']}"
    ttl = max(1, min(ttl, MAX_TTL_SECONDS))
    answer = {"message_id": message_id, "status": "accepted", "storage": "volatile", "volatile_cursor": cursor,
              "created_at": now_ms, "expires_at": now_ms + ttl * 1000, "delivery_mode": "fanout"}
    msg = StoredMessage(to, 0, conn.aid, sender_device, message_id, kind, body, need_render, now_ms, 0)
    volatile[key] = {"answer": answer, "msg": msg, "n": state["cursor"], "acked": set()}
    state["by_to"].setdefault(to, {})[key] = volatile[key]
    heapq.heappush(state["expiry"], (answer["expires_at"], key))
    for target in list(net.live(to)):
        if target.kind != "long" or target.closed:
            continue
        row = _volatile_row(volatile[key], target.device_id, target.slot_id, inline=True)
        if row is None:
            continue
        event = "peer.v2.message_received" if kind == "e2ee" else "message.received"
        extra = {k: row[k] for k in ("storage", "volatile_cursor", "created_at", "expires_at")}
        params = dict(extra, message_id=message_id, to=to, cursor_scope="peer", device_id=target.device_id,
                      target_device_id=target.device_id, slot_id=target.slot_id, sender_device_id=sender_device,
                      inline_message=row, **{"from": conn.aid, "from_aid": conn.aid, "sender_aid": conn.aid})
        _push_one(net, target, event, params)
    return answer


def _live_volatile(state: dict[str, Any], now_ms: int) -> dict[tuple[str, str, str], dict[str, Any]]:
    """The volatile messages not expired yet (the expired ones forgotten: only those, from the
    expiry heap, so a call costs what expired, not every volatile message of every AID)."""
    volatile, expiry, by_to = state["volatile"], state["expiry"], state["by_to"]
    while expiry and expiry[0][0] <= now_ms:
        _, key = heapq.heappop(expiry)
        item = volatile.get(key)
        if item is not None and item["answer"]["expires_at"] <= now_ms:
            del volatile[key]
            mine = by_to.get(key[0])
            if mine is not None:
                mine.pop(key, None)
                if not mine:
                    del by_to[key[0]]
    return volatile


def _volatile_row(item: dict[str, Any], device_id: str, slot_id: str, *, inline: bool) -> dict[str, Any] | None:
    row = gw.render_row(item["msg"], device_id, slot_id, inline=inline)
    if row is None:
        return None
    row.pop("seq", None)
    answer = item["answer"]
    row.update(storage="volatile", volatile_cursor=answer["volatile_cursor"], created_at=answer["created_at"],
               expires_at=answer["expires_at"])
    return row


def _cursor_number(cursor: Any, boot: str) -> int:
    """The position of a cursor of this boot ("v1:{boot}:{n}"); 0 for none or another boot's."""
    parts = cursor.split(":") if isinstance(cursor, str) else []
    return int(parts[2]) if len(parts) == 3 and parts[1] == boot and parts[2].isdigit() else 0


def _pending_volatile(conn: "Conn", sender: str | None) -> list[dict[str, Any]]:
    """The connection's unacked, unexpired volatile messages (from `sender`, or all), oldest first."""
    state = _state(conn.net)
    _live_volatile(state, int(time.time() * 1000))
    mine = (conn.device_id, conn.slot_key)
    return sorted((v for (_, frm, _), v in state["by_to"].get(conn.aid, {}).items()
                   if (sender is None or frm == sender) and mine not in v["acked"]),
                  key=lambda v: v["n"])


def volatile_senders(conn: "Conn") -> set[str]:
    """Senders with volatile messages this connection has not acked (`message.peers` lists them)."""
    return {v["msg"].sender for v in _pending_volatile(conn, None)}


def volatile_page(conn: "Conn", sender: str, params: dict[str, Any], room: int) -> tuple[list[dict[str, Any]], bool]:
    """Up to `room` volatile rows from `sender` after `after_volatile_cursor`, and whether more wait."""
    after = _cursor_number(params.get("after_volatile_cursor"), _state(conn.net)["boot"])
    items = [v for v in _pending_volatile(conn, sender) if v["n"] > after]
    rows = [r for r in (_volatile_row(v, conn.device_id, conn.slot_id, inline=False) for v in items[:room]) if r]
    return rows, len(items) > room


def volatile_ack(conn: "Conn", sender: str, params: dict[str, Any]) -> dict[str, Any] | None:
    """Apply the volatile part of a `message.v2.ack` (`volatile_cursors`, `volatile_cursor`,
    `volatile_ids`) for this connection's device and slot; its answer, None when there is none."""
    cursors = params.get("volatile_cursors")
    if cursors is None and isinstance(params.get("volatile_cursor"), str):
        cursors = [params["volatile_cursor"]]
    ids = params.get("volatile_ids")
    if cursors is None and ids is None:
        return None
    for value, name in ((cursors, "volatile_cursors"), (ids, "volatile_ids")):
        if value is not None and (not isinstance(value, list) or len(value) > 1000
                                  or not all(isinstance(c, str) and c for c in value)):
            raise RpcError(rpc.INVALID_PARAMS, f"{name} must be a list of strings")
    wanted_cursors, wanted_ids = set(cursors or ()), set(ids or ())
    accepted = 0
    for item in _pending_volatile(conn, sender):
        if item["answer"]["volatile_cursor"] in wanted_cursors or item["msg"].message_id in wanted_ids:
            item["acked"].add((conn.device_id, conn.slot_key))
            accepted += 1
    total = len(wanted_cursors) + len(wanted_ids)
    return {"accepted": accepted, "expired": max(0, total - accepted)}


gw.register({"group.recall": rpc_group_recall, "message.recall": rpc_recall, "message.read": rpc_read,
             "message.read_state": rpc_read_state}, __name__)
