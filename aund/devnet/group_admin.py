"""Group administration on the devnet: profile, roles, bans, settings with the signed group.index,
owner transfer and dissolution (docs/groups.md section 3.5).

The handlers follow the SDK's group RPC manual (`_packed_docs/sdk/09-group-rpc-manual.md`) as
fastaun 0.5.25 calls them; each change appends a `group.changed` event with the action name the
SDK knows (`update`, `role_changed`, `member_banned`, `member_unbanned`, `announcement_updated`,
`rules_updated`, `join_requirements_updated`, `owner_transfer_rekey_pending`, `owner_transferred`,
`dissolved`). A group with a group identity (aund.devnet.group_identity) is handed over with the
old group key's `transfer_auth` and rekeyed to the new owner's key at completion; dissolving
revokes its certificate. Imported by aund.devnet.groups at its end (the handlers register themselves).
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from aund.aun import group_index as gindex
from aund.aun import jsonrpc as rpc
from aund.devnet import gateway as gw
from aund.devnet import groups as g
from aund.devnet.gateway import RpcError, validate_aid
from aund.devnet.store import dumps
from aund.identity import pki

if TYPE_CHECKING:
    from aund.devnet.gateway import Conn

handler = g.handler
ADMINS = ("owner", "admin")
VISIBILITIES = ("public", "private")
MENTION_MODES = ("disabled", "mention-only")
INDEX_KEY = gindex.KEY
#: keys kept in the group row (not in grp_settings); legacy names map to the indexed ones
CORE_KEYS = {"name": "name", "description": "description", "visibility": "visibility",
             "join.mode": "join_mode", "join.question": "join_question"}
LEGACY_KEYS = {"join_mode": "join.mode", "join_question": "join.question"}
PROFILE_LIMITS = {"name": 128, "description": 4000, "avatar_ref": 1024}
SETTING_MAX_BYTES = 64 * 1024


def _fresh(db: Any, gid: str) -> dict[str, Any]:
    return dict(db.execute("SELECT * FROM grp_groups WHERE group_id=?", (gid,)).fetchone())


def lift(conn: Conn, svc: g.GroupService, gid: str, subject: str, table: str, action: str, absent: str,
         extra_aids: tuple[str, ...] = ()) -> dict[str, Any]:
    """Remove `subject`'s row of `table` (a ban, a block) and tell the group (`action`) if there was one."""
    events = []
    with conn.net.store.tx() as db:
        gone = db.execute(f"DELETE FROM {table} WHERE group_id=? AND subject=?", (gid, subject)).rowcount
        if gone:
            events.append(svc.add_event(db, _fresh(db, gid), action, conn.aid, aid=subject,
                                        member_aid=subject, subject=subject))
    _finish(svc, events, extra_aids)
    return {"group_id": gid, "group_aid": gid, "subject": subject, "status": "removed" if gone else absent}


def _finish(svc: g.GroupService, events: list[dict[str, Any]], extra_aids: tuple[str, ...] = ()) -> None:
    for event in events:
        svc.push_event(event, extra_aids)


def _target(params: dict[str, Any], *names: str) -> str:
    for name in names:
        if params.get(name):
            return validate_aid(params.get(name))
    raise RpcError(rpc.INVALID_PARAMS, f"missing param: {names[0]}")


# --- profile ---------------------------------------------------------------------------------------
def _profile_value(key: str, value: Any) -> Any:
    if key == "visibility":
        value = "private" if value == "invite_only" else value  # the SDK's legacy value
        if value not in VISIBILITIES:
            raise RpcError(rpc.INVALID_PARAMS, "visibility must be public or private")
        return value
    if key == "metadata":
        if not isinstance(value, dict):
            raise RpcError(rpc.INVALID_PARAMS, "metadata must be an object")
        if any(k in value for k in ("pending_owner_transfer", "transfer_history")):
            raise RpcError(rpc.INVALID_PARAMS, "metadata may not carry the service-managed transfer fields")
        if len(dumps(value)) > SETTING_MAX_BYTES:
            raise RpcError(rpc.INVALID_PARAMS, f"metadata larger than {SETTING_MAX_BYTES} bytes")
        return value
    if not isinstance(value, str):
        raise RpcError(rpc.INVALID_PARAMS, f"param {key} must be a string")
    if len(value) > PROFILE_LIMITS[key]:
        raise RpcError(rpc.INVALID_PARAMS, f"param {key} longer than {PROFILE_LIMITS[key]} characters")
    if key == "name" and not value.strip():
        raise RpcError(rpc.INVALID_PARAMS, "name may not be empty")
    return value.strip() if key == "name" else value


def _write_setting(db: Any, gid: str, key: str, value: Any, actor: str) -> None:
    column = CORE_KEYS.get(key)
    if column is not None:
        db.execute(f"UPDATE grp_groups SET {column}=? WHERE group_id=?", (value, gid))
    else:
        db.execute("INSERT INTO grp_settings VALUES (?,?,?,?,?) ON CONFLICT DO UPDATE SET value=excluded.value, "
                   "updated_by=excluded.updated_by, updated_at=excluded.updated_at",
                   (gid, key, dumps(value), actor, g.now_ms()))


@handler("group.update")
def rpc_update(conn: Conn, params: dict[str, Any]) -> dict[str, Any]:
    svc, gid = g._ctx(conn, params)
    svc.require_member(gid, conn.aid, ADMINS)
    changes = {k: _profile_value(k, params[k]) for k in ("name", "description", "visibility", "metadata",
                                                          "avatar_ref") if params.get(k) is not None}
    events = []
    if changes:
        with conn.net.store.tx() as db:
            for key, value in changes.items():
                _write_setting(db, gid, key, value, conn.aid)
            events.append(svc.add_event(db, _fresh(db, gid), "update", conn.aid, updated_keys=sorted(changes),
                                        **{k: v for k, v in changes.items() if k != "metadata"}))
    _finish(svc, events)
    return {"group": svc.group_view(svc.group(gid)), "group_id": gid, "group_aid": gid,
            "updated_keys": sorted(changes)}


# --- roles -----------------------------------------------------------------------------------------
@handler("group.set_role")
def rpc_set_role(conn: Conn, params: dict[str, Any]) -> dict[str, Any]:
    svc, gid = g._ctx(conn, params)
    _, me = svc.require_member(gid, conn.aid, ADMINS)
    aid = _target(params, "aid", "member_aid")
    role = g._text(params, "role")
    if role not in ("admin", "member"):
        raise RpcError(rpc.INVALID_PARAMS, "role must be admin or member (the owner changes only by transfer)")
    target = svc.member(gid, aid)
    if target is None:
        raise RpcError(g.NOT_MEMBER, f"not a member: {aid}")
    if target["role"] == "owner":
        raise RpcError(g.ROLE_INSUFFICIENT, "the owner's role changes only by group.transfer_owner")
    if me["role"] != "owner" and not (aid == conn.aid and role == "member"):
        raise RpcError(g.ROLE_INSUFFICIENT, "only the owner sets roles (an admin may only step down itself)")
    if role == "admin" and svc.banned(gid, aid) is not None:
        raise RpcError(g.GROUP_STATE_INVALID, f"{aid} is banned: unban it first")
    old = target["role"]
    events = []
    if old != role:
        with conn.net.store.tx() as db:
            db.execute("UPDATE grp_members SET role=? WHERE group_id=? AND aid=?", (role, gid, aid))
            events.append(svc.add_event(db, _fresh(db, gid), "role_changed", conn.aid, aid=aid, member_aid=aid,
                                        old_role=old, new_role=role, role=role))
    _finish(svc, events)
    member = svc.member(gid, aid)
    return {"group": svc.group_view(svc.group(gid)), "member": svc.member_view(member, 0), "old_role": old,
            "new_role": role, "acl_model": "role_based", "acl_policy": "unchanged"}


@handler("group.get_admins")
def rpc_get_admins(conn: Conn, params: dict[str, Any]) -> dict[str, Any]:
    svc, gid = g._ctx(conn, params)
    svc.require_member(gid, conn.aid, write=False)
    admins = [svc.member_view(m) for m in svc.members(gid) if m["role"] in ADMINS]
    return {"group_id": gid, "group_aid": gid, "admins": admins, "items": admins, "total": len(admins)}


# --- bans ------------------------------------------------------------------------------------------
def _ban_view(row: dict[str, Any]) -> dict[str, Any]:
    return {k: row[k] for k in ("group_id", "subject", "banned_by", "reason", "expires_at", "created_at")}


@handler("group.ban")
def rpc_ban(conn: Conn, params: dict[str, Any]) -> dict[str, Any]:
    """Banned members stay members but may not send; a banned AID may not join (again)."""
    svc, gid = g._ctx(conn, params)
    _, me = svc.require_member(gid, conn.aid, ADMINS)
    subject = _target(params, "subject", "aid")
    if subject == conn.aid:
        raise RpcError(rpc.INVALID_PARAMS, "cannot ban yourself")
    target = svc.member(gid, subject)
    if target is not None and target["role"] == "owner":
        raise RpcError(g.ROLE_INSUFFICIENT, "the owner cannot be banned")
    if target is not None and target["role"] == "admin" and me["role"] != "owner":
        raise RpcError(g.ROLE_INSUFFICIENT, "only the owner can ban an admin")
    now = g.now_ms()
    expires_at = gw.int_param(params, "expires_at", 0, lo=0)
    seconds = gw.int_param(params, "expires_in_seconds", 0, lo=0)
    if seconds:
        expires_at = now + seconds * 1000
    row = {"group_id": gid, "subject": subject, "banned_by": conn.aid, "reason": g._text(params, "reason", limit=1000),
           "expires_at": expires_at, "created_at": now}
    with conn.net.store.tx() as db:
        db.execute("INSERT OR REPLACE INTO grp_bans VALUES (:group_id,:subject,:banned_by,:reason,:expires_at,"
                   ":created_at)", row)
        if target is not None and target["role"] == "admin":
            db.execute("UPDATE grp_members SET role='member' WHERE group_id=? AND aid=?", (gid, subject))
        event = svc.add_event(db, _fresh(db, gid), "member_banned", conn.aid, aid=subject, member_aid=subject,
                              subject=subject, reason=row["reason"], expires_at=expires_at)
    _finish(svc, [event], (subject,))
    return {"group_id": gid, "group_aid": gid, "ban": _ban_view(row)}


@handler("group.unban")
def rpc_unban(conn: Conn, params: dict[str, Any]) -> dict[str, Any]:
    svc, gid = g._ctx(conn, params)
    svc.require_member(gid, conn.aid, ADMINS)
    subject = _target(params, "subject", "aid")
    return lift(conn, svc, gid, subject, "grp_bans", "member_unbanned", "not_banned", (subject,))


@handler("group.get_banlist")
def rpc_get_banlist(conn: Conn, params: dict[str, Any]) -> dict[str, Any]:
    svc, gid = g._ctx(conn, params)
    svc.require_member(gid, conn.aid, ADMINS, write=False)
    items = [_ban_view(dict(r)) for r in svc.db.execute(
        "SELECT * FROM grp_bans WHERE group_id=? AND (expires_at=0 OR expires_at>?) ORDER BY created_at, subject",
        (gid, g.now_ms()))]
    return {"group_id": gid, "group_aid": gid, "items": items, "total": len(items)}


# --- settings and the signed group.index -------------------------------------------------------------
def parse_index(value: Any) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    try:
        return gindex.parse(value)
    except ValueError as exc:
        raise RpcError(rpc.INVALID_PARAMS, str(exc)) from None


def verify_index(svc: g.GroupService, gid: str, actor: str, value: Any,
                 written: dict[str, Any]) -> dict[str, Any]:
    """Check a submitted group.index as the manual says the service does; returns its meta."""
    meta, entries = parse_index(value)
    digest = gindex.body_hash(entries)

    def bad(why: str) -> RpcError:
        return RpcError(rpc.INVALID_PARAMS, f"group.index rejected: {why}")

    if meta.get("group_aid") != gid:
        raise bad("group_aid does not name this group")
    if meta.get("signed_by") != actor:
        raise bad("signed_by must be the caller")
    if meta.get("schema") != gindex.SCHEMA or meta.get("sig_alg") != gindex.SIG_ALG:
        raise bad("unsupported schema or sig_alg")
    if meta.get("body_hash") != digest or meta.get("etag") != f'"{digest}"':
        raise bad("body_hash/etag do not match the entries")
    by_key = {str(e.get("key") or ""): e for e in entries}
    for key, setting in written.items():
        if key in by_key and by_key[key].get("etag") != gindex.setting_etag(setting):
            raise bad(f"entry {key} does not match the value written")
        if key not in by_key:
            raise bad(f"entry {key} missing")
    pem = svc.cert_pem(actor)
    signature = meta.get("signature")
    try:
        ok = pem is not None and isinstance(signature, str) and pki.verify_signature(
            pki.load_cert_pem(pem).public_key(), pki.b64d(signature), gindex.signing_input(meta, entries))
    except (pki.PKIError, ValueError):
        ok = False
    if not ok:
        raise bad("signature does not verify with the caller's certificate")
    return meta


def _setting_value(key: str, value: Any) -> Any:
    if key in ("name", "description", "visibility"):
        return _profile_value(key, value)
    if key == "mention_mode":
        value = {"mention_only": "mention-only", "none": "disabled"}.get(value, value)
        if value not in MENTION_MODES:
            raise RpcError(rpc.INVALID_PARAMS, f"mention_mode must be one of {', '.join(MENTION_MODES)}")
        return value
    if key == "join.mode":
        if value not in g.JOIN_MODES:
            raise RpcError(rpc.INVALID_PARAMS, f"join.mode must be one of {', '.join(g.JOIN_MODES)}")
        return value
    if key == "join.max_pending":
        if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= 10000:
            raise RpcError(rpc.INVALID_PARAMS, "join.max_pending must be an integer 1..10000")
        return value
    if key.endswith(".attachments") or key == "join.auto_approve_patterns":
        if not isinstance(value, list):
            raise RpcError(rpc.INVALID_PARAMS, f"{key} must be an array")
    elif not isinstance(value, str):
        raise RpcError(rpc.INVALID_PARAMS, f"{key} must be a string")
    if len(dumps(value)) > SETTING_MAX_BYTES:
        raise RpcError(rpc.INVALID_PARAMS, f"{key} larger than {SETTING_MAX_BYTES} bytes")
    return value


def _index_meta(svc: g.GroupService, gid: str) -> dict[str, Any] | None:
    row = svc.db.execute("SELECT value FROM grp_settings WHERE group_id=? AND key=?", (gid, INDEX_KEY)).fetchone()
    if row is None:
        return None
    meta, _ = parse_index(json.loads(row[0]))
    return {gid: {"etag": meta.get("etag"), "last_modified": meta.get("last_modified"), "schema": meta.get("schema")}}


@handler("group.set_settings")
def rpc_set_settings(conn: Conn, params: dict[str, Any]) -> dict[str, Any]:
    svc, gid = g._ctx(conn, params)
    svc.require_member(gid, conn.aid, ADMINS)
    raw = params.get("settings")
    if not isinstance(raw, dict):
        raise RpcError(rpc.INVALID_PARAMS, "settings must be an object")
    settings: dict[str, Any] = {}
    for key, value in raw.items():
        key = LEGACY_KEYS.get(key, key)
        if key == INDEX_KEY:
            continue
        if key not in ("name", "description", "visibility", "mention_mode") and not gindex.is_indexed(key):
            raise RpcError(rpc.INVALID_PARAMS, f"unknown setting: {key}")
        settings[key] = _setting_value(key, value)
    # the legacy names (join_mode, join_question) are written without an index (devnet choice)
    legacy = {LEGACY_KEYS[k] for k in raw if k in LEGACY_KEYS}
    need_index = {k: v for k, v in settings.items() if gindex.is_indexed(k) and k not in legacy}
    index = raw.get(INDEX_KEY)
    meta = None
    if index is not None:
        if not isinstance(params.get("expected_index_etag"), str):
            raise RpcError(rpc.INVALID_PARAMS, "expected_index_etag is required with group.index")
        meta = verify_index(svc, gid, conn.aid, index, need_index)
    elif need_index:
        raise RpcError(rpc.INVALID_PARAMS, "indexed settings need a signed group.index in the same call: "
                       + ", ".join(sorted(need_index)))
    events = []
    with conn.net.store.tx() as db:
        if meta is not None:
            row = db.execute("SELECT value FROM grp_settings WHERE group_id=? AND key=?", (gid, INDEX_KEY)).fetchone()
            current = parse_index(json.loads(row[0]))[0].get("etag", "") if row else ""
            if current != params.get("expected_index_etag"):
                raise RpcError(g.STATE_CONFLICT, "group.index etag conflict: read the index again and retry")
            _write_setting(db, gid, INDEX_KEY, index, conn.aid)
        for key, value in settings.items():
            _write_setting(db, gid, key, value, conn.aid)
        by_action: dict[str, list[str]] = {}
        for key in settings:
            action = {"announcement": "announcement_updated", "rules": "rules_updated",
                      "join": "join_requirements_updated"}.get(key.split(".")[0], "update")
            by_action.setdefault(action, []).append(key)
        for action, keys in by_action.items():
            events.append(svc.add_event(db, _fresh(db, gid), action, conn.aid, updated_keys=sorted(keys)))
    _finish(svc, events)
    out: dict[str, Any] = {"group_id": gid, "group_aid": gid,
                           "updated_keys": sorted(settings) + ([INDEX_KEY] if meta is not None else [])}
    if meta is not None:
        out["_meta"] = {"group_indexes": _index_meta(svc, gid)}
    return out


@handler("group.get_settings")
def rpc_get_settings(conn: Conn, params: dict[str, Any]) -> dict[str, Any]:
    svc, gid = g._ctx(conn, params)
    svc.require_member(gid, conn.aid, write=False)
    group = svc.group(gid)
    keys = params.get("keys")
    if keys is not None and (not isinstance(keys, list) or not all(isinstance(k, str) for k in keys)):
        raise RpcError(rpc.INVALID_PARAMS, "keys must be an array of strings")
    at, by = group["updated_at"], group["owner_aid"]
    items = {key: {"key": key, "value": group[column], "updated_at": at, "updated_by": by}
             for key, column in CORE_KEYS.items()}
    items["mention_mode"] = {"key": "mention_mode", "value": "disabled", "updated_at": at, "updated_by": by}
    for r in svc.db.execute("SELECT * FROM grp_settings WHERE group_id=? ORDER BY key", (gid,)):
        items[r["key"]] = {"key": r["key"], "value": json.loads(r["value"]), "updated_at": r["updated_at"],
                           "updated_by": r["updated_by"]}
    wanted = [LEGACY_KEYS.get(k, k) for k in keys] if keys else list(items)
    out: dict[str, Any] = {"group_id": gid, "group_aid": gid,
                           "settings": [items[k] for k in wanted if k in items]}
    meta = _index_meta(svc, gid)
    if meta is not None:
        out["_meta"] = {"group_indexes": meta}
    return out


# --- owner transfer and dissolution ----------------------------------------------------------------
@handler("group.transfer_owner")
def rpc_transfer_owner(conn: Conn, params: dict[str, Any]) -> dict[str, Any]:
    """Step one: record the pending transfer; the new owner completes it (group.complete_transfer)."""
    svc, gid = g._ctx(conn, params)
    svc.require_member(gid, conn.aid, ("owner",))
    new_owner = _target(params, "new_owner", "aid")
    if new_owner == conn.aid:
        raise RpcError(rpc.INVALID_PARAMS, "new_owner is already the owner")
    if svc.member(gid, new_owner) is None:
        raise RpcError(g.NOT_MEMBER, f"new_owner is not a member: {new_owner}")
    svc.refuse_banned(gid, new_owner, "own the group")
    auth = params.get("transfer_auth")
    if auth is not None and not isinstance(auth, dict):
        raise RpcError(rpc.INVALID_PARAMS, "transfer_auth must be an object")
    g._identity.check_transfer_start(conn, gid, params, new_owner)  # a group AID: the group key's consent
    pending = {"status": "pending_rekey", "old_owner": conn.aid, "new_owner": new_owner, "group_aid": gid,
               "transfer_auth": auth or {}}
    with conn.net.store.tx() as db:
        db.execute("INSERT OR REPLACE INTO grp_transfers VALUES (?,?,?,?,?)",
                   (gid, conn.aid, new_owner, dumps(auth or {}), g.now_ms()))
        event = svc.add_event(db, _fresh(db, gid), "owner_transfer_rekey_pending", conn.aid, status="pending_rekey",
                              old_owner=conn.aid, new_owner=new_owner, aid=new_owner)
    _finish(svc, [event])
    return {"status": "pending_rekey", "requires_ca_rekey": False, "complete_rpc": "group.complete_transfer",
            "group": svc.group_view(svc.group(gid)), "group_id": gid, "group_aid": gid, "old_owner": conn.aid,
            "new_owner": new_owner, "pending_owner_transfer": pending}


@handler("group.complete_transfer")
def rpc_complete_transfer(conn: Conn, params: dict[str, Any]) -> dict[str, Any]:
    svc, gid = g._ctx(conn, params)
    svc.require_member(gid, conn.aid)
    pending = svc.db.execute("SELECT * FROM grp_transfers WHERE group_id=?", (gid,)).fetchone()
    if pending is None:
        group = svc.group(gid)
        if group["owner_aid"] == conn.aid:  # a repeated completion: the finished result again
            return {"status": "transferred", "group": svc.group_view(group, "owner"), "group_id": gid,
                    "group_aid": gid, "new_owner": conn.aid, "old_owner": ""}
        raise RpcError(g.GROUP_STATE_INVALID, "no owner transfer is pending for this group")
    if pending["new_owner"] != conn.aid:
        raise RpcError(g.ROLE_INSUFFICIENT, "only the pending new owner completes the transfer")
    old = pending["old_owner"]
    new_key = g._identity.transfer_rekey(conn, gid, params)  # a group AID: the new owner's key and consent
    with conn.net.store.tx() as db:
        db.execute("UPDATE grp_members SET role='admin' WHERE group_id=? AND aid=?", (gid, old))
        db.execute("UPDATE grp_members SET role='owner' WHERE group_id=? AND aid=?", (gid, conn.aid))
        db.execute("UPDATE grp_groups SET owner_aid=? WHERE group_id=?", (conn.aid, gid))
        db.execute("DELETE FROM grp_transfers WHERE group_id=?", (gid,))
        event = svc.add_event(db, _fresh(db, gid), "owner_transferred", conn.aid, status="transferred",
                              old_owner=old, new_owner=conn.aid, aid=conn.aid, member_aid=conn.aid)
    extra = {"aid_cert": g._identity.rekey_to(conn.net, gid, new_key)} if new_key is not None else {}
    _finish(svc, [event])
    return {"status": "transferred", "group": svc.group_view(svc.group(gid), "owner"), "group_id": gid,
            "group_aid": gid, "old_owner": old, "new_owner": conn.aid, **extra}


@handler("group.dissolve")
def rpc_dissolve(conn: Conn, params: dict[str, Any]) -> dict[str, Any]:
    svc, gid = g._ctx(conn, params)
    svc.require_member(gid, conn.aid, ("owner",))
    with conn.net.store.tx() as db:
        db.execute("UPDATE grp_groups SET status='dissolved' WHERE group_id=?", (gid,))
        db.execute("DELETE FROM grp_transfers WHERE group_id=?", (gid,))
        db.execute("UPDATE grp_proposals SET status='superseded' WHERE group_id=? AND status='pending'", (gid,))
        event = svc.add_event(db, _fresh(db, gid), "dissolved", conn.aid, status="dissolved")
    g._identity.revoke(conn.net, gid)  # the group certificate goes on the CRL; its card is no longer published
    _finish(svc, [event])
    return {"group_id": gid, "group_aid": gid, "status": "dissolved", "group": svc.group_view(svc.group(gid))}
