"""The durable inbox: every event aund receives for its AIDs, committed BEFORE it is acked upstream.

One SQLite database (WAL) per daemon under the state dir. Rows get a cursor (monotonic integer)
that apps ack per named consumer; a repeated (aid, kind, sender, message_id) is stored once, so a
message re-delivered after a crash or a replay shows up only once. Event data (decrypted
payloads) is encrypted at rest with a key derived from the daemon's seed.

The gateway cursors (`peer_acks`) live in the same database and move in the same transaction as
the rows they cover: after a crash, aund resumes pulling right after what it has committed.

Writes are group-committed: every write is a job on one queue, and the first writer to find no
batch in flight writes every job waiting, each in its own savepoint, in one transaction with one
fsync, in a worker thread, on the inbox's write connection; the writers behind it wait for their
job's outcome (a failed job is rolled back alone; a failed commit fails the batch). Many links
committing at once thus share fsyncs. Reads run inline on a second connection (WAL readers never
wait for the writer), one at a time.
"""
from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog
import trio
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from aund.errors import StorageError

log = structlog.get_logger("aund.inbox")

SCHEMA = """
CREATE TABLE IF NOT EXISTS events (
    cursor INTEGER PRIMARY KEY AUTOINCREMENT, aid TEXT NOT NULL, kind TEXT NOT NULL, sender TEXT NOT NULL,
    message_id TEXT NOT NULL, seq INTEGER NOT NULL, data BLOB NOT NULL, created_at REAL NOT NULL);
CREATE UNIQUE INDEX IF NOT EXISTS events_dedupe ON events(aid, kind, sender, message_id) WHERE message_id != '';
CREATE INDEX IF NOT EXISTS events_aid ON events(aid, cursor);
CREATE TABLE IF NOT EXISTS consumers (
    aid TEXT NOT NULL, name TEXT NOT NULL, cursor INTEGER NOT NULL, updated_at REAL NOT NULL,
    PRIMARY KEY (aid, name));
CREATE TABLE IF NOT EXISTS peer_acks (
    aid TEXT NOT NULL, device_id TEXT NOT NULL, slot_key TEXT NOT NULL, sender TEXT NOT NULL,
    ack_seq INTEGER NOT NULL, PRIMARY KEY (aid, device_id, slot_key, sender));
CREATE TABLE IF NOT EXISTS quarantine (
    cursor INTEGER PRIMARY KEY, aid TEXT NOT NULL, kind TEXT NOT NULL, reason TEXT NOT NULL, at REAL NOT NULL);
"""
QUARANTINED_KIND = "inbox.quarantined"


@dataclass(eq=False)
class _Job:
    """One queued write: `fn(db, *args)`, then its result or error and the event its caller waits on."""

    fn: Any
    args: tuple[Any, ...]
    result: Any = None
    error: BaseException | None = None
    done: trio.Event = field(default_factory=trio.Event)


class AckPastHead(Exception):
    """An ack beyond the newest event of the AID (`head`)."""

    def __init__(self, head: int) -> None:
        super().__init__(f"past the head {head}")
        self.head = head


@dataclass(frozen=True)
class NewEvent:
    kind: str
    sender: str
    message_id: str
    seq: int
    data: dict[str, Any]


@dataclass(frozen=True)
class StoredEvent:
    cursor: int
    aid: str
    kind: str
    data: dict[str, Any]


def _private_files(path: Path) -> None:
    """The database (and its -wal/-shm, which SQLite creates with the database's mode) 0600, whatever
    the umask: decrypted payloads are sealed, but senders, kinds and timing are not."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
    try:
        os.fchmod(fd, 0o600)
    finally:
        os.close(fd)
    for suffix in ("-wal", "-shm"):
        try:
            os.chmod(f"{path}{suffix}", 0o600)
        except FileNotFoundError:
            pass


class Inbox:
    def __init__(self, path: Path, key: bytes) -> None:
        self.path = path
        self._aead = AESGCM(key)
        self._queue: list[_Job] = []  # writes waiting for the next batch
        self._writing = False          # a batch is in flight (its writer drains the queue)
        try:
            _private_files(path)
        except OSError as exc:
            raise StorageError(f"inbox database {path}: {exc.strerror or exc}", retryable=False,
                               data={"path": str(path)}) from None
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)  # reads
        try:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")  # a commit that precedes an upstream ack must be durable
            self._db.executescript(SCHEMA)
            # writes: one batch at a time, in whichever worker thread runs it
            self._wdb = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
            self._wdb.execute("PRAGMA synchronous=FULL")
        except sqlite3.DatabaseError as exc:
            self._db.close()
            raise StorageError(f"inbox database {path} is unreadable: {exc}; restore it from a backup, or move it "
                               "aside to start with an empty one (events aund had already acknowledged to the gateway "
                               "are then lost)", retryable=False,
                               data={"path": str(path)}) from None
        self.on_commit = None  # called with the aid after new rows are committed
        self.commits = 0
        self.batches = 0  # transactions (fsyncs) the writes took; commits / batches = the group-commit gain
        self.events_written: dict[str, int] = {}  # per AID, since the daemon started
        self.write_error = ""  # the last write's failure, "" once a write succeeds
        self.quarantined: dict[str, int] = dict(self._db.execute(
            "SELECT aid, COUNT(*) FROM quarantine GROUP BY aid").fetchall())  # rows per AID, for health

    def close(self) -> None:
        self._db.close()
        self._wdb.close()

    # --- encryption at rest ------------------------------------------------------------------------
    def _seal(self, aid: str, kind: str, data: dict[str, Any]) -> bytes:
        nonce = os.urandom(12)
        plain = json.dumps(data, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
        return nonce + self._aead.encrypt(nonce, plain, f"{aid}\0{kind}".encode())

    def _open(self, aid: str, kind: str, blob: bytes, cursor: int) -> dict[str, Any]:
        try:
            plain = self._aead.decrypt(blob[:12], blob[12:], f"{aid}\0{kind}".encode())
        except (InvalidTag, ValueError):
            raise StorageError(f"inbox row {cursor} of {aid} fails authentication ({self.path})",
                               retryable=False, data={"path": str(self.path), "cursor": cursor}) from None
        return json.loads(plain)

    async def _run(self, fn, *args):
        """A write `fn(db, *args)`, group-committed (see the module docstring); its result, or its
        error (sqlite errors as StorageError). A failure is kept in `write_error` (for health)
        until a write succeeds again. Once queued a write is not cancellable (it may already be on
        disk): the caller waits for its outcome, as for any thread."""
        job = _Job(fn, args)
        self._queue.append(job)
        with trio.CancelScope(shield=True):
            if self._writing:
                await job.done.wait()
            else:
                self._writing = True
                try:
                    while self._queue:
                        batch, self._queue = self._queue, []
                        await trio.to_thread.run_sync(self._write_batch, batch)
                        self.batches += 1
                        for done in batch:
                            done.done.set()
                finally:
                    self._writing = False
        if isinstance(job.error, sqlite3.Error):
            self.write_error = f"inbox {self.path}: {job.error}"
            raise StorageError(self.write_error, data={"path": str(self.path)}) from None
        if job.error is not None:
            raise job.error
        self.write_error = ""
        return job.result

    def _write_batch(self, batch: list["_Job"]) -> None:
        """In a worker thread: every job of `batch` in one transaction, each in a savepoint."""
        db = self._wdb
        try:
            db.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as exc:
            for job in batch:
                job.error = exc
            return
        try:
            for job in batch:
                db.execute("SAVEPOINT job")
                try:
                    job.result = job.fn(db, *job.args)
                except BaseException as exc:  # noqa: BLE001  (handed to the job's caller)
                    job.error = exc
                    db.execute("ROLLBACK TO job")
                db.execute("RELEASE job")
            db.execute("COMMIT")
        except BaseException as exc:
            # SQLite may have rolled back already (a full disk does): a second ROLLBACK would fail
            # with "cannot rollback - no transaction is active" and hide the error that matters
            if db.in_transaction:
                with contextlib.suppress(sqlite3.Error):
                    db.execute("ROLLBACK")
            for job in batch:  # nothing of the batch stayed; a job that failed on its own keeps its error
                if job.error is None:
                    job.result, job.error = None, exc

    async def _read(self, fn, *args):
        """A read: WAL reads never wait for the writer or the disk's flush, so they run inline (a
        thread hop costs more CPU than the query), on the read connection."""
        try:
            return fn(*args)
        except sqlite3.Error as exc:
            raise StorageError(f"inbox {self.path}: {exc}", data={"path": str(self.path)}) from None

    # --- writes ------------------------------------------------------------------------------------
    def _commit_sync(self, db: sqlite3.Connection, aid: str, events: Sequence[NewEvent],
                     ack: tuple[str, str, str, int] | None) -> list[int]:
        now = time.time()
        new: list[int] = []
        for event in events:
            cur = db.execute("INSERT OR IGNORE INTO events (aid, kind, sender, message_id, seq, data, created_at) "
                             "VALUES (?,?,?,?,?,?,?)",
                             (aid, event.kind, event.sender, event.message_id, event.seq,
                              self._seal(aid, event.kind, event.data), now))
            if cur.rowcount == 1:
                new.append(cur.lastrowid)
        if ack is not None:
            device_id, slot_key, sender, ack_seq = ack
            db.execute("INSERT INTO peer_acks VALUES (?,?,?,?,?) ON CONFLICT(aid, device_id, slot_key, sender) "
                       "DO UPDATE SET ack_seq=MAX(ack_seq, excluded.ack_seq)",
                       (aid, device_id, slot_key, sender, ack_seq))
        return new

    async def commit(self, aid: str, events: Sequence[NewEvent], *,
                     ack: tuple[str, str, str, int] | None = None) -> list[int]:
        """Store events (deduplicated) and optionally move a gateway cursor, in one durable
        transaction. Returns the cursors of the rows that were new. Raises StorageError."""
        new = await self._run(self._commit_sync, aid, list(events), ack)
        self.commits += 1
        if new:
            self.events_written[aid] = self.events_written.get(aid, 0) + len(new)
        if new and self.on_commit is not None:
            self.on_commit(aid)
        return new

    # --- reads -------------------------------------------------------------------------------------
    def _read_sync(self, aid: str, after: int, kinds: tuple[str, ...], limit: int
                   ) -> tuple[list[StoredEvent], list[tuple[int, str, str]]]:
        """(the events, the rows that no longer open: (cursor, kind, why))."""
        sql = "SELECT cursor, kind, data FROM events WHERE aid=? AND cursor>?"
        args: list[Any] = [aid, after]
        if kinds:
            sql += f" AND kind IN ({','.join('?' * len(kinds))})"
            args += list(kinds)
        rows = self._db.execute(sql + " ORDER BY cursor LIMIT ?", (*args, limit)).fetchall()
        out, damaged = [], []
        for c, k, d in rows:
            try:
                out.append(StoredEvent(c, aid, k, self._open(aid, k, bytes(d), c)))
            except StorageError as exc:
                damaged.append((c, k, exc.message))
                out.append(StoredEvent(c, aid, QUARANTINED_KIND, {"aid": aid, "cursor": c, "kind": k,
                                                                  "reason": "row fails authentication (damaged)"}))
        return out, damaged

    def _quarantine_sync(self, db: sqlite3.Connection, aid: str, damaged: list[tuple[int, str, str]]) -> None:
        """Rows that no longer open (a flipped bit, a torn write): recorded once in `quarantine`,
        their bytes left as they are; consumers get an `inbox.quarantined` event in their place,
        so that the rows behind flow on (acking that event moves past it)."""
        for cursor, kind, reason in damaged:
            cur = db.execute("INSERT OR IGNORE INTO quarantine VALUES (?,?,?,?,?)",
                             (cursor, aid, kind, reason, time.time()))
            if cur.rowcount == 1:
                self.quarantined[aid] = self.quarantined.get(aid, 0) + 1
                log.error("inbox.row_quarantined", aid=aid, cursor=cursor, kind=kind, reason=reason,
                          path=str(self.path))

    async def read(self, aid: str, after: int, kinds: Iterable[str] = (), limit: int = 100) -> list[StoredEvent]:
        events, damaged = await self._read(self._read_sync, aid, after, tuple(kinds), limit)
        if damaged:
            await self._run(self._quarantine_sync, aid, damaged)
        return events

    def _head_sync(self, aid: str) -> int:
        return self._db.execute("SELECT COALESCE(MAX(cursor), 0) FROM events WHERE aid=?", (aid,)).fetchone()[0]

    async def head(self, aid: str) -> int:
        return await self._read(self._head_sync, aid)

    def _peer_ack_sync(self, aid: str, device_id: str, slot_key: str, sender: str) -> int:
        row = self._db.execute("SELECT ack_seq FROM peer_acks WHERE aid=? AND device_id=? AND slot_key=? AND sender=?",
                               (aid, device_id, slot_key, sender)).fetchone()
        return row[0] if row else 0

    async def peer_ack(self, aid: str, device_id: str, slot_key: str, sender: str) -> int:
        """The highest gateway seq from `sender` whose rows are committed here."""
        return await self._read(self._peer_ack_sync, aid, device_id, slot_key, sender)

    # --- consumers ---------------------------------------------------------------------------------
    def _consumer_sync(self, aid: str, name: str) -> int:
        row = self._db.execute("SELECT cursor FROM consumers WHERE aid=? AND name=?", (aid, name)).fetchone()
        return row[0] if row else 0

    async def consumer_cursor(self, aid: str, name: str) -> int:
        return await self._read(self._consumer_sync, aid, name)

    def _ack_sync(self, db: sqlite3.Connection, aid: str, name: str, cursor: int) -> int:
        head = db.execute("SELECT MAX(c) FROM (SELECT MAX(cursor) AS c FROM events WHERE aid=? UNION ALL "
                                "SELECT MAX(cursor) FROM quarantine WHERE aid=?)", (aid, aid)).fetchone()[0] or 0
        if cursor > head:
            raise AckPastHead(head)
        db.execute("INSERT INTO consumers VALUES (?,?,?,?) ON CONFLICT(aid, name) DO UPDATE SET "
                   "cursor=MAX(cursor, excluded.cursor), updated_at=excluded.updated_at", (aid, name, cursor, time.time()))
        row = db.execute("SELECT cursor FROM consumers WHERE aid=? AND name=?", (aid, name)).fetchone()
        return row[0]

    def _consumers_sync(self, aid: str, prefix: str) -> list[tuple[str, int, float]]:
        return [tuple(r) for r in self._db.execute(
            "SELECT name, cursor, updated_at FROM consumers WHERE aid=? AND substr(name, 1, ?)=? ORDER BY name",
            (aid, len(prefix), prefix))]

    async def consumers(self, aid: str, prefix: str = "") -> list[tuple[str, int, float]]:
        """(name, cursor, updated_at) of the AID's consumers whose name starts with `prefix`."""
        return await self._read(self._consumers_sync, aid, prefix)

    def _reset_sync(self, db: sqlite3.Connection, aid: str, name: str, cursor: int) -> int:
        head = db.execute("SELECT COALESCE(MAX(cursor), 0) FROM events WHERE aid=?", (aid,)).fetchone()[0]
        if cursor > head:
            raise AckPastHead(head)
        db.execute("INSERT INTO consumers VALUES (?,?,?,?) ON CONFLICT(aid, name) DO UPDATE SET "
                   "cursor=excluded.cursor, updated_at=excluded.updated_at", (aid, name, cursor, time.time()))
        return cursor

    async def reset_consumer(self, aid: str, name: str, cursor: int) -> int:
        """Set a consumer's cursor, back as well as forward (it reads again after `cursor`)."""
        return await self._run(self._reset_sync, aid, name, cursor)

    async def ack(self, aid: str, name: str, cursor: int) -> int:
        """Move a consumer's cursor forward (never back); returns the stored cursor.

        Raises AckPastHead when `cursor` is beyond the last event this inbox holds (or quarantined)
        for `aid`: such an ack would skip events not written yet."""
        return await self._run(self._ack_sync, aid, name, cursor)

    def _depth_sync(self) -> dict[str, int]:
        return dict(self._db.execute("SELECT aid, COUNT(*) FROM events GROUP BY aid").fetchall())

    async def depth(self) -> dict[str, int]:
        return await self._read(self._depth_sync)
