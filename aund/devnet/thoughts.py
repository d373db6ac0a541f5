"""devnet: thoughts (`message.thought.*`, and the heads `group.thought.*` keeps in groups.py).

A thought is not a message: no seq, no push, no pull, no ack, kept in memory only. Each sender
keeps, per conversation (a peer AID, or a group), the heads of its last THOUGHT_HEADS_PER_SENDER
contexts (`context.type` + `context.id`), each with its last THOUGHT_ITEMS_PER_HEAD items; a
reader gets the current head whole. P2P thoughts are E2EE v2 `e2ee.p2p_encrypted` envelopes
whose message id is the thought id (plaintext is refused), readable by the sender and the peer.

Federation: a thought lives on the devnet of its sender; `message.thought.get` for a sender of a
federated issuer is answered by that devnet (`POST /federation/v1/thought`), with
`cross_domain: true` and `target_issuer` as production adds them.
"""
from __future__ import annotations

import secrets
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from aund.aun import jsonrpc as rpc
from aund.devnet import federation
from aund.devnet import gateway as gw
from aund.devnet.gateway import RpcError, validate_aid
from aund.devnet.store import dumps

if TYPE_CHECKING:
    from aund.devnet.gateway import Conn, Devnet

THOUGHT_ITEMS_PER_HEAD = 20
THOUGHT_HEADS_PER_SENDER = 100
MAX_THOUGHT_BYTES = 256 * 1024


@dataclass
class Thought:
    items: list[dict[str, Any]] = field(default_factory=list)
    updated_at: int = 0


def context_of(params: dict[str, Any]) -> tuple[tuple[str, str], dict[str, Any]]:
    """((type, id), the context object) of a thought call; INVALID_PARAMS without both."""
    ctx = params.get("context")
    if not isinstance(ctx, dict) or not isinstance(ctx.get("type"), str) or not isinstance(ctx.get("id"), str) \
            or not ctx["type"].strip() or not ctx["id"].strip():
        raise RpcError(rpc.INVALID_PARAMS, "context.type and context.id are required")
    return (ctx["type"], ctx["id"]), {"type": ctx["type"], "id": ctx["id"]}


def keep(heads: dict[tuple[str, str], Thought], key: tuple[str, str], item: dict[str, Any], now: int) -> Thought:
    """Append `item` to the head `key` (replacing an item of the same thought_id), newest head last,
    within the per-head and per-sender bounds; returns the head."""
    head = heads.pop(key, None) or Thought()
    head.items = [i for i in head.items if i["thought_id"] != item["thought_id"]][-(THOUGHT_ITEMS_PER_HEAD - 1):]
    head.items.append(item)
    head.updated_at = now
    heads[key] = head
    while len(heads) > THOUGHT_HEADS_PER_SENDER:
        heads.pop(next(iter(heads)))
    return head


def _store(net: "Devnet") -> dict[tuple[str, str], dict[tuple[str, str], Thought]]:
    """(sender, peer) -> heads, on the devnet object (made on first use)."""
    return net.services.setdefault("thoughts", {})


def rpc_put(conn: "Conn", params: dict[str, Any]) -> dict[str, Any]:
    to = validate_aid(params.get("to"))
    key, ctx = context_of(params)
    envelope = params.get("payload")
    if params.get("encrypted") is not True or not isinstance(envelope, dict) \
            or envelope.get("type") != "e2ee.p2p_encrypted" or envelope.get("version") != "v2":
        raise RpcError(rpc.INVALID_PARAMS, "message.thought.put carries an encrypted e2ee.p2p_encrypted v2 payload")
    thought_id = gw.str_param(params, "thought_id", required=False) or "mt-" + secrets.token_hex(16)
    aad = envelope.get("aad")
    if not isinstance(aad, dict) or aad.get("from") != conn.aid or aad.get("message_id") != thought_id:
        raise RpcError(rpc.INVALID_PARAMS, "envelope aad.from / aad.message_id do not match the sender and thought_id")
    if len(dumps(envelope).encode("utf-8")) > MAX_THOUGHT_BYTES:
        raise RpcError(rpc.INVALID_PARAMS, f"a thought is at most {MAX_THOUGHT_BYTES} bytes")
    if federation.issuer_of(to) not in conn.net.federation and conn.net.store.current_cert(to) is None:
        raise RpcError(rpc.NOT_FOUND, f"unknown target aid: {to}")
    now = int(time.time() * 1000)
    timestamp = params.get("timestamp") if isinstance(params.get("timestamp"), int) else now
    head = keep(_store(conn.net).setdefault((conn.aid, to), {}), key, {
        "thought_id": thought_id, "message_id": thought_id, "context": ctx, "payload": envelope,
        "from": conn.aid, "to": to, "created_at": now, "timestamp": timestamp}, now)
    return {"sender_aid": conn.aid, "peer_aid": to, "to": to, "context": ctx, "thought_id": thought_id,
            "stored_count": len(head.items), "updated_at": now}


def read(net: "Devnet", reader: str, params: dict[str, Any]) -> dict[str, Any]:
    """`message.thought.get` for `reader` on the sender's own devnet."""
    sender = validate_aid(params.get("sender_aid"))
    peer = validate_aid(params.get("peer_aid") or params.get("to") or reader)
    key, ctx = context_of(params)
    if reader not in (sender, peer):
        raise RpcError(rpc.PERMISSION_DENIED, "only the sender and the peer of a thought may read it")
    head = _store(net).get((sender, peer), {}).get(key)
    base = {"sender_aid": sender, "peer_aid": peer, "context": ctx}
    if head is None:
        return dict(base, found=False, thoughts=[])
    return dict(base, found=True, thoughts=[dict(i) for i in head.items], updated_at=head.updated_at)


async def rpc_get(conn: "Conn", params: dict[str, Any]) -> dict[str, Any]:
    sender = validate_aid(params.get("sender_aid"))
    issuer = federation.issuer_of(sender)
    remote = conn.net.federation.get(issuer) if issuer != conn.net.issuer else None
    if remote is None:
        return read(conn.net, conn.aid, params)
    answer = await federation.read_thought(conn, remote, params)
    return dict(answer, cross_domain=True, target_issuer=issuer)


gw.register({"message.thought.put": rpc_put, "message.thought.get": rpc_get}, __name__)
