"""devnet: gateway-to-gateway federation, as AUN's cross-domain routing does it.

Each devnet issues and serves only its own issuer's AIDs and groups. Between devnets that federate
(`--federate other.test=https://gateway.other.test`):

- P2P: a `message.send` to an AID of a federated issuer is handed to that issuer's devnet
  (`POST /federation/v1/deliver`), which stores it in the receiver's inbox, gives it the receiver's
  seq and pushes it, exactly as a local send; `message.v2.bootstrap` for a foreign peer asks the
  peer's devnet for its devices (`GET /federation/v1/devices/{aid}`, which also gives the current
  certificate).
- Groups live on the devnet of their issuer (the home). A member of another issuer calls its own
  devnet, which checks the call (connection, client signature) and forwards it to the home
  (`POST /federation/v1/group`) with the caller's identity, certificate and devices; the home runs
  the group handler for that caller and answers. Group calls naming a foreign AID (add, invite) or
  encrypting to foreign members (bootstrap) fetch those AIDs' certificates and devices from their
  devnets first. Group events and messages for a foreign member go to its devnet
  (`POST /federation/v1/push`, queued and sent in order by `run_pusher`), which pushes them to the
  member's connections, each with its own inline row. `group.list_my` / `group.list_my_invites`
  merge the answers of every federated devnet.

Clients fetch a foreign peer's certificate, chain, CRL and OCSP from the peer's own gateway
(discovery), never through ours. Admission: a request is accepted only for a local receiver or
group, and from an AID of an issuer this devnet federates with (the configured peers) that is not a
local one. Devnets do not authenticate one another (production binds federation to mutual TLS and
the sender's domain); they are test servers on loopback.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

import structlog
import trio

from aund.aun import ids
from aund.aun import jsonrpc as rpc
from aund.aun.http import http_request
from aund.devnet.store import dumps
from aund.errors import GatewayUnavailable

if TYPE_CHECKING:
    from aund.devnet.gateway import Devnet

TIMEOUT = 10.0
PUSH_QUEUE = 4096  # federated pushes waiting for the pusher; past it they are dropped (and counted)
GROUP_LOCAL_ONLY = frozenset({"group.create"})  # a group is created on the creator's own devnet
GROUP_MERGED = frozenset({"group.list_my", "group.list", "group.list_my_invites"})

log = structlog.get_logger("aund.devnet")


class FederationError(Exception):
    """The other devnet could not be reached or refused (the message says which)."""


def parse_peers(specs: list[str]) -> dict[str, str]:
    """`ISSUER=URL` strings -> {issuer: base url}; ValueError naming a bad one."""
    peers: dict[str, str] = {}
    for spec in specs:
        issuer, sep, url = spec.partition("=")
        issuer, url = issuer.strip().lower(), url.strip().rstrip("/")
        if not sep or not issuer or not url.startswith(("http://", "https://")):
            raise ValueError(f"--federate takes ISSUER=http(s)://HOST[:PORT], got {spec!r}")
        peers[issuer] = url
    return peers


def issuer_of(aid: str) -> str:
    return aid.partition(".")[2]


async def _call(method: str, url: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
    try:
        status, _, data = await http_request(method, url, body=dumps(body).encode() if body is not None else b"",
                                             headers=[("Content-Type", "application/json")], timeout=TIMEOUT)
    except GatewayUnavailable as exc:
        raise FederationError(str(exc)) from None
    try:
        answer = rpc.loads(data.decode("utf-8")) if data else {}
    except (rpc.FrameError, UnicodeDecodeError):
        answer = {}
    if status != 200 or not isinstance(answer, dict):
        raise FederationError(f"{method} {url}: HTTP {status} {answer.get('error', '') if isinstance(answer, dict) else ''}")
    return answer


async def deliver(net: "Devnet", url: str, message: dict[str, Any]) -> dict[str, Any]:
    return await _call("POST", f"{url}/federation/v1/deliver", message)


async def devices(net: "Devnet", url: str, aid: str) -> list[dict[str, Any]]:
    found = (await material(net, aid, url)).get("devices")
    return found if isinstance(found, list) else []


async def material(net: "Devnet", aid: str, url: str | None = None) -> dict[str, Any]:
    """{"cert": PEM | None, "devices": [...]} of a federated AID, from its own devnet."""
    url = url or net.federation.get(issuer_of(aid))
    if url is None:
        raise FederationError(f"this devnet does not federate with the issuer of {aid}")
    return await _call("GET", f"{url}/federation/v1/devices/{aid}")


def local_material(net: "Devnet", aid: str) -> dict[str, Any]:
    """What `GET /federation/v1/devices/{aid}` answers for a local AID (nothing once it is revoked)."""
    devices = net.devices(aid)
    return {"aid": aid, "devices": devices, "cert": net.store.current_cert(aid) if devices else None}


# --- groups: the member's side ---------------------------------------------------------------------
def group_issuer(net: "Devnet", params: dict[str, Any]) -> str | None:
    """The issuer a group call's group lives under (its group_id, else its invite_id); None if neither."""
    raw = params.get("group_id") or params.get("group_aid")
    if isinstance(raw, str) and raw.strip():
        from aund.devnet.groups import normalize_group_id

        return issuer_of(normalize_group_id(raw, net.issuer))
    if isinstance(params.get("invite_id"), str):
        return issuer_of(params["invite_id"].lower())  # inv-<hex>.<home issuer>
    return None


def group_home(net: "Devnet", method: str, params: dict[str, Any]) -> str | None:
    """The base URL of the federated devnet a group call belongs to; None when it is ours."""
    if not method.startswith("group.") or method in GROUP_LOCAL_ONLY | GROUP_MERGED:
        return None
    issuer = group_issuer(net, params)
    return net.federation.get(issuer) if issuer not in (None, net.issuer) else None


async def call_group(conn: Any, url: str, method: str, params: dict[str, Any]) -> dict[str, Any]:
    """Run a group call on the group's home devnet for this connection's identity."""
    from aund.devnet.gateway import RpcError

    body = {"actor": {"aid": conn.aid, "device_id": conn.device_id, "slot_id": conn.slot_id},
            "material": local_material(conn.net, conn.aid), "method": method, "params": params}
    try:
        answer = await _call("POST", f"{url}/federation/v1/group", body)
    except FederationError as exc:
        raise RpcError(rpc.INTERNAL_ERROR, f"the group's home gateway refused or cannot be reached: {exc}") from None
    error = answer.get("error")
    if isinstance(error, dict):
        raise RpcError(int(error.get("code", rpc.INTERNAL_ERROR)), str(error.get("message", "")), error.get("data"))
    result = answer.get("result")
    return result if isinstance(result, dict) else {}


async def merge_lists(conn: Any, method: str, params: dict[str, Any], result: dict[str, Any]) -> dict[str, Any]:
    """`group.list_my` / `list_my_invites`: our answer plus every federated devnet's for this caller."""
    if method not in GROUP_MERGED or not conn.net.federation:
        return result
    items = list(result.get("items") or [])
    total = int(result.get("total") or len(items))
    for issuer, url in sorted(conn.net.federation.items()):
        try:
            other = await call_group(conn, url, method, params)
        except Exception as exc:  # noqa: BLE001 - one unreachable devnet must not hide our own groups
            log.warning("devnet.federation_unreachable", issuer=issuer, method=method, error=str(exc))
            continue
        found = [x for x in other.get("items") or [] if isinstance(x, dict)]
        items += found
        total += int(other.get("total") or len(found))
    key = "invites" if method == "group.list_my_invites" else "groups"
    return dict(result, items=items, total=total, **{key: items})


# --- groups: the home's side -----------------------------------------------------------------------
class FederatedActor:
    """The caller of a forwarded group call, as the group handlers see a connection."""

    kind = "federated"
    closed = False

    def __init__(self, net: "Devnet", aid: str, device_id: str, slot_id: str, cert: Any) -> None:
        self.net, self.aid, self.device_id, self.slot_id = net, aid, device_id, slot_id
        self.slot_key = ids.slot_isolation_key(slot_id)
        self._cert = cert

    def own_cert(self) -> Any:
        return self._cert

    def checked_prekey(self, params: dict[str, Any]) -> tuple[str, str, str, int]:
        from aund.devnet.gateway import checked_prekey

        return checked_prekey(params, self._cert)


async def accept_group_call(net: "Devnet", body: bytes) -> tuple[int, dict[str, Any]]:
    """The home side of `call_group`: (HTTP status, {"result"} or {"error"})."""
    from aund.devnet import groups
    from aund.devnet.gateway import RpcError
    from aund.identity import pki

    try:
        msg = rpc.loads(body.decode("utf-8"))
        actor, method, params = msg["actor"], str(msg["method"]), msg["params"]
        aid, device_id, slot_id = str(actor["aid"]).lower(), str(actor["device_id"]), str(actor.get("slot_id") or "")
    except (rpc.FrameError, UnicodeDecodeError, KeyError, TypeError):
        return 400, {"error": "malformed group call"}
    if issuer_of(aid) == net.issuer or issuer_of(aid) not in net.federation:
        return 403, {"error": f"this devnet does not federate with the issuer of {aid}"}
    if not isinstance(params, dict) or method not in groups.GROUP_HANDLERS or method in GROUP_LOCAL_ONLY:
        return 400, {"error": f"not a federated group method: {method}"}
    if method not in GROUP_MERGED and group_issuer(net, params) not in (None, net.issuer):
        return 404, {"error": "that group does not live here"}
    svc = groups.service(net)
    svc.remember(aid, msg.get("material"))
    pem = svc.cert_pem(aid)
    if pem is None:
        return 403, {"error": f"{aid} has no current certificate"}
    caller = FederatedActor(net, aid, device_id, slot_id, pki.load_cert_pem(pem))
    net.stats.http["federation.group_calls"] += 1
    try:
        await groups.prepare(net, method, params)
        result = groups.GROUP_HANDLERS[method](caller, params)
        if hasattr(result, "__await__"):
            result = await result
    except RpcError as exc:
        return 200, {"error": {"code": exc.code, "message": exc.message, "data": exc.data}}
    return 200, {"result": result}


# --- group pushes to members of other issuers -------------------------------------------------------
def push_foreign(net: "Devnet", aid: str, method: str, params: dict[str, Any],
                 inline: dict[str, dict[str, Any]] | None, skip_device: str) -> bool:
    """Queue one event for a federated member (inline: device_id -> row, "" for any device)."""
    url = net.federation.get(issuer_of(aid))
    if url is None:
        return False
    item = (url, {"aid": aid, "method": method, "params": params, "inline": inline, "skip_device": skip_device})
    try:
        net.federation_outbox[0].send_nowait(item)
    except (trio.WouldBlock, trio.ClosedResourceError):  # a full queue, or the devnet is stopping
        net.stats.pushes_dropped += 1
        return False
    return True


async def run_pusher(net: "Devnet") -> None:
    """Send queued federated pushes in order; one that cannot be delivered is logged and dropped
    (the member's client catches up by pulling, as after any lost push)."""
    async for url, item in net.federation_outbox[1]:
        try:
            await _call("POST", f"{url}/federation/v1/push", item)
        except FederationError as exc:
            net.stats.pushes_dropped += 1
            log.warning("devnet.federation_push_failed", aid=item["aid"], method=item["method"], error=str(exc))


def accept_push(net: "Devnet", body: bytes) -> tuple[int, dict[str, Any]]:
    """The member side of `push_foreign`: push to the AID's connections, each with its own row."""
    from aund.devnet import groups

    try:
        msg = rpc.loads(body.decode("utf-8"))
        aid, method, params = str(msg["aid"]).lower(), str(msg["method"]), msg["params"]
        inline, skip_device = msg.get("inline"), str(msg.get("skip_device") or "")
    except (rpc.FrameError, UnicodeDecodeError, KeyError, TypeError):
        return 400, {"error": "malformed push"}
    if issuer_of(aid) != net.issuer or not isinstance(params, dict) or not method.startswith("group."):
        return 400, {"error": "a federated push is a group event for a local AID"}
    home = issuer_of(str(params.get("group_id") or "").lower())
    if home == net.issuer or home not in net.federation:
        return 403, {"error": f"this devnet does not federate with {home or 'that group'}"}
    rows = None
    if isinstance(inline, dict):
        rows = lambda device, slot: inline.get(device) or inline.get("")  # noqa: E731
    sent = groups.service(net).push_to(aid, method, params, rows=rows, skip_device=skip_device)
    return 200, {"pushed": sent}


def accept_delivery(net: "Devnet", body: bytes) -> tuple[int, dict[str, Any]]:
    """The receiving side of `deliver`: (HTTP status, answer)."""
    from aund.devnet.gateway import MAX_PAYLOAD_BYTES

    try:
        msg = rpc.loads(body.decode("utf-8"))
        to, sender = str(msg["to"]).lower(), str(msg["from"]).lower()
        sender_device, message_id, kind = str(msg["sender_device_id"]), str(msg["message_id"]), str(msg["kind"])
        payload, need_render = msg["payload"], bool(msg.get("need_render", True))
    except (rpc.FrameError, UnicodeDecodeError, KeyError, TypeError):
        return 400, {"error": "malformed delivery"}
    if issuer_of(to) != net.issuer or net.store.current_cert(to) is None:
        return 404, {"error": f"unknown target aid: {to}"}
    if issuer_of(sender) == net.issuer or issuer_of(sender) not in net.federation:
        return 403, {"error": f"this devnet does not federate with the issuer of {sender}"}
    if kind not in ("plain", "e2ee") or not isinstance(payload, dict):
        return 400, {"error": "malformed delivery"}
    text = dumps(payload)
    if len(text.encode("utf-8")) > MAX_PAYLOAD_BYTES:
        return 413, {"error": "payload larger than 1 MB"}
    stored, created = net.store.append_message(to, sender, sender_device, message_id, kind, text, need_render)
    if created:
        net.push_message(stored)
    net.stats.http["federation.delivered"] += 1
    return 200, {"seq": stored.seq, "timestamp": stored.t_server, "created": created}


# --- thoughts -------------------------------------------------------------------------------------
async def read_thought(conn: Any, url: str, params: dict[str, Any]) -> dict[str, Any]:
    """`message.thought.get` of a sender of a federated issuer, answered by its devnet for our caller."""
    from aund.devnet.gateway import RpcError

    try:
        answer = await _call("POST", f"{url}/federation/v1/thought", {"reader": conn.aid, "params": params})
    except FederationError as exc:
        raise RpcError(rpc.INTERNAL_ERROR, f"the sender's gateway refused or cannot be reached: {exc}") from None
    error = answer.get("error")
    if isinstance(error, dict):
        raise RpcError(int(error.get("code", rpc.INTERNAL_ERROR)), str(error.get("message", "")), error.get("data"))
    result = answer.get("result")
    return result if isinstance(result, dict) else {}


def accept_thought_read(net: "Devnet", body: bytes) -> tuple[int, dict[str, Any]]:
    from aund.devnet import thoughts
    from aund.devnet.gateway import RpcError

    try:
        msg = rpc.loads(body.decode("utf-8"))
        reader, params = str(msg["reader"]).lower(), msg["params"]
    except (rpc.FrameError, UnicodeDecodeError, KeyError, TypeError):
        return 400, {"error": "malformed thought read"}
    if issuer_of(reader) == net.issuer or issuer_of(reader) not in net.federation or not isinstance(params, dict):
        return 403, {"error": f"this devnet does not federate with the issuer of {reader}"}
    try:
        return 200, {"result": thoughts.read(net, reader, params)}
    except RpcError as exc:
        return 200, {"error": {"code": exc.code, "message": exc.message, "data": exc.data}}
