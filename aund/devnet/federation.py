"""devnet: gateway-to-gateway federation for P2P messages, as AUN's cross-domain routing does it.

Each devnet issues and serves only its own issuer's AIDs. A `message.send` to an AID of a
federated issuer (`--federate other.test=https://gateway.other.test`) is handed to that issuer's
devnet over HTTP (`POST /federation/v1/deliver`), which stores it in the receiver's inbox, gives it
the receiver's seq and pushes it, exactly as a local send; `message.v2.bootstrap` for a foreign
peer asks the peer's devnet for its devices (`GET /federation/v1/devices/{aid}`). Clients fetch a
foreign peer's certificate, chain, CRL and OCSP from the peer's own gateway (discovery), never
through ours.

Admission: a delivery is accepted only for a local receiver and from a sender of an issuer this
devnet federates with (the configured peers), and the sender must not be a local AID. Groups are
not federated yet.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

from aund.aun import jsonrpc as rpc
from aund.aun.http import http_request
from aund.devnet.store import dumps
from aund.errors import GatewayUnavailable

if TYPE_CHECKING:
    from aund.devnet.gateway import Devnet

TIMEOUT = 10.0


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
    answer = await _call("GET", f"{url}/federation/v1/devices/{aid}")
    found = answer.get("devices")
    return found if isinstance(found, list) else []


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
