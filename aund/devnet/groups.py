"""devnet: the AUN group service (`group.*`, `group.v2.*`) as the official SDK drives it.

The wire contract is digested in docs/groups.md; this module implements the subset the SDK
(fastaun 0.5.25) uses for create, membership (add / kick / remove / leave, join requests,
invites), the V2 state chain (propose / confirm), group prekeys, bootstrap, E2EE group
messages (send, pull forward and tail, ack, push), group events (push, pull, ack) and thoughts.

Storage: tables prefixed `grp_` in the devnet's SQLite database (`Store.db`), created here.
Each mutating RPC is one transaction; pushes are sent after COMMIT. Thoughts are kept in
memory only, as the protocol says they are not persisted.

Handlers register themselves with `aund.devnet.gateway.register` when this module is imported
(gateway.py imports it at its end). They run on the event loop thread like the P2P handlers;
`client_signature` has already been checked by the gateway for methods in SIGNED_METHODS.
"""
from __future__ import annotations

import hashlib
import json
import re
import secrets
import time
from typing import TYPE_CHECKING, Any, Callable

from aund import params as params_mod
from aund.aun import ids
from aund.aun import jsonrpc as rpc
from aund.aun.e2ee import merkle
from aund.aun.e2ee.canonical import canonical_json
from aund.aun.e2ee.group import state_commitment, state_sign_input
from aund.devnet import gateway as gw
from aund.devnet import thoughts
from aund.devnet.thoughts import Thought
from aund.devnet.gateway import RpcError, validate_aid
from aund.devnet.store import dumps
from aund.identity import pki

if TYPE_CHECKING:
    from aund.devnet.gateway import Conn, Devnet

# --- error codes (docs/groups.md section 9; the numbers live in aund.aun.codes) --------------------
from aund.aun.codes import (  # noqa: E402
    ALREADY_MEMBER, EPOCH_STALE, GROUP_NOT_FOUND, GROUP_STATE_INVALID, GROUP_SUSPENDED, INVITE_INVALID, JOIN_REJECTED,
    NOT_MEMBER, RECIPIENTS_STALE, ROLE_INSUFFICIENT, STATE_CONFLICT,
)

GROUP_BASE_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{3,63}$")
ROLES = ("owner", "admin", "member")
JOIN_MODES = ("open", "approval", "invite_only", "closed")
WRAP_ROLES = ("member", "self_sync", "audit")
DEVICE_KEYS = ("device_id", "key_source", "spk_id", "spk_pk", "spk_signature")  # + int spk_timestamp
PULL_MAX_LIMIT = 200
HISTORY_MAX_LIMIT = 50  # group.history, as production
EVENTS_MAX_LIMIT = 50

SCHEMA = """
CREATE TABLE IF NOT EXISTS grp_groups (
    group_id TEXT PRIMARY KEY, name TEXT NOT NULL, owner_aid TEXT NOT NULL, creator_aid TEXT NOT NULL,
    visibility TEXT NOT NULL, join_mode TEXT NOT NULL, join_question TEXT NOT NULL, description TEXT NOT NULL,
    status TEXT NOT NULL, epoch INTEGER NOT NULL, message_seq INTEGER NOT NULL, event_seq INTEGER NOT NULL,
    state_version INTEGER NOT NULL DEFAULT 0, state_hash TEXT NOT NULL DEFAULT '',
    prev_state_hash TEXT NOT NULL DEFAULT '', state_chain TEXT NOT NULL DEFAULT '',
    membership_snapshot TEXT NOT NULL DEFAULT '', state_signature TEXT NOT NULL DEFAULT '',
    state_actor_aid TEXT NOT NULL DEFAULT '', created_at INTEGER NOT NULL, updated_at INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS grp_members (
    group_id TEXT NOT NULL, aid TEXT NOT NULL, role TEXT NOT NULL, member_type TEXT NOT NULL,
    joined_at INTEGER NOT NULL, join_seq INTEGER NOT NULL, join_event_seq INTEGER NOT NULL,
    PRIMARY KEY (group_id, aid));
CREATE INDEX IF NOT EXISTS grp_members_aid ON grp_members(aid);
CREATE TABLE IF NOT EXISTS grp_messages (
    group_id TEXT NOT NULL, seq INTEGER NOT NULL, message_id TEXT NOT NULL, sender_aid TEXT NOT NULL,
    sender_device_id TEXT NOT NULL, kind TEXT NOT NULL, body TEXT NOT NULL, need_render INTEGER NOT NULL,
    created_at INTEGER NOT NULL, PRIMARY KEY (group_id, seq));
CREATE UNIQUE INDEX IF NOT EXISTS grp_messages_dedupe ON grp_messages(group_id, message_id);
CREATE TABLE IF NOT EXISTS grp_wraps (
    group_id TEXT NOT NULL, seq INTEGER NOT NULL, aid TEXT NOT NULL, device_id TEXT NOT NULL,
    row_index INTEGER NOT NULL, PRIMARY KEY (group_id, seq, row_index));
CREATE INDEX IF NOT EXISTS grp_wraps_reader ON grp_wraps(group_id, aid, device_id, seq);
CREATE TABLE IF NOT EXISTS grp_cursors (
    group_id TEXT NOT NULL, aid TEXT NOT NULL, device_id TEXT NOT NULL, slot_key TEXT NOT NULL,
    kind TEXT NOT NULL, ack_seq INTEGER NOT NULL, PRIMARY KEY (group_id, aid, device_id, slot_key, kind));
CREATE TABLE IF NOT EXISTS grp_departures (
    group_id TEXT NOT NULL, aid TEXT NOT NULL, join_event_seq INTEGER NOT NULL, left_event_seq INTEGER NOT NULL,
    left_at INTEGER NOT NULL, PRIMARY KEY (group_id, aid));
CREATE TABLE IF NOT EXISTS grp_events (
    group_id TEXT NOT NULL, event_seq INTEGER NOT NULL, body TEXT NOT NULL, created_at INTEGER NOT NULL,
    PRIMARY KEY (group_id, event_seq));
CREATE TABLE IF NOT EXISTS grp_prekeys (
    group_id TEXT NOT NULL, aid TEXT NOT NULL, device_id TEXT NOT NULL, spk_id TEXT NOT NULL,
    spk_pk TEXT NOT NULL, spk_signature TEXT NOT NULL, spk_timestamp INTEGER NOT NULL, updated_at REAL NOT NULL,
    PRIMARY KEY (group_id, aid, device_id));
CREATE TABLE IF NOT EXISTS grp_join_requests (
    group_id TEXT NOT NULL, aid TEXT NOT NULL, message TEXT NOT NULL, answer TEXT NOT NULL,
    status TEXT NOT NULL, reviewed_by TEXT, rejection_reason TEXT, created_at INTEGER NOT NULL,
    updated_at INTEGER NOT NULL, PRIMARY KEY (group_id, aid));
CREATE TABLE IF NOT EXISTS grp_invites (
    invite_id TEXT PRIMARY KEY, group_id TEXT NOT NULL, invitee_aid TEXT NOT NULL, inviter_aid TEXT NOT NULL,
    member_type TEXT NOT NULL, status TEXT NOT NULL, created_at INTEGER NOT NULL, updated_at INTEGER NOT NULL);
CREATE INDEX IF NOT EXISTS grp_invites_invitee ON grp_invites(invitee_aid, status);
CREATE TABLE IF NOT EXISTS grp_proposals (
    proposal_id TEXT PRIMARY KEY, group_id TEXT NOT NULL, state_version INTEGER NOT NULL,
    state_hash TEXT NOT NULL, prev_state_hash TEXT NOT NULL, key_epoch INTEGER NOT NULL,
    membership_snapshot TEXT NOT NULL, signature TEXT NOT NULL, proposer_aid TEXT NOT NULL, reason TEXT NOT NULL,
    status TEXT NOT NULL, auto_confirm_at INTEGER NOT NULL, created_at INTEGER NOT NULL);
CREATE INDEX IF NOT EXISTS grp_proposals_group ON grp_proposals(group_id, status);
CREATE TABLE IF NOT EXISTS grp_bans (
    group_id TEXT NOT NULL, subject TEXT NOT NULL, banned_by TEXT NOT NULL, reason TEXT NOT NULL,
    expires_at INTEGER NOT NULL, created_at INTEGER NOT NULL, PRIMARY KEY (group_id, subject));
CREATE TABLE IF NOT EXISTS grp_settings (
    group_id TEXT NOT NULL, key TEXT NOT NULL, value TEXT NOT NULL, updated_by TEXT NOT NULL,
    updated_at INTEGER NOT NULL, PRIMARY KEY (group_id, key));
CREATE TABLE IF NOT EXISTS grp_create_requests (
    creator_aid TEXT NOT NULL, request_id TEXT NOT NULL, group_id TEXT NOT NULL, PRIMARY KEY (creator_aid, request_id));
CREATE TABLE IF NOT EXISTS grp_transfers (
    group_id TEXT PRIMARY KEY, old_owner TEXT NOT NULL, new_owner TEXT NOT NULL, transfer_auth TEXT NOT NULL,
    created_at INTEGER NOT NULL);
"""
#: further tables of the modules that add handlers (aund/devnet/group_moderation.py), created with these
EXTRA_SCHEMAS: list[str] = []


def now_ms() -> int:
    return int(time.time() * 1000)


# --- pure helpers ----------------------------------------------------------------------------------
def normalize_group_id(raw: Any, issuer: str) -> str:
    """Canonical `base.issuer` form of a group id (accepts `base`, `base@issuer`, `group.issuer/base`)."""
    if not isinstance(raw, str) or not raw.strip():
        raise RpcError(rpc.INVALID_PARAMS, "missing param: group_id")
    value = raw.strip().strip("/").lower()
    if "@" in value:
        base, _, domain = value.partition("@")
        value = f"{base}.{domain}"
    elif value.startswith("group.") and "/" in value:
        domain, _, base = value[len("group."):].partition("/")
        value = f"{base.strip('/')}.{domain}"
    elif "." not in value:
        value = f"{value}.{issuer}"
    base, _, domain = value.partition(".")
    if not GROUP_BASE_RE.match(base) or not domain or base.isdigit():
        raise RpcError(rpc.INVALID_PARAMS, f"invalid group_id: {raw!r}")
    return value


def _plain_type(body: str) -> str:
    payload = rpc.loads(body)
    return (payload.get("type") if isinstance(payload, dict) else "") or "message"


def snapshot_aids(snapshot: str) -> set[str] | None:
    """Member AIDs named by a committed membership snapshot (object or legacy array); None if unreadable."""
    if not snapshot:
        return None
    try:
        parsed = json.loads(snapshot)
    except ValueError:
        return None
    if isinstance(parsed, dict) and isinstance(parsed.get("members"), list):
        return {str(m.get("aid") or "").strip().lower() for m in parsed["members"] if isinstance(m, dict)} - {""}
    if isinstance(parsed, list):
        return {str(a).strip().lower() for a in parsed if isinstance(a, str)} - {""}
    return None


def next_chain(prev_chain: str, state_hash: str) -> str:
    return hashlib.sha256(bytes.fromhex(prev_chain or "") + bytes.fromhex(state_hash)).hexdigest()


def _bool(params: dict[str, Any], key: str, default: bool) -> bool:
    with params_mod.fail_as(gw.bad_param):
        return params_mod.boolean(params, key, default, what="param")


def _text(params: dict[str, Any], key: str, default: str = "", *, limit: int = 4000) -> str:
    with params_mod.fail_as(gw.bad_param):
        return params_mod.string(params, key, default, max_len=limit, what="param")


# --- the service -----------------------------------------------------------------------------------
class GroupService:
    """Group state of one devnet: SQLite tables in the devnet store plus in-memory thoughts."""

    def __init__(self, net: Devnet) -> None:
        self.net = net
        self.db = net.store.db
        self.db.executescript(SCHEMA)
        for extra in EXTRA_SCHEMAS:
            self.db.executescript(extra)
        self.thoughts: dict[tuple[str, str], dict[tuple[str, str], Thought]] = {}
        # members of federated issuers: aid -> {"cert": PEM | None, "devices": [...], "at": monotonic}
        self.foreign: dict[str, dict[str, Any]] = {}

    # --- members of federated issuers ----------------------------------------------------------
    def is_foreign(self, aid: str) -> bool:
        issuer = aid.partition(".")[2]
        return issuer != self.net.issuer and issuer in self.net.federation

    def cert_pem(self, aid: str) -> str | None:
        """The current certificate of a local AID, or the one a federated AID's devnet last gave."""
        if self.is_foreign(aid):
            return (self.foreign.get(aid) or {}).get("cert")
        return self.net.store.current_cert(aid)

    def published_prekeys(self, aid: str) -> list[Any]:
        """Rows with device_id, key_source and spk_*: the P2P prekeys of `aid`'s devices."""
        if self.is_foreign(aid):
            return list((self.foreign.get(aid) or {}).get("devices") or [])
        return list(self.net.store.prekeys(aid))

    def remember(self, aid: str, material: Any) -> None:
        """Keep what a federated AID's devnet says of it: {"cert": PEM | None, "devices": [...]}."""
        if not isinstance(material, dict):
            return
        listed = material.get("devices")
        devices = [d for d in listed if isinstance(d, dict) and all(isinstance(d.get(k), str) for k in DEVICE_KEYS)
                   and isinstance(d.get("spk_timestamp"), int)] if isinstance(listed, list) else []
        cert = material.get("cert")
        try:
            pki.load_cert_pem(cert) if isinstance(cert, str) else None
        except (pki.PKIError, ValueError):
            cert = None
        self.foreign[aid] = {"cert": cert if isinstance(cert, str) else None, "devices": devices,
                             "at": time.monotonic()}

    async def learn(self, aid: str, max_age: float) -> None:
        """Fetch a federated AID's certificate and devices from its devnet when ours are older than max_age."""
        known = self.foreign.get(aid)
        if known is not None and time.monotonic() - known["at"] < max_age:
            return
        from aund.devnet import federation

        try:
            self.remember(aid, await federation.material(self.net, aid))
        except federation.FederationError as exc:
            gw.log.warning("devnet.federation_unreachable", aid=aid, error=str(exc))  # keep what we had

    # --- reads -----------------------------------------------------------------------------
    def group(self, group_id: str) -> dict[str, Any]:
        row = self.db.execute("SELECT * FROM grp_groups WHERE group_id=?", (group_id,)).fetchone()
        if row is None:
            raise RpcError(GROUP_NOT_FOUND, f"group not found: {group_id}")
        return dict(row)

    def member(self, group_id: str, aid: str) -> dict[str, Any] | None:
        row = self.db.execute("SELECT * FROM grp_members WHERE group_id=? AND aid=?", (group_id, aid)).fetchone()
        return dict(row) if row else None

    def members(self, group_id: str) -> list[dict[str, Any]]:
        return [dict(r) for r in self.db.execute(
            "SELECT * FROM grp_members WHERE group_id=? ORDER BY joined_at, aid", (group_id,))]

    def require_member(self, group_id: str, aid: str, roles: tuple[str, ...] = ROLES, *,
                       write: bool = True) -> tuple[dict, dict]:
        """(group, member row) when `aid` is a member with one of `roles`; a dissolved group only
        answers reads (`write=False`)."""
        group = self.group(group_id)
        member = self.member(group_id, aid)
        if member is None:
            raise RpcError(NOT_MEMBER, f"not a member of {group_id}")
        if member["role"] not in roles:
            raise RpcError(ROLE_INSUFFICIENT, f"role insufficient: {member['role']} (needs {'/'.join(roles)})")
        if write and group["status"] == "dissolved":
            raise RpcError(GROUP_STATE_INVALID, f"group {group_id} is dissolved")
        return group, member

    def banned(self, group_id: str, aid: str) -> dict[str, Any] | None:
        """The ban in force on `aid` in the group (expires_at 0 = permanent), else None."""
        row = self.db.execute("SELECT * FROM grp_bans WHERE group_id=? AND subject=?", (group_id, aid)).fetchone()
        if row is None or (row["expires_at"] and row["expires_at"] <= now_ms()):
            return None
        return dict(row)

    def refuse_banned(self, group_id: str, aid: str, what: str) -> None:
        if self.banned(group_id, aid) is not None:
            raise RpcError(ROLE_INSUFFICIENT if what == "send" else JOIN_REJECTED,
                           f"{aid} is banned from {group_id}: cannot {what}")

    # --- moderation hooks (the handlers and tables: aund/devnet/group_moderation.py) --------------
    def blocked(self, group_id: str, aid: str) -> bool:
        """True when `aid` is blocked from receiving the group's messages (it may still send)."""
        return self.db.execute("SELECT 1 FROM grp_blocks WHERE group_id=? AND subject=?",
                               (group_id, aid)).fetchone() is not None

    def refuse_blocked(self, group_id: str, aid: str) -> None:
        if self.blocked(group_id, aid):
            raise RpcError(ROLE_INSUFFICIENT, f"member is blocked from receiving {group_id}'s messages "
                           "(group.unblock lifts it)")

    def refuse_admission(self, group_id: str) -> None:
        """Nobody joins a group that is suspended or dissolved."""
        status = self.group(group_id)["status"]
        if status == "suspended":
            raise RpcError(GROUP_SUSPENDED, f"group is suspended: {group_id} admits no one until resumed")
        if status != "active":
            raise RpcError(GROUP_STATE_INVALID, f"group is {status}")

    def refuse_send(self, group: dict[str, Any], member: dict[str, Any]) -> None:
        """While suspended only the owner and admins speak; a dissolved group takes nothing."""
        if group["status"] == "suspended" and member["role"] not in ("owner", "admin"):
            raise RpcError(GROUP_SUSPENDED, f"group is suspended: only the owner and admins may send in "
                           f"{group['group_id']}")
        if group["status"] not in ("active", "suspended"):
            raise RpcError(GROUP_STATE_INVALID, f"group is {group['status']}")

    def note_sent(self, group_id: str, aid: str, payload_type: str) -> None:
        """Keep the sender's last_message_at / last_payload_type (group.get_member_statuses)."""
        with self.net.store.tx() as db:
            db.execute("INSERT INTO grp_member_status (group_id, aid, last_message_at, last_payload_type) "
                       "VALUES (?,?,?,?) ON CONFLICT DO UPDATE SET last_message_at=excluded.last_message_at, "
                       "last_payload_type=excluded.last_payload_type", (group_id, aid, now_ms(), payload_type[:128]))

    def cursor(self, group_id: str, aid: str, device_id: str, slot_key: str, kind: str) -> int:
        row = self.db.execute("SELECT ack_seq FROM grp_cursors WHERE group_id=? AND aid=? AND device_id=? "
                              "AND slot_key=? AND kind=?", (group_id, aid, device_id, slot_key, kind)).fetchone()
        return row[0] if row else 0

    def group_view(self, group: dict[str, Any], role: str | None = None) -> dict[str, Any]:
        count = self.db.execute("SELECT COUNT(*) FROM grp_members WHERE group_id=?", (group["group_id"],)).fetchone()[0]
        view = {"group_id": group["group_id"], "group_aid": group["group_id"], "name": group["name"],
                "owner_aid": group["owner_aid"], "creator_aid": group["creator_aid"],
                "visibility": group["visibility"], "status": group["status"], "description": group["description"],
                "join_mode": group["join_mode"], "member_count": count, "message_seq": group["message_seq"],
                "event_seq": group["event_seq"], "e2ee_epoch": group["epoch"], "state_version": group["state_version"],
                "created_at": group["created_at"], "updated_at": group["updated_at"]}
        if role is not None:
            view["role"] = view["my_role"] = role
        return view

    @staticmethod
    def member_view(m: dict[str, Any], last_ack: int | None = None) -> dict[str, Any]:
        view = {"group_id": m["group_id"], "aid": m["aid"], "role": m["role"], "member_type": m["member_type"],
                "joined_at": m["joined_at"]}
        if last_ack is not None:
            view["last_ack_seq"] = last_ack
        return view

    def e2ee_targets(self, group: dict[str, Any]) -> tuple[list[str], list[str], list[str]]:
        """(aids whose devices get wraps, pending adds, pending removes) for the committed state.

        Groups that are not open admit a member into the wrap set only once a signed state that
        names it is committed (state_version 0 = nothing signed yet: every member).
        """
        blocked = {r[0] for r in self.db.execute("SELECT subject FROM grp_blocks WHERE group_id=?",
                                                 (group["group_id"],))}
        current = [m["aid"] for m in self.members(group["group_id"]) if m["aid"] not in blocked]
        committed = snapshot_aids(group["membership_snapshot"]) if group["state_version"] > 0 else None
        if committed is None or group["join_mode"] == "open":
            return current, [], []
        targets = [a for a in current if a in committed]
        pending_adds = [a for a in current if a not in committed]
        pending_removes = sorted(committed - set(current))
        return targets, pending_adds, pending_removes

    def devices(self, group_id: str, aid: str) -> list[dict[str, Any]]:
        """Bootstrap device entries of `aid`: its group prekey per device, else its P2P prekey."""
        pem = self.cert_pem(aid)
        if pem is None:
            return []
        ik_der = pki.spki_der(pki.load_cert_pem(pem).public_key())
        ik_b64 = pki.b64e(ik_der)
        ik_fp = "sha256:" + hashlib.sha256(ik_der).hexdigest()[:16]
        by_device: dict[str, dict[str, Any]] = {}
        for r in self.published_prekeys(aid):
            by_device[r["device_id"]] = {"key_source": r["key_source"], "spk_id": r["spk_id"], "spk_pk": r["spk_pk"],
                                         "spk_signature": r["spk_signature"], "spk_timestamp": r["spk_timestamp"]}
        for r in self.db.execute("SELECT * FROM grp_prekeys WHERE group_id=? AND aid=?", (group_id, aid)):
            by_device[r["device_id"]] = {"key_source": "group_device_prekey", "spk_id": r["spk_id"],
                                         "spk_pk": r["spk_pk"], "spk_signature": r["spk_signature"],
                                         "spk_timestamp": r["spk_timestamp"]}
        return [{"aid": aid, "device_id": device, "ik_pk": ik_b64, "ik_fp": ik_fp, **entry}
                for device, entry in sorted(by_device.items())]

    # --- writes ----------------------------------------------------------------------------
    def add_event(self, db: Any, group: dict[str, Any], action: str, actor: str, **data: Any) -> dict[str, Any]:
        """Append one group.changed event inside the caller's transaction; returns its body."""
        seq = group["event_seq"] + 1
        group["event_seq"] = seq
        body = {"module_id": "group", "event_type": "group.changed", "action": action,
                "group_id": group["group_id"], "group_aid": group["group_id"], "event_seq": seq,
                "actor_aid": actor, "created_at": now_ms(), **data}
        db.execute("INSERT INTO grp_events VALUES (?,?,?,?)", (group["group_id"], seq, dumps(body), body["created_at"]))
        db.execute("UPDATE grp_groups SET event_seq=?, updated_at=? WHERE group_id=?",
                   (seq, body["created_at"], group["group_id"]))
        return body

    def insert_member(self, db: Any, group: dict[str, Any], aid: str, role: str, member_type: str,
                      join_event_seq: int) -> dict[str, Any]:
        row = {"group_id": group["group_id"], "aid": aid, "role": role, "member_type": member_type,
               "joined_at": now_ms(), "join_seq": group["message_seq"], "join_event_seq": join_event_seq}
        db.execute("INSERT INTO grp_members VALUES (:group_id,:aid,:role,:member_type,:joined_at,:join_seq,"
                   ":join_event_seq)", row)
        db.execute("DELETE FROM grp_cursors WHERE group_id=? AND aid=?", (group["group_id"], aid))  # fresh cursors
        db.execute("DELETE FROM grp_departures WHERE group_id=? AND aid=?", (group["group_id"], aid))
        return row

    def join(self, group: dict[str, Any], aid: str, role: str, member_type: str, action: str, actor: str,
             also: Callable[[Any], None] | None = None, **extra: Any) -> tuple[dict[str, Any], dict[str, Any]]:
        """Make `aid` a member and return (member row, event); `also(db)` runs in the same transaction."""
        self.refuse_banned(group["group_id"], aid, "join")
        self.refuse_admission(group["group_id"])
        with self.net.store.tx() as db:
            fresh = dict(db.execute("SELECT * FROM grp_groups WHERE group_id=?", (group["group_id"],)).fetchone())
            if db.execute("SELECT 1 FROM grp_members WHERE group_id=? AND aid=?", (fresh["group_id"], aid)).fetchone():
                raise RpcError(ALREADY_MEMBER, f"already a member: {aid}")
            event = self.add_event(db, fresh, action, actor, member_aid=aid, joined_aid=aid, aid=aid, role=role,
                                   **extra)
            member = self.insert_member(db, fresh, aid, role, member_type, event["event_seq"])
            if also is not None:
                also(db)
        group.update(fresh)
        return member, event

    def push(self, aids: set[str] | list[str], method: str, params: dict[str, Any]) -> int:
        """Send one event to the online long connections of `aids`; returns how many were queued."""
        return sum(self.push_to(aid, method, params) for aid in sorted(set(aids)))

    def push_to(self, aid: str, method: str, params: dict[str, Any],
                rows: Callable[[str, str], dict[str, Any] | None] | None = None, skip_device: str = "") -> int:
        """`event/{method}` to each long connection of `aid`, with the connection's device fields;
        with `rows`, each connection also gets its own `inline_message` (rows(device_id, slot_id)) and
        one without a row gets nothing. A member of a federated issuer is reached through its devnet,
        which does the same for its connections (federation.accept_push)."""
        if self.is_foreign(aid):
            from aund.devnet import federation

            inline = None
            if rows is not None:
                devices = {d["device_id"] for d in self.published_prekeys(aid)} | {""}  # "": any device
                inline = {d: row for d in sorted(devices) if (row := rows(d, "")) is not None}
            return int(federation.push_foreign(self.net, aid, method, params, inline, skip_device))
        sent = 0
        stats = self.net.stats
        for conn in list(self.net.live(aid)):
            if conn.kind != "long" or conn.closed or (skip_device and conn.device_id == skip_device):
                continue
            fields = {"device_id": conn.device_id, "target_device_id": conn.device_id, "slot_id": conn.slot_id}
            body = dict(params, **fields)
            if rows is not None:
                row = rows(conn.device_id, conn.slot_id)
                if row is None:
                    continue
                if self.net.faults.should_drop_push():
                    stats.pushes_dropped += 1
                    continue
                body["inline_message"] = dict(row, **fields)
            if conn.push(rpc.notification("event/" + method, body)):
                stats.pushes += 1
                sent += 1
            else:
                stats.pushes_dropped += 1
        return sent

    def push_event(self, event: dict[str, Any], extra_aids: tuple[str, ...] = ()) -> None:
        """`event/group.changed` to the members and to `extra_aids` (a removed member, an applicant).

        Who can pull the event stream gets the event with its `event_seq` (the SDK orders by it and
        fills gaps with group.pull_events); anyone else gets it without, so the SDK publishes it as is.
        """
        gid = event["group_id"]
        readers = {m["aid"] for m in self.members(gid)}
        readers |= {r[0] for r in self.db.execute("SELECT aid FROM grp_departures WHERE group_id=? AND "
                                                  "left_event_seq>=?", (gid, event["event_seq"]))}
        self.push(readers, "group.changed", event)
        others = set(extra_aids) - readers
        if others:
            self.push(others, "group.changed", {k: v for k, v in event.items() if k != "event_seq"})

    # --- state chain -------------------------------------------------------------------------
    def current_member_aids(self, group_id: str) -> set[str]:
        return {m["aid"] for m in self.members(group_id)}

    def commit_proposal(self, group_id: str, proposal: dict[str, Any]) -> dict[str, Any]:
        """CAS the state forward to `proposal`; raises STATE_CONFLICT if its base is gone."""
        with self.net.store.tx() as db:
            group = dict(db.execute("SELECT * FROM grp_groups WHERE group_id=?", (group_id,)).fetchone())
            live = db.execute("SELECT status FROM grp_proposals WHERE proposal_id=?",
                              (proposal["proposal_id"],)).fetchone()
            if live is None or live[0] != "pending":
                raise RpcError(STATE_CONFLICT, "proposal is not pending")
            current = {r[0] for r in db.execute("SELECT aid FROM grp_members WHERE group_id=?", (group_id,))}
            if (proposal["state_version"] != group["state_version"] + 1
                    or proposal["prev_state_hash"] != group["state_hash"]
                    or snapshot_aids(proposal["membership_snapshot"]) != current):
                db.execute("UPDATE grp_proposals SET status='superseded' WHERE proposal_id=?",
                           (proposal["proposal_id"],))
                status = "superseded"
            else:
                status = "confirmed"
                chain = next_chain(group["state_chain"], proposal["state_hash"])
                db.execute("UPDATE grp_groups SET state_version=?, state_hash=?, prev_state_hash=?, state_chain=?, "
                           "membership_snapshot=?, state_signature=?, state_actor_aid=?, updated_at=? "
                           "WHERE group_id=?",
                           (proposal["state_version"], proposal["state_hash"], group["state_hash"], chain,
                            proposal["membership_snapshot"], proposal["signature"], proposal["proposer_aid"],
                            now_ms(), group_id))
                db.execute("UPDATE grp_proposals SET status='confirmed' WHERE proposal_id=?",
                           (proposal["proposal_id"],))
                db.execute("UPDATE grp_proposals SET status='superseded' WHERE group_id=? AND status='pending' "
                           "AND state_version<=?", (group_id, proposal["state_version"]))
        if status != "confirmed":
            raise RpcError(STATE_CONFLICT, "state moved on: propose again on the current state")
        group = self.group(group_id)
        self.push(self.current_member_aids(group_id), "group.v2.state_confirmed", {
            "group_id": group_id, "group_aid": group_id, "proposal_id": proposal["proposal_id"],
            "state_version": group["state_version"], "state_hash": group["state_hash"],
            "state_chain": group["state_chain"], "actor_aid": proposal["proposer_aid"]})
        return group

    def settle_due_proposals(self, group_id: str) -> None:
        """Auto-confirm pending proposals whose deadline passed (the protocol's auto-confirm timeout)."""
        due = self.db.execute("SELECT * FROM grp_proposals WHERE group_id=? AND status='pending' "
                              "AND auto_confirm_at<=? ORDER BY created_at", (group_id, now_ms())).fetchall()
        for row in due:
            try:
                self.commit_proposal(group_id, dict(row))
            except RpcError:
                pass

    def pending_proposal(self, group_id: str) -> dict[str, Any] | None:
        row = self.db.execute("SELECT * FROM grp_proposals WHERE group_id=? AND status='pending' "
                              "ORDER BY created_at DESC LIMIT 1", (group_id,)).fetchone()
        return dict(row) if row else None

    # --- messages ----------------------------------------------------------------------------
    def message_row(self, msg: dict[str, Any], aid: str, device_id: str, slot_id: str) -> dict[str, Any] | None:
        """The row `aid`/`device_id` sees for a stored message (pull page or inline push); None if it has no wrap."""
        base = {"seq": msg["seq"], "message_id": msg["message_id"], "group_id": msg["group_id"],
                "group_aid": msg["group_id"], "from_aid": msg["sender_aid"], "from": msg["sender_aid"],
                "sender_aid": msg["sender_aid"], "sender_device_id": msg["sender_device_id"],
                "t_server": msg["created_at"], "timestamp": msg["created_at"], "need_render": bool(msg["need_render"]),
                "device_id": device_id, "target_device_id": device_id, "slot_id": slot_id,
                "mention_mode": "disabled"}
        if msg["kind"] == "plain":
            return dict(base, version="v1", type=_plain_type(msg["body"]), encrypted=False, payload=rpc.loads(msg["body"]))
        envelope = rpc.loads(msg["body"])
        own = None
        for row in envelope.get("recipients", []):
            if isinstance(row, list) and len(row) == 8 and row[0] == aid and row[1] in (device_id, ""):
                own = row
                if row[1] == device_id:
                    break
        if own is None:
            return None
        split = gw.per_device_envelope(envelope, own, device_id)
        if split is None:
            return None
        return dict(base, version="v2", type="e2ee.group_encrypted", encrypted=True, spk_id=own[5],
                    envelope_json=dumps(split))

    def push_message(self, msg: dict[str, Any]) -> None:
        """`event/group.v2.message_created` (E2EE) or `event/group.message_created` (plain) with an inline row."""
        group_id = msg["group_id"]
        if msg["kind"] == "plain":
            readers = {m["aid"] for m in self.members(group_id)}
        else:
            readers = {r[0] for r in self.db.execute("SELECT DISTINCT aid FROM grp_wraps WHERE group_id=? AND seq=?",
                                                     (group_id, msg["seq"]))}
        method = "group.message_created" if msg["kind"] == "plain" else "group.v2.message_created"
        params = {"module_id": "group", "group_id": group_id, "group_aid": group_id, "seq": msg["seq"],
                  "message_id": msg["message_id"], "sender_aid": msg["sender_aid"],
                  "from_aid": msg["sender_aid"], "sender_device_id": msg["sender_device_id"],
                  "type": _plain_type(msg["body"]) if msg["kind"] == "plain" else "e2ee.group_encrypted",
                  "kind": "group.broadcast",
                  "dispatch": {"mode": "broadcast", "reason": "duty_disabled"}}
        for aid in sorted(readers):
            if self.member(group_id, aid) is None or self.blocked(group_id, aid):
                continue
            self.push_to(aid, method, params, rows=lambda device, slot, aid=aid: self.message_row(msg, aid, device, slot),
                         skip_device=msg["sender_device_id"] if aid == msg["sender_aid"] else "")

    def store_message(self, group: dict[str, Any], sender: str, sender_device: str, message_id: str, kind: str,
                      body: str, need_render: bool, wraps: list[tuple[str, str]]) -> tuple[dict[str, Any], bool]:
        with self.net.store.tx() as db:
            old = db.execute("SELECT * FROM grp_messages WHERE group_id=? AND message_id=?",
                             (group["group_id"], message_id)).fetchone()
            if old is not None:
                return dict(old), False
            seq = db.execute("SELECT message_seq FROM grp_groups WHERE group_id=?",
                             (group["group_id"],)).fetchone()[0] + 1
            msg = {"group_id": group["group_id"], "seq": seq, "message_id": message_id, "sender_aid": sender,
                   "sender_device_id": sender_device, "kind": kind, "body": body, "need_render": int(need_render),
                   "created_at": now_ms()}
            db.execute("INSERT INTO grp_messages VALUES (:group_id,:seq,:message_id,:sender_aid,:sender_device_id,"
                       ":kind,:body,:need_render,:created_at)", msg)
            db.executemany("INSERT INTO grp_wraps VALUES (?,?,?,?,?)",
                           [(group["group_id"], seq, aid, device, i) for i, (aid, device) in enumerate(wraps)])
            db.execute("UPDATE grp_groups SET message_seq=?, updated_at=? WHERE group_id=?",
                       (seq, msg["created_at"], group["group_id"]))
        return msg, True

    def visible_rows(self, group_id: str, member: dict[str, Any], device_id: str, lo: int, hi: int | None,
                     limit: int, *, newest: bool = False) -> list[dict[str, Any]]:
        """Messages with lo < seq [<= hi] that this member device may read, oldest first (the
        first `limit` of them, or with `newest` the last `limit`)."""
        floor = max(lo, member["join_seq"])
        sql = ("SELECT m.* FROM grp_messages m WHERE m.group_id=? AND m.seq>? {hi} AND (m.kind='plain' OR EXISTS "
               "(SELECT 1 FROM grp_wraps w WHERE w.group_id=m.group_id AND w.seq=m.seq AND w.aid=? "
               "AND w.device_id IN (?, ''))) ORDER BY m.seq " + ("DESC " if newest else "") + "LIMIT ?")
        args: list[Any] = [group_id, floor]
        if hi is not None:
            sql = sql.format(hi="AND m.seq<=?")
            args.append(hi)
        else:
            sql = sql.format(hi="")
        args += [member["aid"], device_id, limit]
        rows = [dict(r) for r in self.db.execute(sql, args)]
        return rows[::-1] if newest else rows


def service(net: Devnet) -> GroupService:
    """This devnet's group service (owned by the Devnet, made on first use)."""
    svc = net.services.get("groups")
    if svc is None:
        svc = net.services["groups"] = GroupService(net)
    return svc


# --- handlers --------------------------------------------------------------------------------------
Handler = Callable[["Conn", dict[str, Any]], dict[str, Any]]
GROUP_HANDLERS: dict[str, Handler] = {}


def handler(*methods: str) -> Callable[[Handler], Handler]:
    def register(fn: Handler) -> Handler:
        for method in methods:
            GROUP_HANDLERS[method] = fn
        return fn
    return register


AID_PARAMS = ("aid", "invitee_aid", "member_aid", "applicant_aid")
REFRESH_MEMBERS = {"group.v2.bootstrap": 5.0, "group.v2.send": 60.0, "group.send": 60.0}  # max age, seconds


async def prepare(net: Devnet, method: str, params: dict[str, Any]) -> None:
    """Before a group call: fetch what we lack of the federated AIDs it names or sends to (their
    certificates and devices come from their own devnets; the handlers themselves are synchronous)."""
    svc = service(net)
    wanted = {v.lower(): 60.0 for k in AID_PARAMS if isinstance(v := params.get(k), str) and svc.is_foreign(v.lower())}
    if method in REFRESH_MEMBERS:
        try:
            gid = normalize_group_id(params.get("group_id") or params.get("group_aid"), net.issuer)
        except RpcError:
            gid = ""
        for m in svc.members(gid) if gid else []:
            if svc.is_foreign(m["aid"]):
                wanted[m["aid"]] = min(wanted.get(m["aid"], 1e9), REFRESH_MEMBERS[method])
    for aid, max_age in sorted(wanted.items()):
        await svc.learn(aid, max_age)


def _ctx(conn: Conn, params: dict[str, Any]) -> tuple[GroupService, str]:
    svc = service(conn.net)
    raw = params.get("group_id") or params.get("group_aid")
    return svc, normalize_group_id(raw, conn.net.issuer)


def _cursor_device(conn: Conn, params: dict[str, Any]) -> tuple[str, str]:
    """(device_id, slot key) of the cursor a pull/ack moves: the connection's own."""
    device = params.get("device_id")
    if device not in (None, "", conn.device_id):
        raise RpcError(rpc.INVALID_PARAMS, "device_id must be the connection's device")
    slot = params.get("slot_id")
    if slot not in (None, "") and (not isinstance(slot, str) or ids.slot_isolation_key(slot) != conn.slot_key):
        raise RpcError(rpc.INVALID_PARAMS, "slot_id must be the connection's slot")
    return conn.device_id, conn.slot_key


def _known_aid(conn: Conn, value: Any) -> str:
    aid = validate_aid(value)
    if service(conn.net).cert_pem(aid) is None:
        raise RpcError(rpc.NOT_FOUND, f"unknown aid: {aid}")
    return aid


# --- lifecycle -------------------------------------------------------------------------------------
@handler("group.create")
def rpc_create(conn: Conn, params: dict[str, Any]) -> dict[str, Any]:
    if params.get("group_name") is not None or params.get("public_key") is not None:
        return _identity.create_named(conn, params)  # a named group: its AID and certificate
    name = _text(params, "name", limit=128).strip()
    if not name:
        raise RpcError(rpc.INVALID_PARAMS, "missing param: name")
    requested = params.get("group_aid") or params.get("group_id")
    group_id = normalize_group_id(requested, conn.net.issuer) if requested else None
    request_id = _text(params, "_create_request_id", limit=128)  # the SDK's retry of the same creation
    if request_id and group_id is None:
        row = service(conn.net).db.execute("SELECT group_id FROM grp_create_requests WHERE creator_aid=? AND "
                                           "request_id=?", (conn.aid, request_id)).fetchone()
        if row is not None:
            svc = service(conn.net)
            return _created_view(svc, svc.group(row[0]), conn.aid)
    return create_group(conn, params, name, group_id, request_id=request_id)


def create_group(conn: Conn, params: dict[str, Any], name: str, group_id: str | None, *,
                 request_id: str = "", also: Callable[[Any, str], None] | None = None) -> dict[str, Any]:
    """Create a group owned by the caller (`group_id` None: a fresh `g-<hex>.{issuer}`) and answer
    `group.create`; `also(db, group_id)` runs in the same transaction (a named group's checks)."""
    svc = service(conn.net)
    visibility = _text(params, "visibility", "private")
    if visibility not in ("public", "private"):
        raise RpcError(rpc.INVALID_PARAMS, "visibility must be public or private")
    join_mode = _text(params, "join_mode", "open" if visibility == "public" else "approval")
    if join_mode not in JOIN_MODES:
        raise RpcError(rpc.INVALID_PARAMS, f"join_mode must be one of {', '.join(JOIN_MODES)}")
    now = now_ms()
    with conn.net.store.tx() as db:
        if group_id is not None:
            if db.execute("SELECT 1 FROM grp_groups WHERE group_id=?", (group_id,)).fetchone():
                raise RpcError(GROUP_STATE_INVALID, f"group_id already taken: {group_id}")
        else:
            while True:
                group_id = f"g-{secrets.token_hex(5)}.{conn.net.issuer}"
                if not db.execute("SELECT 1 FROM grp_groups WHERE group_id=?", (group_id,)).fetchone():
                    break
        if also is not None:
            also(db, group_id)
        group = {"group_id": group_id, "name": name, "owner_aid": conn.aid, "creator_aid": conn.aid,
                 "visibility": visibility, "join_mode": join_mode,
                 "join_question": _text(params, "join_question"), "description": _text(params, "description"),
                 "status": "active", "epoch": 1, "message_seq": 0, "event_seq": 0, "created_at": now, "updated_at": now}
        db.execute("INSERT INTO grp_groups (group_id, name, owner_aid, creator_aid, visibility, join_mode, "
                   "join_question, description, status, epoch, message_seq, event_seq, created_at, updated_at) "
                   "VALUES (:group_id,:name,:owner_aid,:creator_aid,:visibility,:join_mode,:join_question,"
                   ":description,:status,:epoch,:message_seq,:event_seq,:created_at,:updated_at)", group)
        event = svc.add_event(db, group, "upsert", conn.aid, member_aid=conn.aid, role="owner")
        svc.insert_member(db, group, conn.aid, "owner", "human", event["event_seq"])
        if request_id:
            db.execute("INSERT OR REPLACE INTO grp_create_requests VALUES (?,?,?)", (conn.aid, request_id, group_id))
    group = svc.group(group_id)
    svc.push([conn.aid], "group.created", {"module_id": "group", "group_id": group_id, "group_aid": group_id,
                                           "owner_aid": conn.aid, "visibility": visibility})
    svc.push_event(event)
    return _created_view(svc, group, conn.aid)


def _created_view(svc: GroupService, group: dict[str, Any], aid: str) -> dict[str, Any]:
    return {"group": svc.group_view(group, "owner"), "group_id": group["group_id"], "group_aid": group["group_id"],
            "aid": aid}


@handler("group.get_info")
def rpc_get_info(conn: Conn, params: dict[str, Any]) -> dict[str, Any]:
    svc, gid = _ctx(conn, params)
    try:
        group = svc.group(gid)
    except RpcError:
        return {"found": False, "group_id": gid, "group_aid": gid}
    view = svc.group_view(group)
    public = {k: view[k] for k in ("group_id", "group_aid", "name", "visibility", "status", "description",
                                   "member_count", "created_at")}
    required = params.get("required") or []
    member = svc.member(gid, conn.aid)
    if isinstance(required, list) and required:
        if member is None:
            raise RpcError(NOT_MEMBER, f"not a member of {gid}")
        public.update({k: view[k] for k in ("owner_aid", "creator_aid", "message_seq", "event_seq", "e2ee_epoch",
                                             "updated_at", "join_mode", "state_version")}, my_role=member["role"])
    return dict(public, found=True)


@handler("group.list_my", "group.list")
def rpc_list_my(conn: Conn, params: dict[str, Any]) -> dict[str, Any]:
    svc = service(conn.net)
    size = gw.int_param(params, "size", gw.int_param(params, "limit", 50, lo=1, hi=200), lo=1, hi=200)
    rows = svc.db.execute("SELECT g.*, m.role AS my_role FROM grp_members m JOIN grp_groups g ON g.group_id=m.group_id "
                          "WHERE m.aid=? ORDER BY g.created_at, g.group_id", (conn.aid,)).fetchall()
    items = [svc.group_view(dict(r), r["my_role"]) for r in rows]
    return {"items": items[:size], "groups": items[:size], "total": len(items), "page": 1, "size": size,
            "aid": conn.aid}


@handler("group.get_members")
def rpc_get_members(conn: Conn, params: dict[str, Any]) -> dict[str, Any]:
    svc, gid = _ctx(conn, params)
    svc.require_member(gid, conn.aid, write=False)
    page = gw.int_param(params, "page", 1, lo=1)
    size = gw.int_param(params, "size", 50, lo=1, hi=200)
    role = params.get("role")
    members = [m for m in svc.members(gid) if not role or m["role"] == role]
    chunk = members[(page - 1) * size: page * size]
    acks = {r["aid"]: r["a"] for r in svc.db.execute(
        "SELECT aid, MAX(ack_seq) AS a FROM grp_cursors WHERE group_id=? AND kind='msg' GROUP BY aid", (gid,))}
    items = [svc.member_view(m, acks.get(m["aid"], 0)) for m in chunk]
    return {"group_id": gid, "group_aid": gid, "members": items, "items": items, "total": len(members),
            "count": len(items), "page": page, "size": size}


@handler("group.get_online_members")
def rpc_get_online_members(conn: Conn, params: dict[str, Any]) -> dict[str, Any]:
    svc, gid = _ctx(conn, params)
    svc.require_member(gid, conn.aid, write=False)
    members = svc.members(gid)
    online = [dict(svc.member_view(m), online=True) for m in members
              if any(c.kind == "long" and not c.closed for c in conn.net.live(m["aid"]))]
    return {"group_id": gid, "group_aid": gid, "members": online, "items": online, "online_members": online,
            "online_count": len(online), "total": len(members), "page": 1, "size": len(online)}


# --- membership ------------------------------------------------------------------------------------
@handler("group.add_member")
def rpc_add_member(conn: Conn, params: dict[str, Any]) -> dict[str, Any]:
    svc, gid = _ctx(conn, params)
    group, _ = svc.require_member(gid, conn.aid, ("owner",))
    aid = _known_aid(conn, params.get("aid"))
    role = _text(params, "role", "member")
    if role not in ("member", "admin"):
        raise RpcError(rpc.INVALID_PARAMS, "role must be member or admin")
    member, event = svc.join(group, aid, role, _text(params, "member_type", "human"), "member_added", conn.aid)
    svc.push_event(event)
    return {"group": svc.group_view(svc.group(gid)), "member": svc.member_view(member)}


def _remove(conn: Conn, svc: GroupService, group: dict[str, Any], aid: str, action: str) -> dict[str, Any]:
    with conn.net.store.tx() as db:
        fresh = dict(db.execute("SELECT * FROM grp_groups WHERE group_id=?", (group["group_id"],)).fetchone())
        gone = db.execute("SELECT * FROM grp_members WHERE group_id=? AND aid=?", (fresh["group_id"], aid)).fetchone()
        if gone is None:
            raise RpcError(NOT_MEMBER, f"not a member: {aid}")
        db.execute("DELETE FROM grp_members WHERE group_id=? AND aid=?", (fresh["group_id"], aid))
        db.execute("DELETE FROM grp_prekeys WHERE group_id=? AND aid=?", (fresh["group_id"], aid))
        db.execute("UPDATE grp_proposals SET status='superseded' WHERE group_id=? AND status='pending'",
                   (fresh["group_id"],))
        db.execute("UPDATE grp_groups SET epoch=epoch+1 WHERE group_id=?", (fresh["group_id"],))
        key = "removed_aid" if action == "member_removed" else "left_aid"
        event = svc.add_event(db, fresh, action, conn.aid, member_aid=aid, aid=aid, **{key: aid})
        # the former member may still read the event stream up to (and including) its departure
        db.execute("INSERT OR REPLACE INTO grp_departures VALUES (?,?,?,?,?)",
                   (fresh["group_id"], aid, gone["join_event_seq"], event["event_seq"], now_ms()))
    svc.push_event(event, extra_aids=(aid,))
    return event


@handler("group.kick", "group.remove_member")
def rpc_kick(conn: Conn, params: dict[str, Any]) -> dict[str, Any]:
    svc, gid = _ctx(conn, params)
    group, me = svc.require_member(gid, conn.aid, ("owner", "admin"))
    aid = validate_aid(params.get("aid") or params.get("member_aid"))
    target = svc.member(gid, aid)
    if target is None:
        raise RpcError(NOT_MEMBER, f"not a member: {aid}")
    if target["role"] == "owner":
        raise RpcError(ROLE_INSUFFICIENT, "the owner cannot be removed")
    if target["role"] == "admin" and me["role"] != "owner":
        raise RpcError(ROLE_INSUFFICIENT, "only the owner can remove an admin")
    _remove(conn, svc, group, aid, "member_removed")
    return {"group": svc.group_view(svc.group(gid)), "removed_aid": aid}


@handler("group.leave")
def rpc_leave(conn: Conn, params: dict[str, Any]) -> dict[str, Any]:
    svc, gid = _ctx(conn, params)
    group, me = svc.require_member(gid, conn.aid)
    if me["role"] == "owner":
        raise RpcError(GROUP_STATE_INVALID, "the owner cannot leave (transfer ownership first)")
    _remove(conn, svc, group, conn.aid, "member_left")
    return {"group": svc.group_view(svc.group(gid)), "left_aid": conn.aid}


def _request_view(r: dict[str, Any]) -> dict[str, Any]:
    return {"group_id": r["group_id"], "aid": r["aid"], "message": r["message"], "answer": r["answer"],
            "status": r["status"], "reviewed_by": r["reviewed_by"], "rejection_reason": r["rejection_reason"],
            "created_at": r["created_at"], "updated_at": r["updated_at"]}


@handler("group.request_join")
def rpc_request_join(conn: Conn, params: dict[str, Any]) -> dict[str, Any]:
    svc, gid = _ctx(conn, params)
    group = svc.group(gid)
    svc.refuse_admission(gid)
    if svc.member(gid, conn.aid) is not None:
        raise RpcError(ALREADY_MEMBER, "already a member")
    svc.refuse_banned(gid, conn.aid, "join")
    if group["join_mode"] in ("invite_only", "closed"):
        raise RpcError(JOIN_REJECTED, f"join rejected: group join_mode is {group['join_mode']}")
    message, answer = _text(params, "message"), _text(params, "answer")
    if group["join_mode"] == "open":
        member, event = svc.join(group, conn.aid, "member", "human", "joined", conn.aid)
        svc.push_event(event)
        return {"status": "joined", "group": svc.group_view(svc.group(gid)), "member": svc.member_view(member)}
    if group["join_question"] and not answer:
        return {"status": "question_required", "question": group["join_question"], "group_id": gid}
    now = now_ms()
    with conn.net.store.tx() as db:
        db.execute("INSERT INTO grp_join_requests VALUES (?,?,?,?,'pending',NULL,NULL,?,?) ON CONFLICT DO UPDATE SET "
                   "message=excluded.message, answer=excluded.answer, status='pending', reviewed_by=NULL, "
                   "rejection_reason=NULL, updated_at=excluded.updated_at", (gid, conn.aid, message, answer, now, now))
        fresh = dict(db.execute("SELECT * FROM grp_groups WHERE group_id=?", (gid,)).fetchone())
        event = svc.add_event(db, fresh, "join_requested", conn.aid, aid=conn.aid, applicant_aid=conn.aid)
    request = _request_view(dict(svc.db.execute("SELECT * FROM grp_join_requests WHERE group_id=? AND aid=?",
                                                (gid, conn.aid)).fetchone()))
    svc.push_event(event)
    return {"status": "pending", "request": request, "group_id": gid}


@handler("group.list_join_requests")
def rpc_list_join_requests(conn: Conn, params: dict[str, Any]) -> dict[str, Any]:
    svc, gid = _ctx(conn, params)
    svc.require_member(gid, conn.aid, ("owner", "admin"))
    status = _text(params, "status", "pending")
    page = gw.int_param(params, "page", 1, lo=1)
    size = gw.int_param(params, "size", 50, lo=1, hi=200)
    rows = [_request_view(dict(r)) for r in svc.db.execute(
        "SELECT * FROM grp_join_requests WHERE group_id=? AND status=? ORDER BY created_at, aid", (gid, status))]
    return {"group_id": gid, "items": rows[(page - 1) * size: page * size], "total": len(rows), "page": page,
            "size": size}


def _review(conn: Conn, svc: GroupService, group: dict[str, Any], aid: str, approve: bool,
            reason: str) -> dict[str, Any]:
    gid = group["group_id"]
    row = svc.db.execute("SELECT * FROM grp_join_requests WHERE group_id=? AND aid=?", (gid, aid)).fetchone()
    if row is None or row["status"] != "pending":
        raise RpcError(GROUP_STATE_INVALID, f"no pending join request from {aid}")
    status = "approved" if approve else "rejected"

    def settle(db: Any) -> None:
        db.execute("UPDATE grp_join_requests SET status=?, reviewed_by=?, rejection_reason=?, updated_at=? "
                   "WHERE group_id=? AND aid=?", (status, conn.aid, None if approve else reason, now_ms(), gid, aid))

    if approve:
        member, event = svc.join(group, aid, "member", "human", "join_approved", conn.aid, also=settle)
    else:
        member = None
        with conn.net.store.tx() as db:
            settle(db)
            fresh = dict(db.execute("SELECT * FROM grp_groups WHERE group_id=?", (gid,)).fetchone())
            event = svc.add_event(db, fresh, "join_rejected", conn.aid, aid=aid, applicant_aid=aid, reason=reason)
    svc.push_event(event, extra_aids=(aid,))
    request = _request_view(dict(svc.db.execute("SELECT * FROM grp_join_requests WHERE group_id=? AND aid=?",
                                                (gid, aid)).fetchone()))
    out: dict[str, Any] = {"status": status, "request": request, "aid": aid}
    if member is not None:
        out["member"] = svc.member_view(member)
    return out


@handler("group.review_join_request")
def rpc_review_join_request(conn: Conn, params: dict[str, Any]) -> dict[str, Any]:
    svc, gid = _ctx(conn, params)
    group, _ = svc.require_member(gid, conn.aid, ("owner", "admin"))
    out = _review(conn, svc, group, validate_aid(params.get("aid")), _bool(params, "approve", True),
                  _text(params, "reason"))
    return dict(out, group=svc.group_view(svc.group(gid)))


@handler("group.batch_review_join_request")
def rpc_batch_review(conn: Conn, params: dict[str, Any]) -> dict[str, Any]:
    svc, gid = _ctx(conn, params)
    group, _ = svc.require_member(gid, conn.aid, ("owner", "admin"))
    aids = params.get("aids")
    if not isinstance(aids, list) or not aids or len(aids) > 200:
        raise RpcError(rpc.INVALID_PARAMS, "aids must be a non-empty list (at most 200)")
    approve = _bool(params, "approve", True)
    results = []
    for raw in aids:
        try:
            results.append(dict(_review(conn, svc, group, validate_aid(raw), approve, _text(params, "reason")),
                                success=True))
        except RpcError as exc:
            results.append({"aid": raw, "success": False, "error": {"code": exc.code, "message": exc.message}})
    return {"group_id": gid, "results": results}


def _invite_view(r: dict[str, Any]) -> dict[str, Any]:
    return {"invite_id": r["invite_id"], "group_id": r["group_id"], "group_aid": r["group_id"],
            "invitee_aid": r["invitee_aid"], "inviter_aid": r["inviter_aid"], "member_type": r["member_type"],
            "status": r["status"], "created_at": r["created_at"], "updated_at": r["updated_at"]}


@handler("group.invite_member")
def rpc_invite_member(conn: Conn, params: dict[str, Any]) -> dict[str, Any]:
    svc, gid = _ctx(conn, params)
    group, _ = svc.require_member(gid, conn.aid)
    me = svc.member(gid, conn.aid)
    if group["visibility"] != "public" and me["role"] not in ("owner", "admin"):
        raise RpcError(ROLE_INSUFFICIENT, "only the owner or an admin may invite to a private group")
    svc.refuse_admission(gid)
    invitee = _known_aid(conn, params.get("invitee_aid") or params.get("aid"))
    if svc.member(gid, invitee) is not None:
        raise RpcError(ALREADY_MEMBER, f"already a member: {invitee}")
    row = svc.db.execute("SELECT * FROM grp_invites WHERE group_id=? AND invitee_aid=? AND inviter_aid=? "
                         "AND status='pending'", (gid, invitee, conn.aid)).fetchone()
    if row is None:
        now = now_ms()
        invite_id = f"inv-{secrets.token_hex(8)}.{conn.net.issuer}"  # names its home (federation routes by it)
        with conn.net.store.tx() as db:
            db.execute("INSERT INTO grp_invites VALUES (?,?,?,?,?,'pending',?,?)",
                       (invite_id, gid, invitee, conn.aid, _text(params, "member_type", "human"), now, now))
        row = svc.db.execute("SELECT * FROM grp_invites WHERE invite_id=?", (invite_id,)).fetchone()
        view = _invite_view(dict(row))
        svc.push([invitee], "group.invite_created", dict(view, invite_ids=[view["invite_id"]],
                                                         inviter_aids=[conn.aid], group_name=group["name"]))
    return {"invite": _invite_view(dict(row)), "status": "pending", "group_id": gid}


@handler("group.list_my_invites")
def rpc_list_my_invites(conn: Conn, params: dict[str, Any]) -> dict[str, Any]:
    svc = service(conn.net)
    page = gw.int_param(params, "page", 1, lo=1)
    size = gw.int_param(params, "size", 50, lo=1, hi=200)
    grouped: dict[str, dict[str, Any]] = {}
    for r in svc.db.execute("SELECT i.*, g.name AS group_name FROM grp_invites i JOIN grp_groups g "
                            "ON g.group_id=i.group_id WHERE i.invitee_aid=? AND i.status='pending' "
                            "ORDER BY i.created_at, i.invite_id", (conn.aid,)):
        item = grouped.setdefault(r["group_id"], {
            "group_id": r["group_id"], "group_aid": r["group_id"], "group_name": r["group_name"],
            "invitee_aid": conn.aid, "invite_id": r["invite_id"], "invite_ids": [], "inviter_aids": [],
            "status": "pending", "created_at": r["created_at"]})
        item["invite_ids"].append(r["invite_id"])
        item["inviter_aids"].append(r["inviter_aid"])
    items = list(grouped.values())
    chunk = items[(page - 1) * size: page * size]
    return {"items": chunk, "invites": chunk, "total": len(items), "page": page, "size": size,
            "has_more": page * size < len(items)}


def _invite_for(conn: Conn, params: dict[str, Any], *, as_inviter: bool = False) -> tuple[GroupService, dict]:
    svc = service(conn.net)
    invite_id = gw.str_param(params, "invite_id")
    row = svc.db.execute("SELECT * FROM grp_invites WHERE invite_id=?", (invite_id,)).fetchone()
    owner = "inviter_aid" if as_inviter else "invitee_aid"
    if row is None or row[owner] != conn.aid:
        raise RpcError(INVITE_INVALID, "invite not found")
    if row["status"] != "pending":
        raise RpcError(INVITE_INVALID, f"invite not pending (status {row['status']})")
    return svc, dict(row)


def _invite_ids(svc: GroupService, invite: dict[str, Any], *, all_for_invitee: bool) -> list[str]:
    """The invites one decision ends: all pending ones for (group, invitee), or just this one."""
    if not all_for_invitee:
        return [invite["invite_id"]]
    return [r[0] for r in svc.db.execute("SELECT invite_id FROM grp_invites WHERE group_id=? AND invitee_aid=? "
                                         "AND status='pending'", (invite["group_id"], invite["invitee_aid"]))]


def _finalize_invites(svc: GroupService, invite: dict[str, Any], status: str, *, all_for_invitee: bool,
                      db: Any = None) -> list[str]:
    ids = _invite_ids(svc, invite, all_for_invitee=all_for_invitee)
    rows = [(status, now_ms(), i) for i in ids]
    if db is not None:
        db.executemany("UPDATE grp_invites SET status=?, updated_at=? WHERE invite_id=?", rows)
    else:
        with svc.net.store.tx() as tx:
            tx.executemany("UPDATE grp_invites SET status=?, updated_at=? WHERE invite_id=?", rows)
    return ids


@handler("group.accept_invite")
def rpc_accept_invite(conn: Conn, params: dict[str, Any]) -> dict[str, Any]:
    svc, invite = _invite_for(conn, params)
    group = svc.group(invite["group_id"])
    ids = _invite_ids(svc, invite, all_for_invitee=True)
    member, event = svc.join(group, conn.aid, "member", invite["member_type"], "member_added", conn.aid,
                             also=lambda db: _finalize_invites(svc, invite, "accepted", all_for_invitee=True, db=db),
                             invite_id=invite["invite_id"], inviter_aid=invite["inviter_aid"])
    svc.push_event(event)
    return {"status": "accepted", "group_id": group["group_id"], "invite_id": invite["invite_id"], "invite_ids": ids,
            "group": svc.group_view(svc.group(group["group_id"])), "member": svc.member_view(member)}


@handler("group.reject_invite")
def rpc_reject_invite(conn: Conn, params: dict[str, Any]) -> dict[str, Any]:
    svc, invite = _invite_for(conn, params)
    ids = _finalize_invites(svc, invite, "rejected", all_for_invitee=True)
    return {"status": "rejected", "group_id": invite["group_id"], "invite_id": invite["invite_id"], "invite_ids": ids}


@handler("group.revoke_invite")
def rpc_revoke_invite(conn: Conn, params: dict[str, Any]) -> dict[str, Any]:
    svc, invite = _invite_for(conn, params, as_inviter=True)
    ids = _finalize_invites(svc, invite, "revoked", all_for_invitee=False)
    svc.push([invite["invitee_aid"]], "group.invite_finalized", {
        "group_id": invite["group_id"], "group_aid": invite["group_id"], "invitee_aid": invite["invitee_aid"],
        "invite_id": invite["invite_id"], "invite_ids": ids, "status": "revoked"})
    return {"status": "revoked", "group_id": invite["group_id"], "invite_id": invite["invite_id"]}


# --- V2 state chain --------------------------------------------------------------------------------
def _state_view(group: dict[str, Any]) -> dict[str, Any]:
    return {"group_id": group["group_id"], "group_aid": group["group_id"], "state_version": group["state_version"],
            "state_hash": group["state_hash"], "prev_state_hash": group["prev_state_hash"],
            "key_epoch": group["epoch"], "membership_snapshot": group["membership_snapshot"], "policy_snapshot": "",
            "state_chain": group["state_chain"], "state_signature": group["state_signature"],
            "state_actor_aid": group["state_actor_aid"], "updated_at": group["updated_at"]}


def _proposal_view(p: dict[str, Any]) -> dict[str, Any]:
    return {k: p[k] for k in ("proposal_id", "group_id", "state_version", "state_hash", "prev_state_hash",
                              "key_epoch", "membership_snapshot", "signature", "proposer_aid", "reason", "status",
                              "auto_confirm_at", "created_at")}


@handler("group.get_state")
def rpc_get_state(conn: Conn, params: dict[str, Any]) -> dict[str, Any]:
    svc, gid = _ctx(conn, params)
    svc.require_member(gid, conn.aid, write=False)
    svc.settle_due_proposals(gid)
    return _state_view(svc.group(gid))


@handler("group.v2.get_proposal")
def rpc_get_proposal(conn: Conn, params: dict[str, Any]) -> dict[str, Any]:
    svc, gid = _ctx(conn, params)
    svc.require_member(gid, conn.aid)
    svc.settle_due_proposals(gid)
    proposal = svc.pending_proposal(gid)
    return {"group_id": gid, "proposal": _proposal_view(proposal) if proposal else None}


@handler("group.v2.propose_state")
def rpc_propose_state(conn: Conn, params: dict[str, Any]) -> dict[str, Any]:
    svc, gid = _ctx(conn, params)
    group, me = svc.require_member(gid, conn.aid, ("owner", "admin"))
    version = gw.int_param(params, "state_version", 0)
    if version == 1 and me["role"] != "owner":
        raise RpcError(ROLE_INSUFFICIENT, "the first signed state must come from the owner")
    state_hash, prev = gw.str_param(params, "state_hash").lower(), gw.str_param(params, "prev_state_hash", required=False).lower()
    snapshot, signature = gw.str_param(params, "membership_snapshot"), gw.str_param(params, "signature")
    key_epoch = gw.int_param(params, "key_epoch", group["epoch"])
    if version != group["state_version"] + 1 or prev != group["state_hash"] or key_epoch != group["epoch"]:
        raise RpcError(STATE_CONFLICT, "stale proposal: state_version/prev_state_hash/key_epoch do not follow the "
                       "committed state", {"state_version": group["state_version"], "state_hash": group["state_hash"],
                                           "key_epoch": group["epoch"]})
    try:
        payload = json.loads(snapshot)
    except ValueError:
        raise RpcError(rpc.INVALID_PARAMS, "membership_snapshot is not JSON") from None
    if not isinstance(payload, dict) or not isinstance(payload.get("members"), list):
        raise RpcError(rpc.INVALID_PARAMS, "membership_snapshot must be an object with members")
    try:
        expected = state_commitment(gid, version, payload)
    except (TypeError, ValueError) as exc:
        raise RpcError(rpc.INVALID_PARAMS, f"membership_snapshot: {exc}") from None
    if state_hash != expected:
        raise RpcError(rpc.INVALID_PARAMS, "state_hash is not the commitment of membership_snapshot")
    try:
        sig = pki.b64d(signature)
    except pki.PKIError:
        raise RpcError(rpc.INVALID_PARAMS, "signature is not base64") from None
    cert = conn.own_cert()
    if not pki.verify_signature(cert.public_key(), sig, state_sign_input(gid, version, state_hash, snapshot)):
        raise RpcError(rpc.INVALID_PARAMS, "state signature does not verify with the proposer's certificate")
    if snapshot_aids(snapshot) != svc.current_member_aids(gid):
        raise RpcError(STATE_CONFLICT, "membership_snapshot does not list the current members")
    seconds = gw.int_param(params, "auto_confirm_seconds", 30, lo=1, hi=600)
    now = now_ms()
    proposal = {"proposal_id": "sp-" + secrets.token_hex(8), "group_id": gid, "state_version": version,
                "state_hash": state_hash, "prev_state_hash": prev, "key_epoch": key_epoch,
                "membership_snapshot": snapshot, "signature": signature, "proposer_aid": conn.aid,
                "reason": _text(params, "reason", limit=200), "status": "pending",
                "auto_confirm_at": now + seconds * 1000, "created_at": now}
    with conn.net.store.tx() as db:
        db.execute("INSERT INTO grp_proposals VALUES (:proposal_id,:group_id,:state_version,:state_hash,"
                   ":prev_state_hash,:key_epoch,:membership_snapshot,:signature,:proposer_aid,:reason,:status,"
                   ":auto_confirm_at,:created_at)", proposal)
    return dict(_proposal_view(proposal), success=True)


@handler("group.v2.confirm_state")
def rpc_confirm_state(conn: Conn, params: dict[str, Any]) -> dict[str, Any]:
    svc, gid = _ctx(conn, params)
    svc.require_member(gid, conn.aid, ("owner", "admin"))
    row = svc.db.execute("SELECT * FROM grp_proposals WHERE proposal_id=? AND group_id=?",
                         (gw.str_param(params, "proposal_id"), gid)).fetchone()
    if row is None:
        raise RpcError(rpc.NOT_FOUND, "proposal not found")
    if row["status"] == "confirmed":  # idempotent replay
        group = svc.group(gid)
        return {"success": True, "status": "confirmed", "group_id": gid, "proposal_id": row["proposal_id"],
                "state_version": row["state_version"], "state_hash": row["state_hash"],
                "state_chain": group["state_chain"]}
    group = svc.commit_proposal(gid, dict(row))
    return {"success": True, "status": "confirmed", "group_id": gid, "proposal_id": row["proposal_id"],
            "state_version": group["state_version"], "state_hash": group["state_hash"],
            "state_chain": group["state_chain"]}


# --- prekeys and bootstrap -------------------------------------------------------------------------
@handler("group.v2.put_group_pk")
def rpc_put_group_pk(conn: Conn, params: dict[str, Any]) -> dict[str, Any]:
    svc, gid = _ctx(conn, params)
    svc.require_member(gid, conn.aid)
    if not conn.device_id:
        raise RpcError(rpc.MISSING_PARAMS, "a prekey needs a device id on the connection")
    if _text(params, "key_source", "group_device_prekey") != "group_device_prekey":
        raise RpcError(rpc.INVALID_PARAMS, "key_source must be group_device_prekey")
    spk_id, spk_pk, sig, timestamp = conn.checked_prekey(params)
    with conn.net.store.tx() as db:
        db.execute("INSERT OR REPLACE INTO grp_prekeys VALUES (?,?,?,?,?,?,?,?)",
                   (gid, conn.aid, conn.device_id, spk_id, spk_pk, sig, timestamp, time.time()))
    return {"success": True, "group_id": gid, "spk_id": spk_id, "device_id": conn.device_id}


@handler("group.v2.bootstrap")
def rpc_group_bootstrap(conn: Conn, params: dict[str, Any]) -> dict[str, Any]:
    svc, gid = _ctx(conn, params)
    svc.require_member(gid, conn.aid)
    svc.settle_due_proposals(gid)
    group = svc.group(gid)
    targets, pending_adds, pending_removes = svc.e2ee_targets(group)
    devices = [d for aid in targets for d in svc.devices(gid, aid)]
    members = sorted(svc.current_member_aids(gid))
    transport = group["join_mode"] == "open"
    result = {"group_id": gid, "group_aid": gid, "epoch": group["epoch"], "devices": devices,
              "audit_recipients": [], "member_aids": members,
              "committed_member_aids": sorted(targets) if group["state_version"] > 0 else [],
              "pending_adds": pending_adds, "pending_removes": pending_removes,
              "state_version": group["state_version"], "state_hash": group["state_hash"],
              "state_chain": group["state_chain"], "state_hash_signed": group["state_hash"],
              "state_signature": group["state_signature"], "state_actor_aid": group["state_actor_aid"],
              "state_membership_snapshot": group["membership_snapshot"],
              "e2ee_security_level": "transport" if transport else "end_to_end"}
    if transport:
        result["e2ee_security_warning"] = "open group: anyone may join, so wraps are not bound to approved members"
    return result


# --- messages --------------------------------------------------------------------------------------
def _check_envelope(conn: Conn, svc: GroupService, group: dict[str, Any], envelope: Any,
                    message_id: str) -> list[tuple[str, str]]:
    """Validate an `e2ee.group_encrypted` envelope for this group and sender; returns its (aid, device) wraps."""
    gid = group["group_id"]
    if (not isinstance(envelope, dict) or envelope.get("type") != "e2ee.group_encrypted"
            or envelope.get("version") != "v2"):
        raise RpcError(rpc.INVALID_PARAMS, "envelope must be an e2ee.group_encrypted v2 envelope")
    aad = envelope.get("aad")
    if not isinstance(aad, dict):
        raise RpcError(rpc.INVALID_PARAMS, "envelope.aad missing")
    if aad.get("group_id") != gid or envelope.get("group_id", gid) != gid:
        raise RpcError(rpc.INVALID_PARAMS, "envelope group_id does not match the group")
    if aad.get("from") != conn.aid:
        raise RpcError(rpc.INVALID_PARAMS, "envelope aad.from is not the sender")
    if aad.get("message_id") != message_id:
        raise RpcError(rpc.INVALID_PARAMS, "envelope aad.message_id does not match message_id")
    if aad.get("epoch") != group["epoch"] or envelope.get("epoch", group["epoch"]) != group["epoch"]:
        raise RpcError(EPOCH_STALE, "epoch mismatch: refresh group.v2.bootstrap",
                       {"epoch": group["epoch"], "retryable": True})
    rows = envelope.get("recipients")
    if not isinstance(rows, list) or not rows:
        raise RpcError(rpc.INVALID_PARAMS, "envelope.recipients must be a non-empty list")
    try:
        digest = merkle.recipients_digest(rows)
    except (ValueError, TypeError, UnicodeError) as exc:
        raise RpcError(rpc.INVALID_PARAMS, f"envelope.recipients: {exc}") from None
    keys = [(r[0], r[1], r[2]) for r in rows]
    if keys != sorted(keys) or len(set(keys)) != len(keys) or any(r[2] not in WRAP_ROLES for r in rows):
        raise RpcError(rpc.INVALID_PARAMS, "envelope.recipients must be sorted, unique rows with a known role")
    if envelope.get("recipients_digest") != digest:
        raise RpcError(rpc.INVALID_PARAMS, "recipients_digest is not the Merkle root of the recipients")
    try:
        signed = (pki.b64d(envelope["ciphertext"]) + pki.b64d(envelope["tag"]) + canonical_json(aad)
                  + bytes.fromhex(digest))
        signature = pki.b64d(envelope["sender_signature"])
    except (KeyError, TypeError, ValueError, pki.PKIError):
        raise RpcError(rpc.INVALID_PARAMS, "envelope ciphertext/tag/sender_signature malformed") from None
    cert = conn.own_cert()
    if not pki.verify_raw(cert.public_key(), signature, signed):
        raise RpcError(rpc.INVALID_PARAMS, "sender_signature does not verify with the sender's certificate")
    members = svc.current_member_aids(gid)
    wrapped = {r[0] for r in rows}
    stale = sorted(wrapped - members | {a for a in wrapped if svc.blocked(gid, a)})
    targets, _, _ = svc.e2ee_targets(group)
    missing = sorted(a for a in targets if a != conn.aid and a not in wrapped and svc.devices(gid, a))
    if stale or missing:
        raise RpcError(RECIPIENTS_STALE, "recipients do not match the group: refresh group.v2.bootstrap",
                       {"stale_aids": stale, "missing_aids": missing, "retryable": True})
    return [(r[0], r[1]) for r in rows]


def _send_result(gid: str, msg: dict[str, Any], created: bool, message_type: str) -> dict[str, Any]:
    return {"group_id": gid, "group_aid": gid, "seq": msg["seq"], "message_id": msg["message_id"],
            "timestamp": msg["created_at"], "status": "sent" if created else "duplicate",
            "message": {"group_id": gid, "seq": msg["seq"], "message_id": msg["message_id"],
                        "sender_aid": msg["sender_aid"], "message_type": message_type,
                        "created_at": msg["created_at"]},
            "mention_mode": "disabled", "dispatch": {"mode": "broadcast", "reason": "duty_disabled"}}


def _message_id(params: dict[str, Any], default: str) -> str:
    message_id = gw.str_param(params, "message_id", required=False) or default
    if len(message_id) > 128:
        raise RpcError(rpc.INVALID_PARAMS, "message_id longer than 128 characters")
    return message_id


def _check_body(obj: Any) -> str:
    try:
        rpc.check_depth(obj, rpc.MAX_DEPTH - gw.MAX_ROW_WRAPPING)
    except rpc.FrameError as exc:
        raise RpcError(rpc.INVALID_PARAMS, f"payload: {exc}") from None
    body = dumps(obj)
    if len(body.encode("utf-8")) > gw.MAX_PAYLOAD_BYTES:
        raise RpcError(rpc.INTERNAL_ERROR, "payload larger than 1 MB")
    return body


def _sender(conn: Conn, params: dict[str, Any]) -> tuple[GroupService, str, Any]:
    """(service, group id, group) for a send: a member who may send (not muted, not banned)."""
    svc, gid = _ctx(conn, params)
    group, member = svc.require_member(gid, conn.aid)
    svc.refuse_send(group, member)
    svc.refuse_banned(gid, conn.aid, "send")
    return svc, gid, group


@handler("group.v2.send")
def rpc_v2_send(conn: Conn, params: dict[str, Any]) -> dict[str, Any]:
    svc, gid, group = _sender(conn, params)
    envelope = params.get("envelope")
    aad = envelope.get("aad") if isinstance(envelope, dict) else None
    message_id = _message_id(params, aad.get("message_id", "") if isinstance(aad, dict) else "")
    if not message_id:
        raise RpcError(rpc.INVALID_PARAMS, "missing param: message_id")
    need_render = _bool(params, "need_render", True)
    body = _check_body(envelope)
    old = svc.db.execute("SELECT * FROM grp_messages WHERE group_id=? AND message_id=?", (gid, message_id)).fetchone()
    if old is not None:  # idempotent resend, checked before the (possibly changed) member set
        return _send_result(gid, dict(old), False, "e2ee.group_encrypted")
    wraps = _check_envelope(conn, svc, group, envelope, message_id)
    sender_device = str(aad.get("from_device") or conn.device_id)
    msg, created = svc.store_message(group, conn.aid, sender_device, message_id, "e2ee", body, need_render, wraps)
    if created:
        svc.note_sent(gid, conn.aid, "e2ee.group_encrypted")
        svc.push_message(msg)
    return _send_result(gid, msg, created, "e2ee.group_encrypted")


@handler("group.send")
def rpc_send_plain(conn: Conn, params: dict[str, Any]) -> dict[str, Any]:
    svc, gid, group = _sender(conn, params)
    payload = params.get("payload")
    if not isinstance(payload, dict):
        raise RpcError(rpc.INVALID_PARAMS, "payload must be an object")
    if payload.get("type") in ("e2ee.group_encrypted", "e2ee.encrypted"):
        raise RpcError(rpc.INVALID_PARAMS, "encrypted group messages go through group.v2.send")
    message_id = _message_id(params, "gm-" + secrets.token_hex(16))
    msg, created = svc.store_message(group, conn.aid, conn.device_id, message_id, "plain", _check_body(payload),
                                     _bool(params, "need_render", True), [])
    if created:
        svc.note_sent(gid, conn.aid, str(payload.get("type") or "message"))
        svc.push_message(msg)
    return _send_result(gid, msg, created, str(payload.get("type") or "message"))


@handler("group.v2.pull")
def rpc_v2_pull(conn: Conn, params: dict[str, Any]) -> dict[str, Any]:
    svc, gid = _ctx(conn, params)
    group, member = svc.require_member(gid, conn.aid)
    svc.refuse_blocked(gid, conn.aid)
    device, slot_key = _cursor_device(conn, params)
    after = gw.int_param(params, "after_seq", gw.int_param(params, "after_message_seq", 0))
    limit = gw.int_param(params, "limit", 50, lo=1, hi=PULL_MAX_LIMIT)
    head = group["message_seq"]
    if params.get("window_mode") == "tail":
        if "ack_up_to_seq" in params or params.get("force") is True:
            raise RpcError(rpc.INVALID_PARAMS, "tail pulls take neither ack_up_to_seq nor force")
        start = head if head <= after else max(after + 1, head - limit + 1)
        rows = svc.visible_rows(gid, member, device, start - 1, head, limit) if head > after else []
        messages = [r for r in (svc.message_row(m, conn.aid, device, conn.slot_id) for m in rows) if r]
        return {"group_id": gid, "group_aid": gid, "window_mode": "tail", "after_seq": after,
                "window_start_seq": start, "head_seq": head, "covered_through_seq": head, "messages": messages,
                "count": len(messages), "latest_message_seq": head, "limit": limit}
    if params.get("window_mode") not in (None, "", "forward"):
        raise RpcError(rpc.INVALID_PARAMS, "window_mode must be tail or absent")
    if "ack_up_to_seq" in params:
        _ack(svc, gid, conn.aid, device, slot_key, "msg", gw.int_param(params, "ack_up_to_seq", 0), head)
    rows = svc.visible_rows(gid, member, device, after, None, limit + 1)
    has_more = len(rows) > limit
    messages = [r for r in (svc.message_row(m, conn.aid, device, conn.slot_id) for m in rows[:limit]) if r]
    kept = conn.net.page_rows_that_fit(messages)
    if kept < len(messages):  # bounded by bytes: the next page starts after the last row kept
        has_more, messages = True, messages[:kept]
    ack = svc.cursor(gid, conn.aid, device, slot_key, "msg")
    unread = svc.db.execute("SELECT COUNT(*) FROM grp_messages WHERE group_id=? AND seq>?",
                            (gid, max(ack, member["join_seq"]))).fetchone()[0]
    return {"group_id": gid, "group_aid": gid, "messages": messages, "count": len(messages), "has_more": has_more,
            "latest_message_seq": head, "limit": limit, "retention_floor_message_seq": 0,
            "earliest_available_message_seq": member["join_seq"] + 1,
            "cursor": {"current_seq": ack, "join_seq": member["join_seq"], "latest_seq": head,
                       "unread_count": unread}}


@handler("group.history")
def rpc_history(conn: Conn, params: dict[str, Any]) -> dict[str, Any]:
    """One read-only page of the group's messages this device may read with seq < `before_seq`
    (newest selected, oldest first); moves no cursor."""
    svc, gid = _ctx(conn, params)
    _, member = svc.require_member(gid, conn.aid)
    svc.refuse_blocked(gid, conn.aid)
    device, _ = _cursor_device(conn, params)
    before, limit = gw.history_window(params, HISTORY_MAX_LIMIT)
    rows = svc.visible_rows(gid, member, device, 0, before - 1, limit + 1, newest=True)
    messages = [r for r in (svc.message_row(m, conn.aid, device, conn.slot_id) for m in rows[-limit:]) if r]
    return dict(gw.history_page(messages, len(rows) > limit), group_id=gid, group_aid=gid,
                retention_floor_seq=0, earliest_available_seq=member["join_seq"] + 1)


def _ack(svc: GroupService, gid: str, aid: str, device: str, slot_key: str, kind: str, up_to: int, head: int) -> int:
    with svc.net.store.tx() as db:
        db.execute("INSERT INTO grp_cursors VALUES (?,?,?,?,?,?) ON CONFLICT DO UPDATE SET "
                   "ack_seq=MAX(ack_seq, excluded.ack_seq)", (gid, aid, device, slot_key, kind, min(up_to, head)))
        return db.execute("SELECT ack_seq FROM grp_cursors WHERE group_id=? AND aid=? AND device_id=? AND slot_key=? "
                          "AND kind=?", (gid, aid, device, slot_key, kind)).fetchone()[0]


@handler("group.v2.ack")
def rpc_v2_ack(conn: Conn, params: dict[str, Any]) -> dict[str, Any]:
    svc, gid = _ctx(conn, params)
    group, _ = svc.require_member(gid, conn.aid)
    device, slot_key = _cursor_device(conn, params)
    up_to = gw.int_param(params, "up_to_seq", gw.int_param(params, "msg_seq", 0))
    effective = _ack(svc, gid, conn.aid, device, slot_key, "msg", up_to, group["message_seq"])
    return {"success": True, "group_id": gid, "group_aid": gid, "aid": conn.aid, "ack_seq": effective,
            "effective_ack_seq": effective, "latest_message_seq": group["message_seq"]}


# --- events ----------------------------------------------------------------------------------------
def _event_window(svc: GroupService, gid: str, aid: str) -> tuple[dict[str, Any], int, int]:
    """(group, first visible event_seq, last visible event_seq) for a member or a former member."""
    group = svc.group(gid)
    member = svc.member(gid, aid)
    if member is not None:
        return group, member["join_event_seq"], group["event_seq"]
    gone = svc.db.execute("SELECT * FROM grp_departures WHERE group_id=? AND aid=?", (gid, aid)).fetchone()
    if gone is None:
        raise RpcError(NOT_MEMBER, f"not a member of {gid}")
    return group, gone["join_event_seq"], gone["left_event_seq"]


@handler("group.pull_events")
def rpc_pull_events(conn: Conn, params: dict[str, Any]) -> dict[str, Any]:
    svc, gid = _ctx(conn, params)
    group, first, last = _event_window(svc, gid, conn.aid)
    device, slot_key = _cursor_device(conn, params)
    after = gw.int_param(params, "after_event_seq", 0)
    limit = gw.int_param(params, "limit", 50, lo=1, hi=EVENTS_MAX_LIMIT)
    rows = svc.db.execute("SELECT body FROM grp_events WHERE group_id=? AND event_seq>? AND event_seq<=? "
                          "ORDER BY event_seq LIMIT ?", (gid, max(after, first - 1), last, limit + 1)).fetchall()
    events = [rpc.loads(r[0]) for r in rows[:limit]]
    ack = svc.cursor(gid, conn.aid, device, slot_key, "event")
    return {"group_id": gid, "group_aid": gid, "events": events, "count": len(events),
            "has_more": len(rows) > limit, "latest_event_seq": last,
            "retention_floor_event_seq": 0, "earliest_available_event_seq": first,
            "cursor": {"current_seq": ack, "join_seq": first - 1, "latest_seq": last}}


@handler("group.ack_events")
def rpc_ack_events(conn: Conn, params: dict[str, Any]) -> dict[str, Any]:
    svc, gid = _ctx(conn, params)
    _, _, last = _event_window(svc, gid, conn.aid)
    device, slot_key = _cursor_device(conn, params)
    effective = _ack(svc, gid, conn.aid, device, slot_key, "event", gw.int_param(params, "event_seq", 0), last)
    return {"success": True, "group_id": gid, "ack_seq": effective, "event_seq": effective}


# --- thoughts (memory only) ------------------------------------------------------------------------
@handler("group.thought.put")
def rpc_thought_put(conn: Conn, params: dict[str, Any]) -> dict[str, Any]:
    svc, gid, group = _sender(conn, params)
    key, ctx = thoughts.context_of(params)
    envelope = params.get("payload")
    if params.get("encrypted") is not True or not isinstance(envelope, dict) \
            or envelope.get("type") != "e2ee.group_encrypted" or envelope.get("version") != "v2":
        raise RpcError(rpc.INVALID_PARAMS, "group.thought.put carries an encrypted e2ee.group_encrypted v2 payload")
    thought_id = gw.str_param(params, "thought_id", required=False) or "gt-" + secrets.token_hex(16)
    _check_body(envelope)
    _check_envelope(conn, svc, group, envelope, thought_id)  # same rules as a message: wraps for the members
    now = now_ms()
    head = thoughts.keep(svc.thoughts.setdefault((gid, conn.aid), {}), key, {
        "thought_id": thought_id, "message_id": thought_id, "context": ctx, "payload": envelope,
        "sender_aid": conn.aid, "created_at": now,
        "timestamp": params.get("timestamp") if isinstance(params.get("timestamp"), int) else now}, now)
    return {"group_id": gid, "sender_aid": conn.aid, "context": ctx, "thought_id": thought_id,
            "stored_count": len(head.items), "updated_at": now}


@handler("group.thought.get")
def rpc_thought_get(conn: Conn, params: dict[str, Any]) -> dict[str, Any]:
    svc, gid = _ctx(conn, params)
    svc.require_member(gid, conn.aid)
    sender = validate_aid(params.get("sender_aid"))
    key, ctx = thoughts.context_of(params)
    head = svc.thoughts.get((gid, sender), {}).get(key)
    if head is None:
        return {"found": False, "group_id": gid, "sender_aid": sender, "context": ctx, "thoughts": []}
    return {"found": True, "group_id": gid, "sender_aid": sender, "context": ctx,
            "thoughts": [dict(i) for i in head.items], "updated_at": head.updated_at}


from aund.devnet import group_admin as _admin  # noqa: E402,F401  (its handlers join GROUP_HANDLERS)
from aund.devnet import group_moderation as _moderation  # noqa: E402,F401  (likewise)
from aund.devnet import group_identity as _identity  # noqa: E402  (named groups, bind/renew, admission, cards)

gw.register(GROUP_HANDLERS, __name__)
