"""devnet: group identities, as production's group service, CA and name service serve them.

A group AID is the group id (`{base}.{issuer}`) with a key of its own: the owner's SDK makes the
key and keeps it, the devnet's issuer CA certifies it (`key_purpose` "group_identity" in the
certificate store, served by `/pki/cert/{group_aid}`), and the group's card (agent.md of
`type: "group"`) is signed with the group key and uploaded with the owner's access token.

- `group.create {group_name, public_key, curve}`: a named group `{group_name}.{issuer}` with its
  certificate (`aid_cert`); the same name and key by the same owner replays the result.
- `group.bind_group_aid {group_id, public_key, curve}`: the certificate of an anonymous group
  (owner only; the same key again answers the same certificate, another key is refused).
- `group.renew_group_aid {group_id, group_aid?, old_public_key, new_public_key, curve, renew_proof}`:
  the owner's rekey, proven with the old group key (nonce single use, issued_ms within 300 s);
  the old certificate is revoked (CRL, OCSP) and stays served by fingerprint.
- admission (`--group-identity-check`): a client declaring `agent_md_validation_v1` gets -32003
  on a group's RPCs until the group has a certificate and a card of it.
- the card: `PUT /agent.md` (Host: the group AID) checked by `agent_md.validate_entity` against
  the group's current owner and certificate; `GET` with `X-AUN-Ownership-Check: 1` answers the
  owner projection headers (also on the 404 before the first upload).
- dissolution revokes the certificate; owner transfer moves the owner projection and, for a group
  with an identity, rekeys it to the new owner's key (`group.complete_transfer {public_key}`).

Imported by aund.devnet.groups at its end (the handlers register themselves there).
"""
from __future__ import annotations

import hashlib
import re
import sqlite3
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from cryptography import x509

from aund.aun import jsonrpc as rpc
from aund.devnet import groups as g
from aund.devnet.gateway import RpcError, log
from aund.devnet.pki import der_sha256_hex, serial_hex
from aund.identity import agent_md as agent_md_doc
from aund.identity import pki

if TYPE_CHECKING:
    from aund.devnet.gateway import Conn, Devnet

KEY_PURPOSE = "group_identity"
# After a new group certificate the owner's own group calls pass for `Devnet.group_card_grace`
# seconds (--group-card-grace) before its card must follow (a card that was published and is gone
# again gets no grace: only the first card after a new certificate): the SDK's background calls race its
# create/bind/renew flow, which publishes the card right after the certificate; refusing them makes
# its recovery publish first and the flow's own If-None-Match upload fail.
PROOF_WINDOW_MS = 300_000  # a renew_proof / transfer proof's issued_ms may be this far from the devnet's clock
GROUP_NAME_RE = re.compile(r"[a-z0-9][a-z0-9_-]{3,63}")
NONCE_RE = re.compile(r"[A-Za-z0-9_-]{8,128}")
#: group RPCs served before the group has an identity (creation, binding and reading what it is)
ADMISSION_EXEMPT = frozenset({
    "group.create", "group.bind_group_aid", "group.renew_group_aid", "group.get_info", "group.list_my",
    "group.list", "group.search", "group.list_my_invites", "group.complete_transfer", "group.dissolve",
    "group.leave", "group.accept_invite", "group.reject_invite", "group.request_join",
    # background reads the SDK makes on the pushes that follow its own group.create, between the
    # certificate and the card (measured: get_online_members); a -32003 there makes its recovery
    # publish the card first and create_group's own upload (If-None-Match: *) then fails, so
    # production cannot gate them
    "group.pull_events", "group.ack_events", "group.get_online_members",
})
SCHEMA = """
CREATE TABLE IF NOT EXISTS grp_identity_nonces (
    group_id TEXT NOT NULL, purpose TEXT NOT NULL, nonce TEXT NOT NULL, issued_ms INTEGER NOT NULL,
    PRIMARY KEY (group_id, purpose, nonce));
"""


def _ensure_schema(net: Devnet) -> None:
    if not net.services.get("group_identity_schema"):
        net.store.db.executescript(SCHEMA)
        net.services["group_identity_schema"] = True


# --- the certificate -------------------------------------------------------------------------------
def current_cert(net: Devnet, group_id: str) -> x509.Certificate | None:
    """The group's current, unrevoked group identity certificate; None when it has none."""
    state = net.store.cert_state(group_id)
    if state is None or state["key_purpose"] != KEY_PURPOSE or state["revoked_at"] is not None:
        return None
    return pki.load_cert_pem(state["pem"])


def aid_cert_view(net: Devnet, cert: x509.Certificate) -> dict[str, Any]:
    """The `aid_cert` object of a create / bind / renew / transfer result."""
    return {"cert": pki.cert_pem(cert), "ca_cert": pki.cert_pem(net.ca.issuer_cert),
            "ca_chain": [pki.cert_pem(c) for c in net.ca.ca_chain], "cert_sn": serial_hex(cert), "curve": "P-256",
            "agentid": pki.cert_aid(cert), "key_purpose": KEY_PURPOSE, "cert_fingerprint": pki.cert_fingerprint(cert)}


def _issue(net: Devnet, group_id: str, public_key: Any, *, replace: bool = False) -> x509.Certificate:
    """Certify `public_key` as the group's (with `replace`, the certificate it had is revoked)."""
    cert = net.ca.issue(group_id, public_key, ttl=net.cert_ttl)
    net.store.add_cert(group_id, serial_hex(cert), der_sha256_hex(cert), pki.spki_fingerprint(public_key)[7:],
                       pki.cert_pem(cert), KEY_PURPOSE, revoke_previous=replace)
    log.info("devnet.group_cert_issued", group_aid=group_id, serial=serial_hex(cert), rekey=replace)
    return cert


def _public_key(params: dict[str, Any], key: str) -> tuple[str, Any]:
    """(the base64 text as sent, the P-256 key) of a param; -32602 when it is not one."""
    text = params.get(key)
    if not isinstance(text, str) or not text.strip():
        raise RpcError(rpc.INVALID_PARAMS, f"missing param: {key}")
    curve = params.get("curve", "P-256")
    if curve not in (None, "", "P-256"):
        raise RpcError(rpc.INVALID_PARAMS, "only curve P-256 is supported")
    try:
        return text, pki.load_public_key_b64(text.strip())
    except pki.PKIError as exc:
        raise RpcError(rpc.INVALID_PARAMS, f"{key}: {exc}") from None


def _same_key(cert: x509.Certificate, public_key: Any) -> bool:
    return pki.spki_der(cert.public_key()) == pki.spki_der(public_key)


def _result(svc: g.GroupService, group_id: str, cert: x509.Certificate, caller: str, **extra: Any) -> dict[str, Any]:
    group = svc.group(group_id)
    member = svc.member(group_id, caller)
    return {"group": svc.group_view(group, member["role"] if member else None), "group_id": group_id,
            "group_aid": group_id, "aid_cert": aid_cert_view(svc.net, cert), **extra}


def _owned(conn: Conn, params: dict[str, Any]) -> tuple[g.GroupService, str]:
    """(service, group id) of a group the caller owns and that is not dissolved; a `group_aid`
    param, when given, must name the same group."""
    svc, gid = g._ctx(conn, params)
    if params.get("group_aid") not in (None, "") and g.normalize_group_id(params["group_aid"], conn.net.issuer) != gid:
        raise RpcError(rpc.INVALID_PARAMS, "group_aid does not name the group of group_id")
    svc.require_member(gid, conn.aid, ("owner",))
    return svc, gid


# --- group.create (named), group.bind_group_aid, group.renew_group_aid ------------------------------
def create_named(conn: Conn, params: dict[str, Any]) -> dict[str, Any]:
    """`group.create {group_name, public_key, curve}`: the group `{group_name}.{issuer}` and its certificate."""
    raw = params.get("group_name")
    if not isinstance(raw, str) or not raw.strip():
        raise RpcError(rpc.INVALID_PARAMS, "a named group needs group_name with its public_key")
    name = raw.strip().lower()
    if not GROUP_NAME_RE.fullmatch(name) or name.startswith(("guest", "g-")) or name.isdigit():
        raise RpcError(rpc.INVALID_PARAMS, "group_name must be 4-64 of [a-z0-9_-], start with a letter or digit, "
                                           "not all digits, and not start with guest or g-")
    _, public_key = _public_key(params, "public_key")
    gid = f"{name}.{conn.net.issuer}"
    requested = params.get("group_aid") or params.get("group_id")
    if requested and g.normalize_group_id(requested, conn.net.issuer) != gid:
        raise RpcError(rpc.INVALID_PARAMS, "group_aid / group_id do not match group_name")
    svc = g.service(conn.net)
    existing = conn.net.store.cert_state(gid)
    row = svc.db.execute("SELECT owner_aid, creator_aid FROM grp_groups WHERE group_id=?", (gid,)).fetchone()
    if row is not None:
        cert = current_cert(conn.net, gid)
        if row["creator_aid"] == conn.aid and row["owner_aid"] == conn.aid and cert is not None \
                and _same_key(cert, public_key):
            return _result(svc, gid, cert, conn.aid, aid=conn.aid)  # the SDK's retry: the committed result
        raise RpcError(g.GROUP_STATE_INVALID, f"group_name already taken: {gid}")
    if existing is not None:
        raise RpcError(g.GROUP_STATE_INVALID, f"group_name already taken: {gid} (an AID of that name exists)")
    display = g._text(params, "name", limit=128).strip() or name
    g.create_group(conn, params, display, gid)
    cert = _issue(conn.net, gid, public_key)
    return _result(svc, gid, cert, conn.aid, aid=conn.aid)


@g.handler("group.bind_group_aid")
def rpc_bind_group_aid(conn: Conn, params: dict[str, Any]) -> dict[str, Any]:
    svc, gid = _owned(conn, params)
    _, public_key = _public_key(params, "public_key")
    cert = current_cert(conn.net, gid)
    if cert is not None:
        if not _same_key(cert, public_key):
            raise RpcError(rpc.CONFLICT, f"group_aid_already_bound_different_key: {gid} is bound to another key "
                                         "(group.renew_group_aid changes it)",
                           {"code": "group_aid_already_bound_different_key"})
        return _result(svc, gid, cert, conn.aid, status="already_bound")
    if conn.net.store.cert_state(gid) is not None:  # a signing AID of that name, or a revoked identity
        raise RpcError(rpc.CONFLICT, f"{gid} already has a certificate that is not a live group identity")
    return _result(svc, gid, _issue(conn.net, gid, public_key), conn.aid, status="bound")


@g.handler("group.renew_group_aid")
def rpc_renew_group_aid(conn: Conn, params: dict[str, Any]) -> dict[str, Any]:
    svc, gid = _owned(conn, params)
    old_text, old_key = _public_key(params, "old_public_key")
    new_text, new_key = _public_key(params, "new_public_key")
    cert = current_cert(conn.net, gid)
    if cert is None:
        raise RpcError(g.GROUP_STATE_INVALID, f"{gid} has no group identity to renew (group.bind_group_aid first)")
    if not _same_key(cert, old_key):
        raise RpcError(rpc.CONFLICT, "old_public_key is not the key of the group's current certificate")
    if pki.spki_der(new_key) == pki.spki_der(old_key):
        raise RpcError(rpc.INVALID_PARAMS, "new_public_key must differ from old_public_key")
    digest = lambda text: hashlib.sha256(text.encode("utf-8")).hexdigest()
    check_proof(conn.net, gid, "renew", params.get("renew_proof"), cert.public_key(), "renew_proof",
                ["aun-group-aid-renew-v1", _ids(params, "group_id", gid), _ids(params, "group_aid", gid),
                 [digest(old_text)], [digest(new_text)]])
    new_cert = _issue(conn.net, gid, new_key, replace=True)
    return _result(svc, gid, new_cert, conn.aid, status="renewed", old_cert_revoked=True,
                   old_cert_sn=serial_hex(cert))


def _ids(params: dict[str, Any], key: str, gid: str) -> list[str]:
    """The forms of a group id a proof may have been signed over: as sent (lower case), canonical."""
    sent = params.get(key)
    forms = [sent.strip().lower()] if isinstance(sent, str) and sent.strip() else []
    return forms + [gid] if gid not in forms else forms


def check_proof(net: Devnet, gid: str, purpose: str, proof: Any, public_key: Any, what: str,
                parts: list[Any]) -> None:
    """Verify a `{nonce, issued_ms, signature}` proof over `part|part|...|nonce|issued_ms` (a part
    that is a list: any of its forms) with `public_key`, and spend its nonce; -32602 when it is
    malformed, -32051 when it is stale, replayed or does not verify."""
    if not isinstance(proof, dict):
        raise RpcError(rpc.INVALID_PARAMS, f"{what} must be an object {{nonce, issued_ms, signature}}")
    nonce, issued, signature = proof.get("nonce"), proof.get("issued_ms"), proof.get("signature")
    if not isinstance(nonce, str) or not NONCE_RE.fullmatch(nonce):
        raise RpcError(rpc.INVALID_PARAMS, f"{what}.nonce must be 8-128 of [A-Za-z0-9_-]")
    if isinstance(issued, bool) or not isinstance(issued, int):
        raise RpcError(rpc.INVALID_PARAMS, f"{what}.issued_ms must be an integer (unix milliseconds)")
    if not isinstance(signature, str) or not signature:
        raise RpcError(rpc.INVALID_PARAMS, f"{what}.signature must be a base64 string")
    try:
        sig = pki.b64d(signature)
    except pki.PKIError:
        raise RpcError(rpc.INVALID_PARAMS, f"{what}.signature is not base64") from None
    if abs(g.now_ms() - issued) > PROOF_WINDOW_MS:
        raise RpcError(rpc.CLIENT_SIGNATURE_INVALID, f"{what}.issued_ms is outside the {PROOF_WINDOW_MS // 1000} s "
                                                     "window of the devnet's clock")
    candidates = [[]]
    for part in parts:
        candidates = [c + [p] for c in candidates for p in (part if isinstance(part, list) else [part])]
    if not any(pki.verify_signature(public_key, sig, "|".join([*c, nonce, str(issued)]).encode("utf-8"))
               for c in candidates):
        raise RpcError(rpc.CLIENT_SIGNATURE_INVALID, f"{what} signature does not verify "
                                                     f"(canonical {parts[0]}|...|nonce|issued_ms)")
    _ensure_schema(net)
    try:
        with net.store.tx() as db:
            db.execute("DELETE FROM grp_identity_nonces WHERE issued_ms<?", (g.now_ms() - 2 * PROOF_WINDOW_MS,))
            db.execute("INSERT INTO grp_identity_nonces VALUES (?,?,?,?)", (gid, purpose, nonce, issued))
    except sqlite3.IntegrityError:
        raise RpcError(rpc.CLIENT_SIGNATURE_INVALID, f"{what}.nonce was already used") from None


# --- owner transfer and dissolution (called by group_admin) ------------------------------------------
def check_transfer_start(conn: Conn, gid: str, params: dict[str, Any], new_owner: str) -> None:
    """A group with an identity is handed over only with the old group key's `transfer_auth`."""
    cert = current_cert(conn.net, gid)
    if cert is None:
        return
    check_proof(conn.net, gid, "transfer", params.get("transfer_auth"), cert.public_key(), "transfer_auth",
                ["aun-group-owner-transfer-v1", _ids(params, "group_id", gid), _ids(params, "group_aid", gid),
                 new_owner])


def transfer_rekey(conn: Conn, gid: str, params: dict[str, Any]) -> Any:
    """For a group with an identity: check the new owner's `transfer_accept` over its new
    `public_key` and return that key (the caller certifies it once the owner changed); None for a
    group without one."""
    if current_cert(conn.net, gid) is None:
        return None
    text, key = _public_key(params, "public_key")
    check_proof(conn.net, gid, "transfer_accept", params.get("transfer_accept"), conn.own_cert().public_key(),
                "transfer_accept", ["aun-group-owner-transfer-accept-v1", _ids(params, "group_id", gid),
                                    _ids(params, "group_aid", gid), conn.aid,
                                    hashlib.sha256(text.encode("utf-8")).hexdigest()])
    return key


def rekey_to(net: Devnet, gid: str, public_key: Any) -> dict[str, Any]:
    """The new owner's certificate of the group (the old one revoked): its `aid_cert`."""
    return aid_cert_view(net, _issue(net, gid, public_key, replace=True))


def revoke(net: Devnet, gid: str) -> None:
    """A dissolved group's certificate goes on the CRL (its card can no longer be published)."""
    state = net.store.cert_state(gid)
    if state is not None and state["key_purpose"] == KEY_PURPOSE and state["revoked_at"] is None:
        net.store.revoke_current(gid)
        log.info("devnet.group_cert_revoked", group_aid=gid, serial=state["serial_hex"])


# --- admission --------------------------------------------------------------------------------------
def admission(conn: Conn, method: str, params: dict[str, Any]) -> None:
    """Production's group identity admission for a client that declares agent_md_validation_v1:
    -32003 on a local, active group's RPCs until it has a certificate and a card of it."""
    if method in ADMISSION_EXEMPT or not method.startswith("group."):
        return
    raw = params.get("group_id") or params.get("group_aid")
    if not raw:
        return
    try:
        gid = g.normalize_group_id(raw, conn.net.issuer)
    except RpcError:
        return  # the handler answers the bad id
    row = g.service(conn.net).db.execute("SELECT status, owner_aid FROM grp_groups WHERE group_id=?",
                                         (gid,)).fetchone()
    if row is None or row["status"] == "dissolved":
        return
    cert = current_cert(conn.net, gid)
    if cert is None:
        raise RpcError(rpc.AGENT_MD_REQUIRED, f"valid group identity certificate is required for {gid}")
    card = conn.net.store.agent_md(gid)
    if card is None or card_status(conn.net, gid, card[0]) != "current":
        state = conn.net.store.cert_state(gid)
        if row["owner_aid"] == conn.aid and state is not None \
                and (gid, state["der_sha256"]) not in conn.net.cards_published \
                and time.time() - float(state["created_at"]) < conn.net.group_card_grace:
            return  # the owner is between its new certificate and the card it publishes next
        raise RpcError(rpc.AGENT_MD_REQUIRED, f"valid group agent.md is required for {gid}")


# --- the card (agent.md of type group) --------------------------------------------------------------
@dataclass(frozen=True)
class Entity:
    """What the name service knows of a group AID: its owner, status and current certificate."""

    group_id: str
    owner: str
    status: str
    cert: x509.Certificate | None


def entity(net: Devnet, aid: str) -> Entity | None:
    """The group whose AID is `aid`, None for any other AID."""
    row = g.service(net).db.execute("SELECT owner_aid, status FROM grp_groups WHERE group_id=?", (aid,)).fetchone()
    if row is None:
        return None
    return Entity(aid, row["owner_aid"], row["status"], current_cert(net, aid))


def card_status(net: Devnet, gid: str, body: bytes) -> str:
    """`current` when a stored card names the group's current owner and certificate, else `stale`."""
    found = entity(net, gid)
    if found is None or found.cert is None:
        return "stale"
    try:
        agent_md_doc.validate_entity(body, aid=gid, owner=found.owner, entity_cert=found.cert,
                                     owner_cert=lambda fp: _owner_cert(net, found.owner, fp))
    except agent_md_doc.AgentMdError:
        return "stale"
    return "current"


def ownership_headers(net: Devnet, found: Entity) -> dict[str, str]:
    """The owner projection a GET with `X-AUN-Ownership-Check: 1` answers for a group."""
    stored = net.store.agent_md(found.group_id)
    if found.status == "dissolved" or found.cert is None:
        status = "dissolved" if found.status == "dissolved" else "unbound"
    else:
        status = "current" if stored is None or card_status(net, found.group_id, stored[0]) == "current" else "stale"
    headers = {"x-aun-ownership-status": "not_applicable", "x-aun-entity-owner-aid": found.owner,
               "x-aun-entity-verification-status": status, "cache-control": "no-store"}
    if found.cert is not None:
        headers["x-aun-entity-cert-fingerprint"] = pki.cert_fingerprint(found.cert)
    return headers


def _owner_cert(net: Devnet, owner: str, fingerprint: str) -> x509.Certificate | None:
    pem = net.store.cert_by_fingerprint(owner, fingerprint.removeprefix("sha256:"))
    return pki.load_cert_pem(pem) if pem else None


def check_card_upload(net: Devnet, found: Entity, token_aid: str | None,
                      body: bytes) -> tuple[int, Any, dict[str, str]] | None:
    """None when `body` may be published as the group's card by the holder of the token; else the
    name service's answer: 401 (no valid token), 403 (not the owner, or a dissolved group), 409 (no
    certificate, or a card of another owner / certificate generation), 400 / 413 (the card)."""
    if token_aid is None:
        return 401, {"error": "a bearer access token of the group's owner is required"}, {}
    if found.status == "dissolved":
        return 403, {"error": "group_dissolved", "message": f"{found.group_id} is dissolved"}, {}
    if token_aid != found.owner:
        return 403, {"error": "not_group_owner", "message": f"only the owner of {found.group_id} publishes its card"}, {}
    if found.cert is None:
        return 409, {"error": "group_identity_required",
                     "message": f"{found.group_id} has no group identity certificate (bind it first)"}, {}
    try:
        agent_md_doc.validate_entity(body, aid=found.group_id, owner=found.owner, entity_cert=found.cert,
                                     owner_cert=lambda fp: _owner_cert(net, found.owner, fp), now=time.time())
    except agent_md_doc.AgentMdError as exc:
        log.info("devnet.agent_md_refused", aid=found.group_id, code=exc.code, field=exc.field, reason=str(exc))
        status = {agent_md_doc.TOO_LARGE: 413, agent_md_doc.GENERATION: 409}.get(exc.code, 400)
        return status, {"error": exc.code, "message": str(exc), "field": exc.field}, {}
    return None
