"""One flipped bit in one inbox row (the daemon stopped, the database edited as an
attacker or a bad disk would) must not block that AID's consumers: the row is quarantined (an
`inbox.quarantined` event in its place, an `inbox.row_quarantined` log event), the rows behind it
are delivered to every consumer, new messages flow, and `aund health` warns."""
from __future__ import annotations

import json
import secrets
import sqlite3
import time

import pytest

from client_stub import Client
from client_stub.errors import AundError
from tests.helpers import AundProcess
from tests.hostile.common import aund_cli
from tests.system.harness import write_config

pytestmark = pytest.mark.timeout(90)


def _collect(stream, n: int, timeout: float) -> tuple[list, dict[str, int]]:
    """Up to n events within timeout seconds (each acked); stream errors counted by class."""
    got, errors = [], {}
    deadline = time.monotonic() + timeout
    while len(got) < n and time.monotonic() < deadline:
        try:
            ev = stream.get(timeout=min(0.5, max(0.01, deadline - time.monotonic())))
        except AundError as exc:
            errors[type(exc).__name__] = errors.get(type(exc).__name__, 0) + 1
            time.sleep(0.2)
            continue
        if ev is not None:
            got.append(ev)
            ev.ack()
    return got, errors


def test_flipped_bit_in_an_inbox_row_is_quarantined_and_the_rest_flows(devnet, tmp_path):
    alice, bob = (f"{n}-{secrets.token_hex(3)}.aid.test" for n in ("qa", "qb"))
    cfg = write_config(tmp_path / "aund.toml", devnet, [alice, bob])
    daemon = AundProcess(tmp_path / "state", tmp_path / "aund.sock", cfg)
    texts = [f"m{i}-{secrets.token_hex(4)}" for i in range(3)]
    daemon.start()
    try:
        with Client(daemon.socket, app="sender") as client:
            for a in (alice, bob):
                client.ensure_identity(a)
                client.session(a).wait_ready(15)
            with client.session(bob).events("probe", start="last_ack") as probe:
                for text in texts:
                    client.session(alice).call("message.send", {"to": bob, "payload": {"type": "text", "text": text}})
                got, errors = _collect(probe, 3, 15)  # all three are in bob's inbox (acked for "probe" only)
                assert [e.data["payload"]["text"] for e in got] == texts, errors
    finally:
        assert daemon.stop() == 0

    db = sqlite3.connect(daemon.state_dir / "inbox.sqlite3")
    rows = db.execute("SELECT cursor, data FROM events WHERE aid = ? AND kind = 'message.received' ORDER BY cursor",
                      (bob,)).fetchall()
    assert len(rows) == 3, rows
    damaged, blob = rows[1][0], bytearray(rows[1][1])
    blob[len(blob) // 2] ^= 0x10  # one bit
    db.execute("UPDATE events SET data = ? WHERE cursor = ?", (bytes(blob), damaged))
    db.commit()
    db.close()

    daemon.start()
    try:
        late = f"after-{secrets.token_hex(4)}"
        with Client(daemon.socket, app="consumers") as client:
            seen = {}
            for consumer in ("c1", "c2"):  # every consumer of the AID gets past the row
                with client.session(bob).events(consumer, start="last_ack") as stream:
                    got, errors = _collect(stream, 3, 10)
                    seen[consumer] = [(e.kind, e.cursor) for e in got]
                    assert [e.kind for e in got] == ["message.received", "inbox.quarantined", "message.received"], \
                        (consumer, seen[consumer], errors)
                    assert got[0].data["payload"]["text"] == texts[0] and got[2].data["payload"]["text"] == texts[2]
                    q = got[1]
                    assert q.cursor == damaged and q.data["cursor"] == damaged and q.data["aid"] == bob
                    assert q.data["kind"] == "message.received"
            with client.session(bob).events("c1", start="last_ack") as stream:  # and new messages still flow
                client.session(alice).wait_ready(15)
                client.session(alice).call("message.send", {"to": bob, "payload": {"type": "text", "text": late}})
                got, errors = _collect(stream, 1, 10)
                assert [e.data["payload"]["text"] for e in got] == [late], errors
        health = aund_cli("health", "--socket", str(daemon.socket), "--json")
        report = json.loads(health.stdout)
        assert health.returncode == 1 and not report["healthy"], health.stdout
        assert any(r["code"] == "inbox.quarantined" and r.get("aid") == bob for r in report["reasons"]), report
        logged = [e for e in daemon.log_events() if e.get("event") == "inbox.row_quarantined"]
        assert [(e.get("aid"), e.get("cursor")) for e in logged] == [(bob, damaged)]  # once, not per read
    finally:
        assert daemon.stop() == 0
