"""Group moderation on the devnet: suspend / resume, block / unblock (receiving), member statuses
and invite codes (docs/groups.md section 3.6).

The handlers follow the SDK's group RPC manual (`_packed_docs/sdk/09-group-rpc-manual.md`) and the
protocol's group chapter (10) as fastaun 0.5.25 calls them; each change appends a `group.changed`
event with the action name the SDK knows (`suspended`, `resumed`, `member_blocked`,
`member_unblocked`, `invite_code_created`, `invite_code_used`, `invite_code_revoked`). What the
rest of the service refuses because of them (sends and admissions while suspended, pulls and
wraps of a blocked member) is checked by the small hooks of GroupService in aund.devnet.groups.
Imported by aund.devnet.groups at its end (the handlers register themselves).
"""
from __future__ import annotations

import re
import secrets
from typing import TYPE_CHECKING, Any

from aund.aun import codes
from aund.aun import jsonrpc as rpc
from aund.devnet import gateway as gw
from aund.devnet import groups as g
from aund.devnet.gateway import RpcError
from aund.devnet.group_admin import ADMINS, _finish, _fresh, _target, lift

if TYPE_CHECKING:
    from aund.devnet.gateway import Conn

handler = g.handler
SCHEMA = """
CREATE TABLE IF NOT EXISTS grp_blocks (
    group_id TEXT NOT NULL, subject TEXT NOT NULL, blocked_by TEXT NOT NULL, reason TEXT NOT NULL,
    created_at INTEGER NOT NULL, PRIMARY KEY (group_id, subject));
CREATE TABLE IF NOT EXISTS grp_member_status (
    group_id TEXT NOT NULL, aid TEXT NOT NULL, online_status TEXT, work_status TEXT, updated_at INTEGER,
    last_message_at INTEGER, last_payload_type TEXT, PRIMARY KEY (group_id, aid));
CREATE TABLE IF NOT EXISTS grp_invite_codes (
    code TEXT PRIMARY KEY, group_id TEXT NOT NULL, created_by TEXT NOT NULL, max_uses INTEGER NOT NULL,
    used_count INTEGER NOT NULL, expires_at INTEGER NOT NULL, status TEXT NOT NULL, created_at INTEGER NOT NULL,
    updated_at INTEGER NOT NULL);
CREATE INDEX IF NOT EXISTS grp_invite_codes_group ON grp_invite_codes(group_id, created_at);
"""
g.EXTRA_SCHEMAS.append(SCHEMA)

CODE_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{3,63}$")
CODE_TTL_SECONDS = 7 * 86400       # the manual's default (invite_code_ttl_days = 7)
CODE_MAX_TTL_SECONDS = 365 * 86400
CODE_MAX_USES = 100_000
CODE_STATUSES = ("active", "expired", "used_up", "revoked")
STATUS_MAX_CHARS = 64


# --- suspend / resume ------------------------------------------------------------------------------
def _set_status(conn: Conn, params: dict[str, Any], old: str, new: str, action: str) -> dict[str, Any]:
    svc, gid = g._ctx(conn, params)
    group, _ = svc.require_member(gid, conn.aid, ADMINS)
    if group["status"] != old:
        return {"group": svc.group_view(group), "group_id": gid, "group_aid": gid, "status": "unchanged"}
    with conn.net.store.tx() as db:
        db.execute("UPDATE grp_groups SET status=? WHERE group_id=?", (new, gid))
        event = svc.add_event(db, _fresh(db, gid), action, conn.aid, status=new)
    _finish(svc, [event])
    return {"group": svc.group_view(svc.group(gid)), "group_id": gid, "group_aid": gid, "status": new}


@handler("group.suspend")
def rpc_suspend(conn: Conn, params: dict[str, Any]) -> dict[str, Any]:
    """Owner and admins keep speaking; members may not send and nobody joins until resumed."""
    return _set_status(conn, params, "active", "suspended", "suspended")


@handler("group.resume")
def rpc_resume(conn: Conn, params: dict[str, Any]) -> dict[str, Any]:
    return _set_status(conn, params, "suspended", "active", "resumed")


# --- block / unblock (receiving) -------------------------------------------------------------------
def _block_view(row: dict[str, Any]) -> dict[str, Any]:
    return {k: row[k] for k in ("group_id", "subject", "blocked_by", "reason", "created_at")}


def _may_moderate(svc: g.GroupService, gid: str, me: dict[str, Any], subject: str) -> None:
    """Anyone blocks or unblocks itself; the owner anyone else; an admin only plain members."""
    if subject == me["aid"]:
        return
    if me["role"] not in ADMINS:
        raise RpcError(g.ROLE_INSUFFICIENT, "a member may only block or unblock itself")
    target = svc.member(gid, subject)
    if target is None:
        raise RpcError(g.NOT_MEMBER, f"not a member: {subject}")
    if target["role"] == "owner" or (target["role"] == "admin" and me["role"] != "owner"):
        raise RpcError(g.ROLE_INSUFFICIENT, f"a {me['role']} cannot block or unblock a {target['role']}")


def _moderated(conn: Conn, params: dict[str, Any]) -> tuple[g.GroupService, str, str]:
    """(service, group id, subject) of a block or unblock the caller may make."""
    svc, gid = g._ctx(conn, params)
    _, me = svc.require_member(gid, conn.aid)
    subject = _target(params, "subject", "aid")
    _may_moderate(svc, gid, me, subject)
    return svc, gid, subject


@handler("group.block")
def rpc_block(conn: Conn, params: dict[str, Any]) -> dict[str, Any]:
    """A blocked member stays a member and may send, but gets no pushes, pulls or wraps of messages."""
    svc, gid, subject = _moderated(conn, params)
    row = svc.db.execute("SELECT * FROM grp_blocks WHERE group_id=? AND subject=?", (gid, subject)).fetchone()
    events = []
    if row is None:
        row = {"group_id": gid, "subject": subject, "blocked_by": conn.aid,
               "reason": g._text(params, "reason", limit=1000), "created_at": g.now_ms()}
        with conn.net.store.tx() as db:
            db.execute("INSERT INTO grp_blocks VALUES (:group_id,:subject,:blocked_by,:reason,:created_at)", row)
            events.append(svc.add_event(db, _fresh(db, gid), "member_blocked", conn.aid, aid=subject,
                                        member_aid=subject, subject=subject, reason=row["reason"]))
    _finish(svc, events)
    return {"group_id": gid, "group_aid": gid, "block": _block_view(dict(row))}


@handler("group.unblock")
def rpc_unblock(conn: Conn, params: dict[str, Any]) -> dict[str, Any]:
    svc, gid, subject = _moderated(conn, params)
    return lift(conn, svc, gid, subject, "grp_blocks", "member_unblocked", "not_blocked")


@handler("group.get_blocklist")
def rpc_get_blocklist(conn: Conn, params: dict[str, Any]) -> dict[str, Any]:
    svc, gid = g._ctx(conn, params)
    svc.require_member(gid, conn.aid, ADMINS, write=False)
    items = [_block_view(dict(r)) for r in svc.db.execute(
        "SELECT * FROM grp_blocks WHERE group_id=? ORDER BY created_at, subject", (gid,))]
    return {"group_id": gid, "group_aid": gid, "items": items, "total": len(items), "page": 1, "size": len(items)}


# --- member statuses -------------------------------------------------------------------------------
def _status_view(gid: str, aid: str, row: Any) -> dict[str, Any]:
    keys = ("online_status", "work_status", "updated_at", "last_message_at", "last_payload_type")
    return {"group_id": gid, "aid": aid, **{k: (row[k] if row is not None else None) for k in keys}}


def _status_text(params: dict[str, Any], key: str) -> str:
    value = g._text(params, key, limit=STATUS_MAX_CHARS).strip()
    if not value:
        raise RpcError(rpc.INVALID_PARAMS, f"missing param: {key}")
    return value


@handler("group.report_status")
def rpc_report_status(conn: Conn, params: dict[str, Any]) -> dict[str, Any]:
    """The caller's own online/work status in one group (free text up to 64 characters each)."""
    svc, gid = g._ctx(conn, params)
    svc.require_member(gid, conn.aid)
    online, work = _status_text(params, "online_status"), _status_text(params, "work_status")
    with conn.net.store.tx() as db:
        db.execute("INSERT INTO grp_member_status (group_id, aid, online_status, work_status, updated_at) "
                   "VALUES (?,?,?,?,?) ON CONFLICT DO UPDATE SET online_status=excluded.online_status, "
                   "work_status=excluded.work_status, updated_at=excluded.updated_at",
                   (gid, conn.aid, online, work, g.now_ms()))
    row = svc.db.execute("SELECT * FROM grp_member_status WHERE group_id=? AND aid=?", (gid, conn.aid)).fetchone()
    return {"group_id": gid, "group_aid": gid, "status": _status_view(gid, conn.aid, row)}


@handler("group.get_member_statuses")
def rpc_get_member_statuses(conn: Conn, params: dict[str, Any]) -> dict[str, Any]:
    svc, gid = g._ctx(conn, params)
    svc.require_member(gid, conn.aid, write=False)
    rows = {r["aid"]: r for r in svc.db.execute("SELECT * FROM grp_member_status WHERE group_id=?", (gid,))}
    items = [_status_view(gid, m["aid"], rows.get(m["aid"])) for m in svc.members(gid)]
    return {"group_id": gid, "group_aid": gid, "items": items, "total": len(items)}


# --- invite codes ----------------------------------------------------------------------------------
def _code_status(row: dict[str, Any], now: int) -> str:
    if row["status"] == "revoked":
        return "revoked"
    if row["expires_at"] <= now:
        return "expired"
    return "used_up" if row["used_count"] >= row["max_uses"] else "active"


def _code_view(row: dict[str, Any], now: int | None = None) -> dict[str, Any]:
    view = {k: row[k] for k in ("group_id", "code", "created_by", "expires_at", "max_uses", "used_count",
                                "created_at", "updated_at")}
    return dict(view, group_aid=row["group_id"], status=_code_status(row, g.now_ms() if now is None else now))


def _bounded(params: dict[str, Any], key: str, default: int, hi: int) -> int:
    value = gw.int_param(params, key, default, lo=-rpc.MAX_SAFE_INT)
    if not 1 <= value <= hi:
        raise RpcError(rpc.INVALID_PARAMS, f"param {key} must be an integer 1..{hi}")
    return value


def _code_param(params: dict[str, Any], *, required: bool) -> str:
    raw = params.get("code")
    if raw is None and not required:
        return ""
    if not isinstance(raw, str) or not raw.strip():
        raise RpcError(rpc.INVALID_PARAMS, "missing param: code")
    code = raw.strip().lower()
    if not CODE_RE.match(code):
        raise RpcError(rpc.INVALID_PARAMS, "code must be 4-64 characters of a-z, 0-9, '_' and '-'")
    return code


@handler("group.create_invite_code")
def rpc_create_invite_code(conn: Conn, params: dict[str, Any]) -> dict[str, Any]:
    """A code that admits up to `max_uses` AIDs until it expires (owner/admin; not while suspended)."""
    svc, gid = g._ctx(conn, params)
    svc.require_member(gid, conn.aid, ADMINS)
    svc.refuse_admission(gid)
    code = _code_param(params, required=False)
    max_uses = _bounded(params, "max_uses", 1, CODE_MAX_USES)
    ttl = _bounded(params, "expires_in_seconds", CODE_TTL_SECONDS, CODE_MAX_TTL_SECONDS)
    now = g.now_ms()
    row = {"code": code, "group_id": gid, "created_by": conn.aid, "max_uses": max_uses, "used_count": 0,
           "expires_at": now + ttl * 1000, "status": "active", "created_at": now, "updated_at": now}
    with conn.net.store.tx() as db:
        if code and db.execute("SELECT 1 FROM grp_invite_codes WHERE code=?", (code,)).fetchone():
            raise RpcError(codes.ALREADY_EXISTS, f"invite code already taken: {code}")
        while not row["code"]:
            candidate = "ic-" + secrets.token_hex(5)
            if not db.execute("SELECT 1 FROM grp_invite_codes WHERE code=?", (candidate,)).fetchone():
                row["code"] = candidate
        db.execute("INSERT INTO grp_invite_codes VALUES (:code,:group_id,:created_by,:max_uses,:used_count,"
                   ":expires_at,:status,:created_at,:updated_at)", row)
        # the code itself stays out of the event: every member reads events, only admins list codes
        event = svc.add_event(db, _fresh(db, gid), "invite_code_created", conn.aid, max_uses=max_uses,
                              expires_at=row["expires_at"])
    _finish(svc, [event])
    return {"group_id": gid, "group_aid": gid, "invite_code": _code_view(row, now)}


@handler("group.list_invite_codes")
def rpc_list_invite_codes(conn: Conn, params: dict[str, Any]) -> dict[str, Any]:
    svc, gid = g._ctx(conn, params)
    svc.require_member(gid, conn.aid, ADMINS, write=False)
    status = g._text(params, "status")
    if status and status not in CODE_STATUSES:
        raise RpcError(rpc.INVALID_PARAMS, f"status must be one of {', '.join(CODE_STATUSES)}")
    now = g.now_ms()
    items = [_code_view(dict(r), now) for r in svc.db.execute(
        "SELECT * FROM grp_invite_codes WHERE group_id=? ORDER BY created_at, code", (gid,))]
    items = [i for i in items if not status or i["status"] == status]
    return {"group_id": gid, "group_aid": gid, "items": items, "total": len(items)}


@handler("group.use_invite_code")
def rpc_use_invite_code(conn: Conn, params: dict[str, Any]) -> dict[str, Any]:
    """Join the code's group (in any join mode: an admin issued the code); a banned AID is refused."""
    svc = g.service(conn.net)
    code = _code_param(params, required=True)
    found = svc.db.execute("SELECT * FROM grp_invite_codes WHERE code=?", (code,)).fetchone()
    if found is None:
        raise RpcError(g.INVITE_INVALID, "invite code invalid or expired: not found")
    row = dict(found)
    status = _code_status(row, g.now_ms())
    if status != "active":
        raise RpcError(g.INVITE_INVALID, f"invite code invalid or expired: {status.replace('_', ' ')}")
    gid = row["group_id"]
    group = svc.group(gid)
    if svc.member(gid, conn.aid) is not None:
        raise RpcError(g.ALREADY_MEMBER, f"already a member of {gid}")

    def consume(db: Any) -> None:
        used = db.execute("UPDATE grp_invite_codes SET used_count=used_count+1, updated_at=? WHERE code=? "
                          "AND used_count<max_uses AND status='active'", (g.now_ms(), code)).rowcount
        if not used:
            raise RpcError(g.INVITE_INVALID, "invite code invalid or expired: used up")

    member, event = svc.join(group, conn.aid, "member", g._text(params, "member_type", "human", limit=32),
                             "invite_code_used", conn.aid, also=consume, inviter_aid=row["created_by"])
    svc.push_event(event)
    used = dict(svc.db.execute("SELECT * FROM grp_invite_codes WHERE code=?", (code,)).fetchone())
    return {"status": "joined", "group_id": gid, "group_aid": gid, "group": svc.group_view(svc.group(gid)),
            "member": svc.member_view(member), "invite_code": _code_view(used)}


@handler("group.revoke_invite_code")
def rpc_revoke_invite_code(conn: Conn, params: dict[str, Any]) -> dict[str, Any]:
    svc, gid = g._ctx(conn, params)
    svc.require_member(gid, conn.aid, ADMINS)
    code = _code_param(params, required=True)
    row = svc.db.execute("SELECT * FROM grp_invite_codes WHERE code=? AND group_id=?", (code, gid)).fetchone()
    if row is None:
        raise RpcError(g.INVITE_INVALID, f"no invite code {code} in {gid}")
    events = []
    if row["status"] != "revoked":
        with conn.net.store.tx() as db:
            db.execute("UPDATE grp_invite_codes SET status='revoked', updated_at=? WHERE code=?", (g.now_ms(), code))
            events.append(svc.add_event(db, _fresh(db, gid), "invite_code_revoked", conn.aid))
    _finish(svc, events)
    return {"group_id": gid, "group_aid": gid, "code": code, "status": "revoked"}
