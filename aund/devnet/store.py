"""devnet: durable state in one SQLite database (WAL): certificates, tokens, prekeys, inboxes, acks.

Every write is one transaction; a reply that says "stored" is sent only after COMMIT, so a
SIGKILL never loses what a client was told was stored. The devnet is a test gateway in one
process, so calls run on the event loop thread: each one is a handful of indexed statements.
"""
from __future__ import annotations

import hashlib
import json
import secrets
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SCHEMA = """
CREATE TABLE IF NOT EXISTS certs (
    serial_hex TEXT PRIMARY KEY, aid TEXT NOT NULL, der_sha256 TEXT NOT NULL, spki_sha256 TEXT NOT NULL,
    pem TEXT NOT NULL, created_at REAL NOT NULL, revoked INTEGER NOT NULL DEFAULT 0, revoked_at REAL,
    key_purpose TEXT NOT NULL DEFAULT 'signing');
CREATE INDEX IF NOT EXISTS certs_aid ON certs(aid, created_at);
CREATE TABLE IF NOT EXISTS tokens (
    token_hash TEXT PRIMARY KEY, kind TEXT NOT NULL, aid TEXT NOT NULL, expires_at REAL NOT NULL,
    revoked INTEGER NOT NULL DEFAULT 0);
CREATE TABLE IF NOT EXISTS prekeys (
    aid TEXT NOT NULL, device_id TEXT NOT NULL, key_source TEXT NOT NULL, spk_id TEXT NOT NULL,
    spk_pk TEXT NOT NULL, spk_signature TEXT NOT NULL, spk_timestamp INTEGER NOT NULL, updated_at REAL NOT NULL,
    PRIMARY KEY (aid, device_id));
CREATE TABLE IF NOT EXISTS messages (
    receiver TEXT NOT NULL, seq INTEGER NOT NULL, sender TEXT NOT NULL, sender_device_id TEXT NOT NULL,
    message_id TEXT NOT NULL, kind TEXT NOT NULL, body TEXT NOT NULL, need_render INTEGER NOT NULL,
    t_server INTEGER NOT NULL, prev_peer_seq INTEGER NOT NULL, PRIMARY KEY (receiver, seq));
CREATE INDEX IF NOT EXISTS messages_peer ON messages(receiver, sender, seq);
CREATE UNIQUE INDEX IF NOT EXISTS messages_dedupe ON messages(receiver, sender, message_id);
CREATE TABLE IF NOT EXISTS acks (
    receiver TEXT NOT NULL, device_id TEXT NOT NULL, slot_key TEXT NOT NULL, sender TEXT NOT NULL,
    ack_seq INTEGER NOT NULL, PRIMARY KEY (receiver, device_id, slot_key, sender));
CREATE TABLE IF NOT EXISTS agent_md (
    aid TEXT PRIMARY KEY, body BLOB NOT NULL, etag TEXT NOT NULL, updated_at REAL NOT NULL);
"""


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class StoredMessage:
    receiver: str
    seq: int
    sender: str
    sender_device_id: str
    message_id: str
    kind: str  # "plain" (body = payload JSON) or "e2ee" (body = envelope JSON)
    body: str
    need_render: bool
    t_server: int
    prev_peer_seq: int


class Store:
    """The devnet's database. Methods raise sqlite3.Error only on real storage faults."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self.db.row_factory = sqlite3.Row
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")
        self.db.execute("PRAGMA busy_timeout=5000")  # several devnet gateways may share one state dir
        self.db.executescript(SCHEMA)
        # columns added after the first databases were made (revocation, then group identities)
        for column, decl in (("revoked_at", "REAL"), ("key_purpose", "TEXT NOT NULL DEFAULT 'signing'")):
            if column not in {r["name"] for r in self.db.execute("PRAGMA table_info(certs)")}:
                with self.tx() as db:
                    if column not in {r["name"] for r in db.execute("PRAGMA table_info(certs)")}:
                        db.execute(f"ALTER TABLE certs ADD COLUMN {column} {decl}")

    def close(self) -> None:
        self.db.close()

    @contextmanager
    def tx(self) -> Iterator[sqlite3.Connection]:
        self.db.execute("BEGIN IMMEDIATE")
        try:
            yield self.db
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        self.db.execute("COMMIT")

    # --- certificates --------------------------------------------------------------------
    def add_cert(self, aid: str, serial_hex: str, der_sha256: str, spki_sha256: str, pem: str,
                 key_purpose: str = "signing", *, revoke_previous: bool = False) -> None:
        """Store a new current certificate of `aid` (`key_purpose`: "signing" for an agent,
        "group_identity" for a group); with `revoke_previous` the one it replaces is revoked in the
        same transaction (a group rekey)."""
        with self.tx() as db:
            now = time.time()
            if revoke_previous:
                db.execute("UPDATE certs SET revoked=1, revoked_at=? WHERE aid=? AND revoked=0", (now, aid))
            db.execute("INSERT INTO certs (serial_hex, aid, der_sha256, spki_sha256, pem, created_at, key_purpose) "
                       "VALUES (?,?,?,?,?,?,?)", (serial_hex, aid, der_sha256, spki_sha256, pem, now, key_purpose))

    def cert_state(self, aid: str, fp_hex: str = "") -> dict[str, Any] | None:
        """The certificate of `aid` that `/pki/cert` answers (the current one, or the one whose
        DER or SPKI SHA-256 starts with fp_hex): its pem, der_sha256, key_purpose, revoked_at
        (None if not revoked) and whether it is the current one."""
        rows = self.db.execute("SELECT * FROM certs WHERE aid=? ORDER BY created_at DESC", (aid,)).fetchall()
        for index, row in enumerate(rows):
            if not fp_hex or row["der_sha256"].startswith(fp_hex) or row["spki_sha256"].startswith(fp_hex):
                revoked_at = (row["revoked_at"] or row["created_at"]) if row["revoked"] else None
                return {"pem": row["pem"], "der_sha256": row["der_sha256"], "key_purpose": row["key_purpose"],
                        "serial_hex": row["serial_hex"], "revoked_at": revoked_at, "current": index == 0,
                        "created_at": row["created_at"]}
        return None

    def current_cert(self, aid: str) -> str | None:
        """The AID's newest certificate, revoked or not (clients learn of a revocation from the CRL
        and OCSP, as in production; `current_revoked_at` says whether it is)."""
        row = self.db.execute("SELECT pem FROM certs WHERE aid=? ORDER BY created_at DESC LIMIT 1",
                              (aid,)).fetchone()
        return row["pem"] if row else None

    def current_revoked_at(self, aid: str) -> float | None:
        """When the AID's newest certificate was revoked, None if it is not (or there is none)."""
        row = self.db.execute("SELECT revoked, revoked_at, created_at FROM certs WHERE aid=? "
                              "ORDER BY created_at DESC LIMIT 1", (aid,)).fetchone()
        if row is None or not row["revoked"]:
            return None
        return row["revoked_at"] if row["revoked_at"] is not None else row["created_at"]

    def revoke_current(self, aid: str) -> tuple[str, float, bool] | None:
        """Revoke the AID's newest certificate: (serial hex, revoked_at, newly revoked); None for an
        AID without certificates. Revoking twice keeps the first time."""
        with self.tx() as db:
            row = db.execute("SELECT serial_hex, revoked, revoked_at FROM certs WHERE aid=? "
                             "ORDER BY created_at DESC LIMIT 1", (aid,)).fetchone()
            if row is None:
                return None
            if row["revoked"]:
                return row["serial_hex"], row["revoked_at"] or 0.0, False
            now = time.time()
            db.execute("UPDATE certs SET revoked=1, revoked_at=? WHERE serial_hex=?", (now, row["serial_hex"]))
            return row["serial_hex"], now, True

    def cert_by_fingerprint(self, aid: str, fp_hex: str) -> str | None:
        """A cert of `aid` whose DER or SPKI SHA-256 starts with fp_hex (16 or 64 hex)."""
        found = self.cert_state(aid, fp_hex.lower())
        return found["pem"] if found else None

    def cert_by_serial(self, serial_hex: str) -> tuple[str, float | None] | None:
        """(PEM, revoked_at or None) of the certificate with this serial."""
        row = self.db.execute("SELECT pem, revoked, revoked_at, created_at FROM certs WHERE serial_hex=?",
                              (serial_hex.lower(),)).fetchone()
        if row is None:
            return None
        return row["pem"], (row["revoked_at"] or row["created_at"]) if row["revoked"] else None

    def revoked_certs(self) -> list[tuple[int, float]]:
        """(serial, revoked_at) of every revoked certificate, for the CRL."""
        return [(int(r["serial_hex"], 16), r["revoked_at"] or r["created_at"])
                for r in self.db.execute("SELECT serial_hex, revoked_at, created_at FROM certs WHERE revoked=1")]

    # --- tokens --------------------------------------------------------------------------
    def issue_tokens(self, aid: str, access_ttl: float, refresh_ttl: float) -> tuple[str, str, float]:
        access, refresh = "dat_" + secrets.token_urlsafe(32), "drt_" + secrets.token_urlsafe(32)
        now = time.time()
        with self.tx() as db:
            db.execute("INSERT INTO tokens VALUES (?,?,?,?,0)", (token_hash(access), "access", aid, now + access_ttl))
            db.execute("INSERT INTO tokens VALUES (?,?,?,?,0)", (token_hash(refresh), "refresh", aid, now + refresh_ttl))
        return access, refresh, now + access_ttl

    def token_aid(self, token: str, kind: str) -> str | None:
        """The AID a live, unrevoked token of `kind` belongs to, else None."""
        row = self.db.execute("SELECT aid, expires_at, revoked FROM tokens WHERE token_hash=? AND kind=?",
                              (token_hash(token), kind)).fetchone()
        if row is None or row["revoked"] or row["expires_at"] <= time.time():
            return None
        return row["aid"]

    def rotate_refresh(self, refresh_token: str, aid: str | None, access_ttl: float,
                       refresh_ttl: float) -> tuple[str, str, str, float] | None:
        """Spend a live refresh token (single use) and issue a new pair: (aid, access, refresh,
        expires_at); None if the token is not live, or belongs to another AID than `aid` (the token
        alone names its AID when `aid` is None)."""
        with self.tx() as db:
            row = db.execute("SELECT aid FROM tokens WHERE token_hash=? AND kind='refresh' AND revoked=0 "
                             "AND expires_at>?", (token_hash(refresh_token), time.time())).fetchone()
            if row is None or (aid is not None and row["aid"] != aid):
                return None
            db.execute("UPDATE tokens SET revoked=1 WHERE token_hash=?", (token_hash(refresh_token),))
        return (row["aid"], *self.issue_tokens(row["aid"], access_ttl, refresh_ttl))

    # --- prekeys -------------------------------------------------------------------------
    def put_prekey(self, aid: str, device_id: str, entry: dict[str, Any]) -> None:
        with self.tx() as db:
            db.execute("INSERT OR REPLACE INTO prekeys VALUES (?,?,?,?,?,?,?,?)",
                       (aid, device_id, entry["key_source"], entry["spk_id"], entry["spk_pk"],
                        entry["spk_signature"], int(entry["spk_timestamp"]), time.time()))

    def prekeys(self, aid: str) -> list[sqlite3.Row]:
        return self.db.execute("SELECT * FROM prekeys WHERE aid=? ORDER BY device_id", (aid,)).fetchall()

    # --- messages ------------------------------------------------------------------------
    def append_message(self, receiver: str, sender: str, sender_device_id: str, message_id: str, kind: str,
                       body: str, need_render: bool) -> tuple[StoredMessage, bool]:
        """Store one message for `receiver`; returns (row, created). A repeated message_id is not stored again."""
        with self.tx() as db:
            old = db.execute("SELECT * FROM messages WHERE receiver=? AND sender=? AND message_id=?",
                             (receiver, sender, message_id)).fetchone()
            if old is not None:
                return _message(old), False
            head = db.execute("SELECT COALESCE(MAX(seq), 0) FROM messages WHERE receiver=?", (receiver,)).fetchone()[0]
            prev = db.execute("SELECT COALESCE(MAX(seq), 0) FROM messages WHERE receiver=? AND sender=?",
                              (receiver, sender)).fetchone()[0]
            row = StoredMessage(receiver, head + 1, sender, sender_device_id, message_id, kind, body,
                                need_render, int(time.time() * 1000), prev)
            db.execute("INSERT INTO messages VALUES (?,?,?,?,?,?,?,?,?,?)",
                       (row.receiver, row.seq, row.sender, row.sender_device_id, row.message_id, row.kind,
                        row.body, int(row.need_render), row.t_server, row.prev_peer_seq))
        return row, True

    def peer_rows(self, receiver: str, sender: str, after_seq: int, limit: int) -> list[StoredMessage]:
        rows = self.db.execute("SELECT * FROM messages WHERE receiver=? AND sender=? AND seq>? ORDER BY seq LIMIT ?",
                               (receiver, sender, after_seq, limit)).fetchall()
        return [_message(r) for r in rows]

    def peer_rows_before(self, receiver: str, sender: str, before_seq: int, limit: int) -> list[StoredMessage]:
        """The newest `limit` rows from `sender` with seq < before_seq, oldest first (a history page)."""
        rows = self.db.execute("SELECT * FROM messages WHERE receiver=? AND sender=? AND seq<? ORDER BY seq DESC "
                               "LIMIT ?", (receiver, sender, before_seq, limit)).fetchall()
        return [_message(r) for r in reversed(rows)]

    def peer_head(self, receiver: str, sender: str) -> int:
        return self.db.execute("SELECT COALESCE(MAX(seq), 0) FROM messages WHERE receiver=? AND sender=?",
                               (receiver, sender)).fetchone()[0]

    def peers(self, receiver: str, device_id: str, slot_key: str) -> list[dict[str, Any]]:
        rows = self.db.execute(
            "SELECT m.sender AS sender, MAX(m.seq) AS head, COALESCE(a.ack_seq, 0) AS ack, "
            "(SELECT MIN(seq) FROM messages x WHERE x.receiver=m.receiver AND x.sender=m.sender "
            " AND x.seq>COALESCE(a.ack_seq, 0)) AS next_pending "
            "FROM messages m LEFT JOIN acks a ON a.receiver=m.receiver AND a.sender=m.sender "
            " AND a.device_id=? AND a.slot_key=? WHERE m.receiver=? GROUP BY m.sender ORDER BY m.sender",
            (device_id, slot_key, receiver)).fetchall()
        return [dict(r) for r in rows]

    def get_ack(self, receiver: str, device_id: str, slot_key: str, sender: str) -> int:
        row = self.db.execute("SELECT ack_seq FROM acks WHERE receiver=? AND device_id=? AND slot_key=? AND sender=?",
                              (receiver, device_id, slot_key, sender)).fetchone()
        return row[0] if row else 0

    def ack(self, receiver: str, device_id: str, slot_key: str, sender: str, up_to: int) -> int:
        """Raise the cumulative ack (never lowers it, never past the sender's head); returns the effective ack."""
        with self.tx() as db:
            head = db.execute("SELECT COALESCE(MAX(seq), 0) FROM messages WHERE receiver=? AND sender=?",
                              (receiver, sender)).fetchone()[0]
            db.execute("INSERT INTO acks VALUES (?,?,?,?,?) ON CONFLICT DO UPDATE SET "
                       "ack_seq=MAX(ack_seq, excluded.ack_seq)",
                       (receiver, device_id, slot_key, sender, min(up_to, head)))
            return db.execute("SELECT ack_seq FROM acks WHERE receiver=? AND device_id=? AND slot_key=? AND sender=?",
                              (receiver, device_id, slot_key, sender)).fetchone()[0]

    # --- agent.md ------------------------------------------------------------------------
    def agent_md(self, aid: str) -> tuple[bytes, str] | None:
        row = self.db.execute("SELECT body, etag FROM agent_md WHERE aid=?", (aid,)).fetchone()
        return (bytes(row["body"]), row["etag"]) if row else None

    def delete_agent_md(self, aid: str) -> bool:
        """Forget an AID's agent.md (a test knob); True when there was one."""
        with self.tx() as db:
            return db.execute("DELETE FROM agent_md WHERE aid=?", (aid,)).rowcount > 0

    def put_agent_md(self, aid: str, body: bytes) -> str:
        etag = '"' + hashlib.sha256(body).hexdigest() + '"'  # what fastaun's in_sync compares with
        with self.tx() as db:
            db.execute("INSERT OR REPLACE INTO agent_md VALUES (?,?,?,?)", (aid, body, etag, time.time()))
        return etag


def _message(row: sqlite3.Row) -> StoredMessage:
    return StoredMessage(row["receiver"], row["seq"], row["sender"], row["sender_device_id"], row["message_id"],
                         row["kind"], row["body"], bool(row["need_render"]), row["t_server"], row["prev_peer_seq"])


def dumps(obj: Any) -> str:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"))
