"""AUN layer: the identities of the groups an AID owns (group AIDs), as the SDK keeps them.

A group has an AID of its own: `{group_name}.{issuer}` for a named group, the gateway's group id
for an anonymous one. It gets an ECDSA P-256 key made here, a certificate from the issuer for
that key (key purpose `group_identity`), and a card (agent.md, type "group") signed with the group
key that names the owner and the group certificate. The owner publishes the card with its own
access token. Keys live in the identity store under `AIDs/_groups/` (`IdentityStore.groups()`):
written encrypted before the gateway hears of them, never deleted, the old ones kept on renewal.

What each call does (the SDK 0.5.25's `create_group`, `bind_group_aid`, `renew_group_aid`,
`start_group_transfer`, `complete_group_transfer`):

- `group.create` with `group_name`: the key first (a pending key is reused after a crash), then
  the call with `public_key`/`curve`; the certificate must certify that key; stored, then the card.
- `group.create` without a name: the call, then `group.bind_group_aid` for the new group id.
- `group.bind_group_aid`: the held key (or a pending one) sent again, so a retry is idempotent.
- `group.renew_group_aid`: a new key, authorised by the old one (`renew_proof` over
  `aun-group-aid-renew-v1|group_id|group_aid|sha256(old key)|sha256(new key)|nonce|issued_ms`);
  the new certificate and a new card follow.
- `group.transfer_owner` of a group whose key is held: `transfer_auth` signed with the group key.
- `group.complete_transfer` (the new owner): a new group key, `transfer_accept` signed with the
  new owner's AID key; the certificate that comes back is stored and the card republished.
- a dissolved group's identity is marked `invalidated` in its meta (its key stays).

Public keys travel as base64 of the DER SubjectPublicKeyInfo; signatures as base64 of DER ECDSA.
"""
from __future__ import annotations

import functools
import hashlib
import time
import uuid
from typing import Any

import structlog
import trio
from cryptography.hazmat.primitives.asymmetric import ec

from aund.aun import cards
from aund.aun.link import Link
from aund.errors import AundError, AuthError, GatewayError, InvalidParams
from aund.identity import agent_md, pki
from aund.identity.errors import CertKeyMismatch, IdentityNotFound
from aund.identity.store import Identity, IdentityStore

log = structlog.get_logger("aund.groups")

CURVE = "P-256"
ENTITY = "group"
SIGNATURE_FORMAT = "multi-v1"
RENEW_DOMAIN = "aun-group-aid-renew-v1"
TRANSFER_DOMAIN = "aun-group-owner-transfer-v1"
ACCEPT_DOMAIN = "aun-group-owner-transfer-accept-v1"
#: -32003 messages of a gateway that wants the group's identity or card first (the SDK's prefixes)
NEEDS_CERT = "valid group identity certificate is required for "
NEEDS_CARD = "valid group agent.md is required for "
CARD_FIELDS = ("name", "description", "group_description", "avatar")


def public_key_b64(key: ec.EllipticCurvePrivateKey | ec.EllipticCurvePublicKey) -> str:
    public = key.public_key() if isinstance(key, ec.EllipticCurvePrivateKey) else key
    return pki.b64e(pki.spki_der(public))


def key_hash(public_b64: str) -> str:
    return hashlib.sha256(public_b64.encode("utf-8")).hexdigest()


def proof(key: ec.EllipticCurvePrivateKey, *fields: str) -> dict[str, Any]:
    """`{nonce, issued_ms, signature}` over `fields|nonce|issued_ms` (lower-cased ids)."""
    nonce, issued_ms = uuid.uuid4().hex, int(time.time() * 1000)
    canonical = "|".join([*fields, nonce, str(issued_ms)])
    return {"nonce": nonce, "issued_ms": issued_ms,
            "signature": pki.b64e(pki.sign_for_key(key, canonical.encode("utf-8")))}


def normalize_group_aid(group_id: str, issuer: str) -> str:
    """A group id as an AID: `base.issuer` (the issuer added to a bare id, as the SDK does)."""
    gid = group_id.strip().lower()
    return gid if "." in gid else f"{gid}.{issuer}"


def _cert_of(result: dict[str, Any], method: str) -> tuple[str, str]:
    """(group_aid, certificate PEM) from a create/bind/renew/complete answer."""
    group = result.get("group") if isinstance(result.get("group"), dict) else {}
    aid_cert = result.get("aid_cert") if isinstance(result.get("aid_cert"), dict) else {}
    group_aid = str(group.get("group_aid") or result.get("group_aid") or "").strip().lower()
    pem = str(aid_cert.get("cert") or aid_cert.get("cert_pem") or result.get("cert") or result.get("cert_pem") or "")
    if not group_aid or not pem.strip():
        raise GatewayError(f"{method}: the answer names no group_aid and certificate", retryable=False,
                           data={"method": method})
    return group_aid, pem


def _gid(params: dict[str, Any], method: str) -> str:
    value = params.get("group_id") or params.get("group_aid")
    if not isinstance(value, str) or not value.strip():
        raise InvalidParams(f"{method} needs group_id", data={"arg": "group_id"})
    return value.strip().lower()


class GroupIdentities:
    """The group identities one AID (the owner) holds on this device."""

    def __init__(self, store: IdentityStore, owner: Identity) -> None:
        self.groups = store.groups()
        self.owner = owner
        self.aid = owner.aid
        self.issuer = owner.aid.partition(".")[2]
        self._locks: dict[str, trio.Lock] = {}
        self.stats = {"created": 0, "bound": 0, "renewed": 0, "cards": 0, "transfers": 0, "recovered": 0}

    # --- store access (file work in threads) -------------------------------------------------------
    async def _run(self, fn, *args, **kw):
        return await trio.to_thread.run_sync(functools.partial(fn, *args, **kw))

    async def holds(self, group_aid: str) -> bool:
        """Whether this store has the key of `group_aid` (no decryption)."""
        return await self._run(self.groups.exists, group_aid)

    async def held(self, group_aid: str) -> Identity | None:
        try:
            return await self._run(self.groups.load, group_aid)
        except IdentityNotFound:
            return None

    async def _key_for(self, group_aid: str) -> ec.EllipticCurvePrivateKey:
        """The held key of `group_aid`, else its pending key (made and written now if none)."""
        held = await self.held(group_aid)
        if held is not None:
            return held.private_key
        return await self._run(self.groups.create_pending, group_aid)

    async def _keep(self, group_aid: str, key: ec.EllipticCurvePrivateKey, pem: str, method: str,
                    gid: str) -> Identity:
        """Store the group identity (the certificate must certify `key` and name `group_aid`)."""
        meta = {"entity": ENTITY, "owner_aid": self.aid, "group_id": gid}
        try:
            if not await self.holds(group_aid):
                await self._run(self.groups.promote, group_aid, key, pem, meta=meta)
            else:
                await self._run(self.groups.save_cert, group_aid, pem)
                await self._run(self.groups.update_meta, group_aid, **meta)
        except CertKeyMismatch as exc:
            raise AuthError(f"{method}: the gateway's certificate is not for this group key: {exc.message}",
                            data={"method": method, "group_aid": group_aid}) from None
        return await self._run(self.groups.load, group_aid)

    # --- the card --------------------------------------------------------------------------------------
    async def publish_card(self, link: Link, group_aid: str, fields: dict[str, Any] | None = None) -> str:
        """Sign the group's card with the group key and PUT it with the owner's token; returns the ETag.
        `fields` (name, description, avatar) change what the card says; else the last card's words."""
        identity = await self.held(group_aid)
        if identity is None:
            raise IdentityNotFound(f"no group identity {group_aid} is held here", data={"group_aid": group_aid})
        meta = await self._run(self.groups.load_meta, group_aid)
        words = dict(meta.get("card") or {})
        for key in CARD_FIELDS:
            value = (fields or {}).get(key)
            if isinstance(value, str) and value.strip():
                words["description" if key == "group_description" else key] = value.strip()
        text = agent_md.group_document(group_aid, owner=self.aid, entity_cert_fingerprint=identity.cert_fingerprint,
                                       name=str(words.get("name") or ""), description=str(words.get("description") or ""),
                                       avatar=str(words.get("avatar") or ""))
        try:
            signed = agent_md.sign(text, identity.private_key, identity.cert, entity=True)
        except agent_md.AgentMdError as exc:
            raise cards.bad_card(str(exc), exc.field, exc.code) from None
        etag = await cards.replace(link.gateway, group_aid, signed, token=link.access_token,
                                   signature_format=SIGNATURE_FORMAT)
        await self._run(self.groups.update_meta, group_aid, card=words, agent_md=signed, agent_md_etag=etag)
        self.stats["cards"] += 1
        log.info("groups.card_published", aid=self.aid, group_aid=group_aid, etag=etag)
        return etag

    # --- create, bind, renew -------------------------------------------------------------------------
    async def create(self, link: Link, params: dict[str, Any], *, timeout: float | None = None) -> dict[str, Any]:
        """`group.create` with the group identity made, stored and published (named or anonymous)."""
        name = params.get("group_name")
        if name is None or (isinstance(name, str) and not name.strip()):
            out = {k: v for k, v in params.items() if k not in ("public_key", "curve", "group_name")}
            created = await link.call("group.create", out, timeout=timeout)
            group = created.get("group") if isinstance(created.get("group"), dict) else {}
            gid = str(group.get("group_id") or created.get("group_id") or "").strip().lower()
            if not gid:
                raise GatewayError("group.create: the answer names no group_id", retryable=False)
            bind = {"group_id": gid, **{k: params[k] for k in CARD_FIELDS if k in params}}
            self.stats["created"] += 1
            try:
                bound = await self.bind(link, bind, timeout=timeout)
            except AundError as exc:
                # the group exists: failing the app's call now would make it create a second one.
                # The identity is bound at the next connect (check_owned), or by group.bind_group_aid.
                log.warning("groups.bind_failed", aid=self.aid, group_id=gid, error=str(exc))
                return dict(created, group_identity={"bound": False, "error": str(exc)})
            merged = dict(created, **{k: v for k, v in bound.items() if k != "group"})
            merged["group"] = {**group, **(bound.get("group") if isinstance(bound.get("group"), dict) else {})}
            merged["group_identity"] = {"bound": True, "group_aid": _cert_of(bound, "group.bind_group_aid")[0]}
            return merged
        if not isinstance(name, str):
            raise InvalidParams("group_name must be a string", data={"arg": "group_name"})
        group_aid = normalize_group_aid(name, self.issuer)
        if group_aid.partition(".")[2] != self.issuer:
            raise InvalidParams(f"group_name {name!r} names another issuer; a named group is {{name}}.{self.issuer}",
                                data={"arg": "group_name"})
        async with self._locks.setdefault(group_aid, trio.Lock()):
            key = await self._key_for(group_aid)
            result = await link.call("group.create", dict(params, group_name=name.strip().lower(),
                                                          public_key=public_key_b64(key), curve=CURVE),
                                     timeout=timeout)
            answered, pem = _cert_of(result, "group.create")
            if answered != group_aid:
                raise GatewayError(f"group.create: the gateway named the group {answered}, not {group_aid}",
                                   retryable=False)
            group = result.get("group") if isinstance(result.get("group"), dict) else {}
            gid = str(group.get("group_id") or group_aid).strip().lower()
            await self._keep(group_aid, key, pem, "group.create", gid)
            await self.publish_card(link, group_aid, params)
        self.stats["created"] += 1
        log.info("groups.identity_created", aid=self.aid, group_aid=group_aid, named=True)
        return result

    async def bind(self, link: Link, params: dict[str, Any], *, timeout: float | None = None) -> dict[str, Any]:
        """`group.bind_group_aid`: the group's key (held, pending or new) certified and its card published."""
        gid = _gid(params, "group.bind_group_aid")
        group_aid = normalize_group_aid(str(params.get("group_aid") or gid), self.issuer)
        async with self._locks.setdefault(group_aid, trio.Lock()):
            key = await self._key_for(group_aid)
            out = {k: v for k, v in params.items() if k not in CARD_FIELDS}
            result = await link.call("group.bind_group_aid", dict(out, group_id=gid, public_key=public_key_b64(key),
                                                                  curve=CURVE), timeout=timeout)
            answered, pem = _cert_of(result, "group.bind_group_aid")
            if answered != group_aid:
                raise GatewayError(f"group.bind_group_aid: the gateway bound {answered}, not {group_aid}",
                                   retryable=False)
            await self._keep(group_aid, key, pem, "group.bind_group_aid", gid)
            await self.publish_card(link, group_aid, params)
        self.stats["bound"] += 1
        log.info("groups.identity_bound", aid=self.aid, group_aid=group_aid)
        return result

    async def _group_aid(self, link: Link, gid: str, params: dict[str, Any], timeout: float | None) -> str:
        given = params.get("group_aid")
        if isinstance(given, str) and given.strip():
            return given.strip().lower()
        info = await link.call("group.get_info", {"group_id": gid, "required": ["member"]}, timeout=timeout)
        group = info.get("group") if isinstance(info.get("group"), dict) else {}
        found = str(info.get("group_aid") or group.get("group_aid") or "").strip().lower()
        if not found:
            raise GatewayError(f"group.get_info: {gid} has no group_aid", retryable=False)
        return found

    async def renew(self, link: Link, params: dict[str, Any], *, timeout: float | None = None) -> dict[str, Any]:
        """`group.renew_group_aid`: a new group key authorised by the old one; the old key is kept."""
        gid = _gid(params, "group.renew_group_aid")
        group_aid = await self._group_aid(link, gid, params, timeout)
        async with self._locks.setdefault(group_aid, trio.Lock()):
            old = await self.held(group_aid)
            if old is None:
                raise IdentityNotFound(f"group.renew_group_aid: the key of {group_aid} is not held here (only the "
                                       "device that created or bound the group can renew it)",
                                       data={"group_aid": group_aid})
            new_key = await self._run(self.groups.rekey_pending, group_aid)
            old_b64, new_b64 = public_key_b64(old.private_key), public_key_b64(new_key)
            renew_proof = proof(old.private_key, RENEW_DOMAIN, gid, group_aid, key_hash(old_b64), key_hash(new_b64))
            out = {k: v for k, v in params.items() if k not in CARD_FIELDS}
            result = await link.call("group.renew_group_aid", dict(
                out, group_id=gid, group_aid=group_aid, old_public_key=old_b64, new_public_key=new_b64,
                curve=CURVE, renew_proof=renew_proof), timeout=timeout)
            answered, pem = _cert_of(result, "group.renew_group_aid")
            if answered != group_aid:
                raise GatewayError(f"group.renew_group_aid: the gateway renewed {answered}, not {group_aid}",
                                   retryable=False)
            try:
                await self._run(self.groups.commit_rekey, group_aid, new_key, pem)
            except CertKeyMismatch as exc:
                raise AuthError(f"group.renew_group_aid: the certificate is not for the new key: {exc.message}",
                                data={"group_aid": group_aid}) from None
            await self.publish_card(link, group_aid, params)
        self.stats["renewed"] += 1
        log.info("groups.identity_renewed", aid=self.aid, group_aid=group_aid)
        return result

    # --- owner transfer ------------------------------------------------------------------------------
    async def transfer(self, link: Link, params: dict[str, Any], *, timeout: float | None = None) -> dict[str, Any]:
        """`group.transfer_owner`; with `transfer_auth` signed by the group key when it is held here."""
        gid = _gid(params, "group.transfer_owner")
        new_owner = str(params.get("new_owner") or "").strip().lower()
        group_aid = normalize_group_aid(str(params.get("group_aid") or gid), self.issuer)
        held = await self.held(group_aid)
        if held is None or not new_owner or "transfer_auth" in params:
            return await link.call("group.transfer_owner", params, timeout=timeout)
        auth = proof(held.private_key, TRANSFER_DOMAIN, gid, group_aid, new_owner)
        result = await link.call("group.transfer_owner", dict(params, group_aid=group_aid, transfer_auth=auth),
                                 timeout=timeout)
        self.stats["transfers"] += 1
        return result

    async def complete_transfer(self, link: Link, params: dict[str, Any], *,
                                timeout: float | None = None) -> dict[str, Any]:
        """`group.complete_transfer` by the new owner: a new group key, accepted with our AID key; the
        certificate that comes back is stored and the card published with us as owner."""
        gid = _gid(params, "group.complete_transfer")
        group_aid = normalize_group_aid(str(params.get("group_aid") or gid), self.issuer)
        async with self._locks.setdefault(group_aid, trio.Lock()):
            held = await self.held(group_aid)
            key = await self._run(self.groups.rekey_pending, group_aid) if held is not None \
                else await self._run(self.groups.create_pending, group_aid)
            public = public_key_b64(key)
            accept = proof(self.owner.private_key, ACCEPT_DOMAIN, gid, group_aid, self.aid, key_hash(public))
            result = await link.call("group.complete_transfer", dict(
                params, group_id=gid, group_aid=group_aid, public_key=public, curve=CURVE, transfer_accept=accept),
                timeout=timeout)
            try:
                _, pem = _cert_of(result, "group.complete_transfer")
            except GatewayError:
                return result  # a group without an identity: nothing to store
            if held is None:
                await self._keep(group_aid, key, pem, "group.complete_transfer", gid)
            else:
                await self._run(self.groups.commit_rekey, group_aid, key, pem)
                await self._run(self.groups.update_meta, group_aid, owner_aid=self.aid)
            await self.publish_card(link, group_aid)
        self.stats["transfers"] += 1
        log.info("groups.identity_transferred", aid=self.aid, group_aid=group_aid)
        return result

    # --- recovery and lifecycle ----------------------------------------------------------------------
    async def recover(self, link: Link, exc: AundError, params: dict[str, Any]) -> bool:
        """After a -32003 that asks for the group's certificate or card: bind or publish; True when
        the call is worth retrying once."""
        text = str(exc.message if hasattr(exc, "message") else exc).strip()
        lowered = text.lower()
        if NEEDS_CERT in lowered:
            named = text[lowered.index(NEEDS_CERT) + len(NEEDS_CERT):].strip()
            gid = str(params.get("group_id") or params.get("group_aid") or named).strip().lower()
            if not gid:
                return False
            await self.bind(link, {"group_id": gid})
        elif NEEDS_CARD in lowered:
            group_aid = text[lowered.index(NEEDS_CARD) + len(NEEDS_CARD):].strip().lower()
            if not group_aid or not await self.holds(group_aid):
                return False
            meta = await self._run(self.groups.load_meta, group_aid)
            if meta.get("owner_aid") != self.aid:
                return False  # the group's card is its current owner's to publish (we kept the old key only)
            await self.publish_card(link, group_aid)
        else:
            return False
        self.stats["recovered"] += 1
        return True

    async def check_owned(self, link: Link, group: dict[str, Any]) -> str:
        """After a connect, for a group we own: bind it when its key is not held, publish its card
        when the name service lost it. Returns what was done."""
        gid = str(group.get("group_id") or "").strip().lower()
        group_aid = normalize_group_aid(str(group.get("group_aid") or gid), self.issuer)
        if not await self.holds(group_aid):
            await self.bind(link, {"group_id": gid, "name": str(group.get("name") or "")})
            return "bound"
        meta = await self._run(self.groups.load_meta, group_aid)
        if meta.get("invalidated"):
            return "invalidated"
        status, _, _ = await cards.request("HEAD", link.gateway, group_aid)
        if status == 404:
            await self.publish_card(link, group_aid)
            return "published"
        return "present"

    async def owner_changed(self, gid: str, new_owner: str) -> None:
        """The group has another owner: a group key we hold stays (never deleted) but is no longer
        the group's current one to use (its meta says who owns it now)."""
        group_aid = normalize_group_aid(gid, self.issuer)
        if new_owner and new_owner != self.aid and await self.holds(group_aid):
            await self._run(self.groups.update_meta, group_aid, owner_aid=new_owner, handed_over_at=time.time())
            log.info("groups.identity_handed_over", aid=self.aid, group_aid=group_aid, new_owner=new_owner)

    async def dissolved(self, gid: str) -> None:
        """The group is dissolved: its identity is marked invalidated (nothing is deleted)."""
        group_aid = normalize_group_aid(gid, self.issuer)
        if await self.holds(group_aid):
            await self._run(self.groups.update_meta, group_aid, invalidated=True, invalidated_at=time.time())
            log.info("groups.identity_invalidated", aid=self.aid, group_aid=group_aid)
