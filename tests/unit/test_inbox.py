"""The durable inbox (aund/inbox.py) on its own: a real SQLite file in a temp dir, no daemon.
Dedupe, order and kinds, the gateway cursor moved in the same transaction, consumer cursors that
only move forward (and the explicit reset), acks past the head, per-AID isolation, the sealing
(another key cannot read a row; a damaged row is quarantined and the rows behind it flow on),
and a hypothesis run of commit/ack sequences against a plain model."""
from __future__ import annotations

import os
import sqlite3

import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st

from aund.inbox import AckPastHead, Inbox, NewEvent, QUARANTINED_KIND

pytestmark = pytest.mark.timeout(60)
KEY = bytes(range(32))


def ev(i: int, kind: str = "message.received", sender: str = "b.aid.test", message_id: str | None = None) -> NewEvent:
    return NewEvent(kind, sender, f"m-{i}" if message_id is None else message_id, i, {"payload": {"text": f"t{i}"}})


async def test_commit_dedupes_orders_and_moves_the_gateway_cursor_with_the_rows(tmp_path):
    inbox = Inbox(tmp_path / "inbox.sqlite3", KEY)
    try:
        new = await inbox.commit("a.aid.test", [ev(1), ev(2)])
        assert len(new) == 2
        again = await inbox.commit("a.aid.test", [ev(2), ev(3)])  # a replayed row is stored once
        assert len(again) == 1
        rows = await inbox.read("a.aid.test", 0)
        assert [r.data["payload"]["text"] for r in rows] == ["t1", "t2", "t3"]
        assert [r.cursor for r in rows] == sorted(r.cursor for r in rows)
        await inbox.commit("a.aid.test", [ev(9, kind="group.message.received")], ack=("d1", "k", "b.aid.test", 9))
        assert await inbox.peer_ack("a.aid.test", "d1", "k", "b.aid.test") == 9  # same transaction
        only = await inbox.read("a.aid.test", 0, kinds=("group.message.received",))
        assert [r.kind for r in only] == ["group.message.received"]
        assert await inbox.read("other.aid.test", 0) == []  # per AID
        assert inbox.events_written == {"a.aid.test": 4}
    finally:
        inbox.close()


async def test_consumer_cursors_move_forward_reset_explicitly_and_never_past_the_head(tmp_path):
    inbox = Inbox(tmp_path / "inbox.sqlite3", KEY)
    try:
        cursors = await inbox.commit("a.aid.test", [ev(i) for i in range(1, 4)])
        head = await inbox.head("a.aid.test")
        assert head == cursors[-1]
        assert await inbox.ack("a.aid.test", "c", cursors[1]) == cursors[1]
        assert await inbox.ack("a.aid.test", "c", cursors[0]) == cursors[1]  # never back
        with pytest.raises(AckPastHead) as info:
            await inbox.ack("a.aid.test", "c", head + 1)
        assert info.value.head == head
        assert await inbox.reset_consumer("a.aid.test", "c", 0) == 0  # back, on purpose
        assert await inbox.consumer_cursor("a.aid.test", "c") == 0
        assert [c[0] for c in await inbox.consumers("a.aid.test")] == ["c"]
    finally:
        inbox.close()


async def test_rows_are_sealed_and_a_damaged_one_is_quarantined_while_the_rest_flow_on(tmp_path):
    path = tmp_path / "inbox.sqlite3"
    inbox = Inbox(path, KEY)
    cursors = await inbox.commit("a.aid.test", [ev(1), ev(2), ev(3)])
    inbox.close()
    raw = sqlite3.connect(path)
    data = raw.execute("SELECT data FROM events WHERE cursor=?", (cursors[1],)).fetchone()[0]
    assert b"t2" not in bytes(data)  # sealed at rest
    flipped = bytearray(data)
    flipped[-1] ^= 1
    raw.execute("UPDATE events SET data=? WHERE cursor=?", (bytes(flipped), cursors[1]))
    raw.commit()
    raw.close()
    inbox = Inbox(path, KEY)
    try:
        rows = await inbox.read("a.aid.test", 0)
        assert [r.kind for r in rows] == ["message.received", QUARANTINED_KIND, "message.received"]
        assert rows[2].data["payload"]["text"] == "t3" and inbox.quarantined == {"a.aid.test": 1}
        assert await inbox.ack("a.aid.test", "c", cursors[2]) == cursors[2]  # acking moves past it
    finally:
        inbox.close()
    other = Inbox(path, os.urandom(32))  # another key: every row is quarantined, none decrypts
    try:
        assert {r.kind for r in await other.read("a.aid.test", 0)} == {QUARANTINED_KIND}
    finally:
        other.close()


ops = st.lists(st.one_of(st.tuples(st.just("commit"), st.lists(st.integers(0, 12), min_size=1, max_size=4)),
                         st.tuples(st.just("ack"), st.integers(0, 40))), max_size=25)


@settings(max_examples=60, deadline=None)
@given(ops)
def test_commits_and_acks_agree_with_a_plain_model(tmp_path_factory, script):
    path = tmp_path_factory.mktemp("inbox") / "inbox.sqlite3"

    async def run() -> None:
        inbox = Inbox(path, KEY)
        stored: dict[str, int] = {}  # message id -> cursor
        acked = 0
        try:
            for op, arg in script:
                if op == "commit":
                    events = [ev(i) for i in arg]
                    new = await inbox.commit("a.aid.test", events)
                    fresh = [e.message_id for e in dict((e.message_id, e) for e in events).values()
                             if e.message_id not in stored]
                    assert len(new) == len(fresh)
                    stored.update(zip(fresh, new))
                else:
                    head = max(stored.values(), default=0)
                    if arg > head:
                        with pytest.raises(AckPastHead):
                            await inbox.ack("a.aid.test", "c", arg)
                    else:
                        acked = max(acked, arg)
                        assert await inbox.ack("a.aid.test", "c", arg) == acked
            rows = await inbox.read("a.aid.test", acked, limit=1000)
            assert [r.cursor for r in rows] == sorted(c for c in stored.values() if c > acked)
        finally:
            inbox.close()

    trio.run(run)


async def test_concurrent_writes_share_transactions_and_a_failing_one_fails_alone(tmp_path):
    """Group commit: 40 links committing at once take far fewer fsynced transactions than 40, every
    row lands with its gateway cursor, and an ack past the head in the same batch is refused alone."""
    inbox = Inbox(tmp_path / "inbox.sqlite3", KEY)
    try:
        results, errors = {}, []

        async def one(i: int) -> None:
            results[i] = await inbox.commit(f"a{i % 4}.aid.test", [ev(i, message_id=f"g-{i}")],
                                            ack=("dev", "main", f"s{i}.aid.test", i))

        async def bad_ack() -> None:
            try:
                await inbox.ack("nobody.aid.test", "c", 5)
            except AckPastHead as exc:
                errors.append(exc.head)

        with trio.fail_after(30):
            async with trio.open_nursery() as nursery:
                for i in range(40):
                    nursery.start_soon(one, i)
                nursery.start_soon(bad_ack)
        assert sorted(results) == list(range(40)) and all(len(r) == 1 for r in results.values())
        assert errors == [0]
        assert inbox.commits == 40 and 1 <= inbox.batches < 20, inbox.batches
        for i in range(40):
            assert await inbox.peer_ack(f"a{i % 4}.aid.test", "dev", "main", f"s{i}.aid.test") == i
        assert sum((await inbox.depth()).values()) == 40
    finally:
        inbox.close()
