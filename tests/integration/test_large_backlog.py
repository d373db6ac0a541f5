"""A backlog of large messages never takes an identity offline.

The attack: with the victim's daemon stopped, a peer sends it messages of 700 KB each (under the
gateway's 1 MB limit) until one catch-up page of them is larger than aund's frame limit (8 MiB:
twelve of them; four against the 2 MiB limit aund had when the issue was filed). When the victim returns, a gateway that bounds pages by rows only (the devnet's
`unbounded_pages` fault) answers the first pull with one oversized WebSocket message; aund closed
the link with 1009 and asked for the same page again, forever. Now the page limit halves on every
1009 (aund.aun.paging), so everything arrives, for P2P and for groups, and against a gateway that
bounds its pages by bytes too. A row that fits in no page at all (here: aund's frame limit lowered
below it with `AUND_GATEWAY_MAX_FRAME`) is reported as `message.undecryptable` with reason
`too_large`, and the messages behind it arrive (P2P and groups).

Real processes: one devnet, a sender daemon and the victim's daemon (stopped and started again).
"""
from __future__ import annotations

import sqlite3
import time

import pytest

from client_stub import Client
from tests.helpers import AundProcess, DevnetProcess, wait_until
from tests.system.harness import aid, write_config

pytestmark = pytest.mark.timeout(120)

BIG = 700_000           # payload characters: under the gateway's 1,000,000-byte message limit
COUNT = 12              # 12 rows of ~940 KB: one row-bounded page is ~11 MB > the 8 MiB frame limit
KINDS = ("message.received", "message.undecryptable", "group.message.received")


def _daemon(tmp_path, devnet: DevnetProcess, name: str, aids: list[str], **env: str) -> AundProcess:
    cfg = write_config(tmp_path / f"{name}.toml", devnet, aids)
    proc = AundProcess(tmp_path / f"{name}-state", tmp_path / f"{name}.sock", cfg,
                       env={"AUND_SYNC_POLL_SECONDS": "1", **env})
    proc.start()
    return proc


def _ready(daemon: AundProcess, who: str) -> None:
    def ready():
        with Client(daemon.socket, reconnect_attempts=0) as c:
            return any(link["aid"] == who and link["state"] == "ready" for link in c.status()["links"])
    wait_until(ready, 30, 0.1, f"{who} ready")


def _restart(daemon: AundProcess, **env: str) -> AundProcess:
    again = AundProcess(daemon.state_dir, daemon.socket, daemon.config_file, env={**daemon.env, **env})
    again.start()
    return again


def _collect(daemon: AundProcess, who: str, count: int, timeout: float) -> list[dict]:
    """The first `count` events of `who` (any of KINDS; group probes left out) in inbox order,
    each acked; fails at the deadline."""
    out: list[dict] = []
    deadline = time.monotonic() + timeout
    with Client(daemon.socket) as c:
        with c.session(who).events("backlog", kinds=KINDS, start="last_ack") as events:
            while len(out) < count:
                left = deadline - time.monotonic()
                assert left > 0, f"only {len(out)} of {count} events arrived: {[_brief(e) for e in out]}"
                event = events.get(timeout=min(left, 1.0))
                if event is not None:
                    if (event.data.get("payload") or {}).get("n") != "probe":
                        out.append({"kind": event.kind, **event.data})
                    event.ack()
    return out


def _brief(event: dict) -> tuple:
    payload = event.get("payload") or {}
    return event["kind"], event.get("reason"), (payload.get("n"), len(payload.get("text", "")))


def _text(n: int, size: int) -> dict:
    return {"type": "text", "n": n, "text": chr(ord("a") + n % 26) * size}


def _log_has(daemon: AundProcess, event: str) -> bool:
    return any(e.get("event") == event for e in daemon.log_events())


@pytest.mark.parametrize("count, frame", [(COUNT, ""), (4, str(2 * 1024 * 1024))],
                         ids=["12-over-8MiB", "4-over-2MiB-as-in-the-issue"])
@pytest.mark.parametrize("unbounded", [True, False], ids=["row-bounded-pages", "byte-bounded-pages"])
def test_a_backlog_of_large_p2p_messages_arrives(devnet, tmp_path, unbounded, count, frame):
    sender, victim = aid("sender"), aid("victim")
    tx = _daemon(tmp_path, devnet, "tx", [sender])
    rx = _daemon(tmp_path, devnet, "rx", [victim], **({"AUND_GATEWAY_MAX_FRAME": frame} if frame else {}))
    try:
        _ready(tx, sender)
        _ready(rx, victim)  # the victim's prekey is published: it can be written to while away
        assert rx.stop() == 0
        devnet.set_faults(unbounded_pages=int(unbounded))
        with Client(tx.socket, timeout=30) as c:
            s = c.session(sender)
            for n in range(count):
                s.call("message.send", {"to": victim, "payload": _text(n, BIG)}, timeout=30)
        rx = _restart(rx)
        got = _collect(rx, victim, count, 60)
        assert [(e["kind"], e["from"], e["payload"]["n"], e["payload"]["text"]) for e in got] == \
            [("message.received", sender, n, _text(n, BIG)["text"]) for n in range(count)]
        assert all(e["encrypted"] is True for e in got)
        # the 1009 path ran where the gateway does not bound pages by bytes, and only there
        assert _log_has(rx, "sync.page_shrunk") is unbounded
        assert not _log_has(rx, "sync.row_skipped")
    finally:
        assert tx.stop() == 0
        assert rx.stop() == 0


@pytest.mark.parametrize("unbounded", [True, False], ids=["row-bounded-pages", "byte-bounded-pages"])
def test_a_backlog_of_large_group_messages_arrives(devnet, tmp_path, unbounded):
    owner, victim = aid("owner"), aid("member")
    tx = _daemon(tmp_path, devnet, "tx", [owner])
    rx = _daemon(tmp_path, devnet, "rx", [victim])
    try:
        _ready(tx, owner)
        _ready(rx, victim)
        with Client(tx.socket, timeout=30) as c:
            s = c.session(owner)
            gid = s.call("group.create", {"name": "backlog"}, timeout=20)["group"]["group_id"]
            s.call("group.add_member", {"group_id": gid, "aid": victim}, timeout=20)
            # the member can read the group (its group prekey is published) before it goes away
            wait_until(lambda: _group_send_reaches(s, rx, victim, gid), 30, 0.5, "a first group message read")
            assert rx.stop() == 0
            devnet.set_faults(unbounded_pages=int(unbounded))
            for n in range(COUNT):
                s.call("group.send", {"group_id": gid, "payload": _text(n, BIG)}, timeout=30)
        rx = _restart(rx)
        got = _collect(rx, victim, COUNT, 60)
        assert [(e["kind"], e["group_id"], e["from"], e["payload"]["n"], e["payload"]["text"]) for e in got] == \
            [("group.message.received", gid, owner, n, _text(n, BIG)["text"]) for n in range(COUNT)]
        assert _log_has(rx, "sync.page_shrunk") is unbounded
        assert not _log_has(rx, "sync.row_skipped")
    finally:
        assert tx.stop() == 0
        assert rx.stop() == 0


def _group_send_reaches(s, rx: AundProcess, victim: str, gid: str) -> bool:
    """Send a small probe to the group; True once the member's inbox holds a decrypted probe."""
    s.call("group.send", {"group_id": gid, "payload": {"type": "text", "n": "probe", "text": "hi"}}, timeout=20)
    with Client(rx.socket) as c:
        with c.session(victim).events("probe", kinds=KINDS, start="last_ack") as events:
            while (event := events.get(timeout=2)) is not None:
                event.ack()
                if event.kind == "group.message.received":
                    return True
    return False


def test_a_row_larger_than_any_page_is_skipped_and_the_rest_arrive(devnet, tmp_path):
    sender, other, victim = aid("sender"), aid("other"), aid("victim")
    frame = 600_000  # aund's frame limit lowered below one 700 KB message (a gateway allowing more than us)
    tx = _daemon(tmp_path, devnet, "tx", [sender, other])
    rx = _daemon(tmp_path, devnet, "rx", [victim], AUND_GATEWAY_MAX_FRAME=str(frame))
    try:
        _ready(tx, sender)
        _ready(tx, other)
        _ready(rx, victim)
        assert rx.stop() == 0
        devnet.set_faults(unbounded_pages=1)
        with Client(tx.socket, timeout=30) as c:
            s, o = c.session(sender), c.session(other)
            sent = []
            for n, size in enumerate([10, BIG, 10, 10]):
                sent.append(s.call("message.send", {"to": victim, "payload": _text(n, size)}, timeout=30))
                if n == 0:  # the victim's seqs are shared by its senders: the big row is not first + 1
                    o.call("message.send", {"to": victim, "payload": _text(9, 10)}, timeout=30)
        assert sent[1]["seq"] > sent[0]["seq"] + 1
        rx = _restart(rx)
        everything = _collect(rx, victim, 5, 60)
        assert [_brief(e) for e in everything if e["from"] == other] == [("message.received", None, (9, 10))]
        got = [e for e in everything if e["from"] == sender]
        assert [_brief(e) for e in got] == [("message.received", None, (0, 10)),
                                            ("message.undecryptable", "too_large", (None, 0)),
                                            ("message.received", None, (2, 10)),
                                            ("message.received", None, (3, 10))]
        skipped = got[1]
        assert skipped["from"] == sender and skipped["seq"] == sent[1]["seq"] and skipped["skipped"] is True
        assert str(frame) in skipped["detail"]
        logged = [e for e in rx.log_events() if e.get("event") == "sync.row_skipped"]
        assert len(logged) == 1 and logged[0]["seq"] == sent[1]["seq"] and logged[0]["max_frame"] == frame
        # the gateway's cursor moved past it too (acked at the next connect's catch-up)
        wait_until(lambda: _gateway_ack(devnet, victim, sender) >= sent[3]["seq"], 20, 0.2, "the gateway's ack")
    finally:
        assert tx.stop() == 0
        assert rx.stop() == 0


def _gateway_ack(devnet: DevnetProcess, receiver: str, sender: str) -> int:
    db = sqlite3.connect(f"file:{devnet.state_dir / 'devnet.sqlite3'}?mode=ro", uri=True)
    try:
        row = db.execute("SELECT MAX(ack_seq) FROM acks WHERE receiver=? AND sender=?", (receiver, sender)).fetchone()
    finally:
        db.close()
    return row[0] or 0


def test_a_group_row_larger_than_any_page_is_skipped_and_the_rest_arrive(devnet, tmp_path):
    owner, victim = aid("owner"), aid("member")
    frame = 600_000
    tx = _daemon(tmp_path, devnet, "tx", [owner])
    rx = _daemon(tmp_path, devnet, "rx", [victim], AUND_GATEWAY_MAX_FRAME=str(frame))
    try:
        _ready(tx, owner)
        _ready(rx, victim)
        with Client(tx.socket, timeout=30) as c:
            s = c.session(owner)
            gid = s.call("group.create", {"name": "too-large"}, timeout=20)["group"]["group_id"]
            s.call("group.add_member", {"group_id": gid, "aid": victim}, timeout=20)
            wait_until(lambda: _group_send_reaches(s, rx, victim, gid), 30, 0.5, "a first group message read")
            assert rx.stop() == 0
            devnet.set_faults(unbounded_pages=1)
            sent = [s.call("group.send", {"group_id": gid, "payload": _text(n, size)}, timeout=30)
                    for n, size in enumerate([10, BIG, 10])]
        rx = _restart(rx)
        got = _collect(rx, victim, 3, 60)
        assert [_brief(e) for e in got] == [("group.message.received", None, (0, 10)),
                                            ("message.undecryptable", "too_large", (None, 0)),
                                            ("group.message.received", None, (2, 10))]
        skipped = got[1]
        assert skipped["group_id"] == gid and skipped["seq"] == sent[1]["seq"] and skipped["skipped"] is True
        logged = [e for e in rx.log_events() if e.get("event") == "sync.row_skipped"]
        assert len(logged) == 1 and logged[0]["group_id"] == gid and logged[0]["seq"] == sent[1]["seq"]
    finally:
        assert tx.stop() == 0
        assert rx.stop() == 0
