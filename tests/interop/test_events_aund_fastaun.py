"""Gateway events reach the apps of an aund-held AID (fastaun in its own process, the
devnet emitting the events): a recall (durable, stored once though it comes by push and as a
tombstone in the pull, still there after a daemon restart), read positions, group invites (and
their end), a volatile message (live, once though the gateway replays it, never in the inbox)."""
from __future__ import annotations

import json
import os
import sys
from contextlib import aclosing

import pytest
import trio

from aund.daemon import DURABLE_KINDS
from tests.helpers import ROOT
from tests.inproc import APP, ready_handle, start_daemon

pytestmark = [pytest.mark.interop, pytest.mark.timeout(240)]


async def _fastaun(devnet, work, peer, scenario="events", **env):
    env = dict(os.environ, AUN_GW_URL=devnet.gateway_url, AUN_ROOT_CA=devnet.root_ca, AUN_WORKDIR=str(work),
               PEER_AID=peer, **env)
    return await trio.run_process([sys.executable, str(ROOT / "tests/interop/fastaun_events_driver.py"), scenario],
                                  env=env, capture_stdout=True, capture_stderr=True, check=False)


def _checks(proc):
    checks = [json.loads(x) for x in proc.stdout.decode().splitlines() if x.startswith("{")]
    failed = [c for c in checks if not c.get("ok", True)]
    assert proc.returncode == 0 and checks and not failed, (failed, proc.stderr.decode()[-3000:])


async def _file(work, name, proc):
    while not (work / name).exists():
        assert "proc" not in proc, proc["proc"].stdout.decode()[-3000:] + proc["proc"].stderr.decode()[-3000:]
        await trio.sleep(0.05)
    await trio.sleep(0.05)
    text = (work / name).read_text()
    return json.loads(text) if text.startswith("{") else {}


async def _until(pred, what):
    with trio.fail_after(30):
        while not pred():
            await trio.sleep(0.05)


async def test_recall_read_invites_and_volatile_reach_aund_apps(devnet, tmp_path):
    alice = f"evt-{os.getpid() % 100000}.aid.test"
    work = tmp_path / "sdk"
    work.mkdir()
    got, proc = [], {}
    with trio.fail_after(200):
        async with trio.open_nursery() as nursery:
            daemon = await start_daemon(nursery, devnet, tmp_path, [alice], sync_poll_seconds=1.0)
            handle = await ready_handle(daemon, alice)

            async def call(method, params):
                return await handle.call(method, params, timeout=None, background=False, app=APP)

            async def collect():  # every kind (kinds=()), acked as they come
                async with aclosing(daemon.subscribe(APP, alice, (), "t", "last_ack")) as events:
                    async for event in events:
                        got.append(event)
                        if event.cursor is not None:
                            await daemon.ack(APP, alice, "t", event.cursor)

            async def run_peer():
                proc["proc"] = await _fastaun(devnet, work, alice)

            nursery.start_soon(collect)
            await _until(lambda: daemon._subscribers.get(alice), "the subscription")  # live events need it
            nursery.start_soon(run_peer)
            bob = (await _file(work, "fast.json", proc))["aid"]
            (work / "go").touch()
            mid = (await _file(work, "recalled.json", proc))["message_id"]
            await trio.to_thread.run_sync(lambda: devnet.set_faults(replay_pushes=1))  # the volatile push twice
            (work / "armed").touch()
            sent = await _file(work, "sent.json", proc)

            def kinds():
                return [e.kind for e in got]
            await _until(lambda: {"message.recalled", "message.volatile", "group.invite_received"} <= set(kinds()),
                         "recall, volatile and invite")
            r = await call("message.send", {"to": bob, "payload": {"type": "text", "text": "please read"}})
            (work / "aund_sent.json").write_text(json.dumps({"message_id": r["message_id"]}))
            await _file(work, "plain_seen", proc)
            v = await call("message.send", {"to": bob, "payload": {"type": "text", "text": "aund volatile"}, "ttl": 30})
            assert v["storage"] == "volatile" and "seq" not in v and v["volatile_cursor"], v
            await _file(work, "read.json", proc)
            # our own read position: the devnet tells every connection of this AID (owner_aid = alice)
            r = await call("message.read", {"states": [{"topic_key": "chat-with-fast", "last_read_message_id": mid}]})
            assert r["updated"] == 1 and r["states"][0]["changed"] is True, r
            await _until(lambda: "message.read_changed" in kinds(), "read_changed")
            (work / "revoke").touch()
            await _file(work, "revoked", proc)
            await _until(lambda: "group.invite_finalized" in kinds(), "invite_finalized")
            group_sent = await _file(work, "group_sent.json", proc)
            await _until(lambda: any(e.kind == "group.message.received" and e.data.get("message_id")
                                     == group_sent["message_id"] for e in got), "the group message")
            (work / "group_seen").touch()
            await _file(work, "group_recalled", proc)
            await _until(lambda: "group.message_recalled" in kinds(), "group.message_recalled")
            entry = daemon.links[(alice, "main")]
            # the recall's tombstone (seq 2 of bob's stream) is pulled too: the same row, not a second one
            await _until(lambda: entry.sync._acks.get(bob, 0) >= 2, "the tombstone pulled")
            stats = dict(entry.events.stats)
            rows = await daemon.inbox.read(alice, 0, (), 1000)
            (work / "done").touch()
            while "proc" not in proc:
                await trio.sleep(0.05)
            await daemon.aclose()
            nursery.cancel_scope.cancel()
    p = proc["proc"]
    checks = [json.loads(x) for x in p.stdout.decode().splitlines() if x.startswith("{")]
    failed = [c for c in checks if not c.get("ok", True)]
    assert p.returncode == 0 and checks and not failed, (failed, p.stderr.decode()[-3000:])

    by_kind = {}
    for e in got:
        by_kind.setdefault(e.kind, []).append(e)
    recalls = by_kind["message.recalled"]
    assert len(recalls) == 1 and recalls[0].cursor is not None  # durable, once
    assert recalls[0].data["message_ids"] == [mid] and recalls[0].data["from"] == bob
    assert [r for r in rows if r.kind == "message.recalled"] and len([r for r in rows if r.kind == "message.recalled"]) == 1
    assert any(e.data.get("message_id") == mid for e in by_kind["message.received"])  # the message itself came too

    volatile = by_kind["message.volatile"]
    assert len(volatile) == 1 and volatile[0].cursor is None  # live, and the replayed push deduped
    v = volatile[0].data
    assert v["payload"] == {"type": "text", "text": "volatile hello"} and v["encrypted"] is True
    assert v["from"] == bob and v["storage"] == "volatile" and v["message_id"] == sent["volatile_id"] and "seq" not in v
    assert stats["volatile"] == 1 and stats["volatile_duplicates"] == 1, stats
    assert not [r for r in rows if r.data.get("message_id") == sent["volatile_id"]]  # never in the inbox

    invites = by_kind["group.invite_received"]
    assert len(invites) == 1 and invites[0].cursor is not None
    assert invites[0].data["group_id"] == sent["group_id"] and invites[0].data["invite_ids"] == [sent["invite_id"]]
    assert invites[0].data["status"] == "pending"
    final = by_kind["group.invite_finalized"]
    assert len(final) == 1 and final[0].data["status"] == "revoked" and final[0].cursor is not None

    group_recalls = by_kind["group.message_recalled"]
    assert len(group_recalls) == 1 and group_recalls[0].cursor is not None
    assert group_recalls[0].data["message_ids"] == [group_sent["message_id"]]
    assert group_recalls[0].data["group_id"] == group_sent["group_id"] and group_recalls[0].data["recalled_by"] == bob

    reads = by_kind["message.read_changed"]
    assert len(reads) == 1 and reads[0].cursor is not None
    assert reads[0].data["owner_aid"] == alice and reads[0].data["last_read_message_id"] == mid

    # durable: after a restart a fresh consumer reads them all again from the inbox; nothing volatile
    again = []
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            daemon = await start_daemon(nursery, devnet, tmp_path, [alice])
            want = {"message.recalled", "group.invite_received", "group.invite_finalized", "message.read_changed"}
            async with aclosing(daemon.subscribe(APP, alice, tuple(sorted(DURABLE_KINDS)), "after-restart", 0)) as evs:
                async for event in evs:
                    again.append(event)
                    if want <= {e.kind for e in again}:
                        break
            await daemon.aclose()
            nursery.cancel_scope.cancel()
    assert sum(e.kind == "message.recalled" for e in again) == 1
    assert [e.data["message_ids"] for e in again if e.kind == "message.recalled"] == [[mid]]
    assert not [e for e in again if e.data.get("message_id") == sent["volatile_id"]]


async def test_volatile_messages_to_an_absent_receiver_come_by_pull_and_are_never_stored(devnet, tmp_path):
    """While fastaun is away, aund sends it a volatile message: fastaun gets it by pull when it
    connects, once. While aund is away, fastaun sends one: aund's catch-up pull finds it, hands it
    on as a live event and acks it; it is never in aund's inbox."""
    alice = f"voff-{os.getpid() % 100000}.aid.test"
    work = tmp_path / "sdk"
    work.mkdir()
    with trio.fail_after(200):
        async with trio.open_nursery() as nursery:
            daemon = await start_daemon(nursery, devnet, tmp_path, [alice])
            handle = await ready_handle(daemon, alice)
            _checks(await _fastaun(devnet, work, alice, "volatile_offline", PHASE="register"))
            bob = json.loads((work / "voff.json").read_text())["aid"]
            r = await handle.call("message.send", {"to": bob, "ttl": 120, "payload": {"type": "text", "text": "while away"}},
                                  timeout=None, background=False, app=APP)
            assert r["storage"] == "volatile", r
            _checks(await _fastaun(devnet, work, alice, "volatile_offline", PHASE="recv"))
            _checks(await _fastaun(devnet, work, alice, "volatile_offline", PHASE="again"))
            await daemon.aclose()
            nursery.cancel_scope.cancel()
        _checks(await _fastaun(devnet, work, alice, "volatile_offline", PHASE="send"))
        async with trio.open_nursery() as nursery:
            daemon = await start_daemon(nursery, devnet, tmp_path, [alice])
            await ready_handle(daemon, alice)
            entry = daemon.links[(alice, "main")]
            while entry.events.stats["volatile"] < 1:
                await trio.sleep(0.05)
            while True:  # acked: the gateway no longer lists it
                peers = await entry.link.call("message.peers", {"filter": "pending"})
                if not [p for p in peers["peers"] if p["sender_aid"] == bob]:
                    break
                await trio.sleep(0.05)
            await entry.sync.full_sync()  # nor serves it: a later pull delivers nothing again
            rows = await daemon.inbox.read(alice, 0, (), 1000)
            stats = dict(entry.events.stats)
            await daemon.aclose()
            nursery.cancel_scope.cancel()
    assert stats["volatile"] == 1, stats  # delivered once, however often pulled before its ack landed
    assert not [r for r in rows if (r.data.get("payload") or {}).get("text") == "to an absent aund"]
