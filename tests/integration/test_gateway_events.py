"""Every gateway event reaches the apps of a real `aund run` (the devnet pushes them with
its /devnet/push knob), through the app socket and client_stub: live kinds to the subscribers of
the moment, a family subscription (`app.*`), anything unnamed as `gateway.event`, durable kinds
once however often the push is replayed; `subscribe` refuses unknown kinds and lists the known;
random event names and params pushed at the link never break it."""
from __future__ import annotations

import json
import secrets
from contextlib import aclosing

import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from aund.aun import events as gw_events
from client_stub import Client, errors
from tests.inproc import APP, ready_handle, start_daemon
from tests.system.harness import start_aund

pytestmark = pytest.mark.timeout(240)


def _aid(name: str) -> str:
    return f"{name}-{secrets.token_hex(3)}.aid.test"


@pytest.fixture
def aund_alice(devnet, tmp_path):
    alice = _aid("gwev")
    daemon = start_aund(tmp_path, devnet, [alice])
    try:
        with Client(daemon.socket) as client:
            client.ensure_identity(alice)
            session = client.session(alice)
            session.wait_ready(timeout=30)
            yield client, session, alice, daemon
    finally:
        assert daemon.stop() == 0


def _next(events, timeout=10.0):
    event = events.get(timeout=timeout)
    assert event is not None, "no event in time"
    return event


def test_unknown_kinds_are_refused_with_the_known_ones(aund_alice):
    _client, session, _alice, _daemon = aund_alice
    with pytest.raises(errors.InvalidParams) as caught:
        with session.events("c", kinds=["message.recieved", "message.received"]) as events:
            events.get(timeout=2)
    exc = caught.value
    assert "message.recieved" in str(exc) and "message.recalled" in str(exc)
    assert exc.data["unknown"] == ["message.recieved"]
    known = set(exc.data["known"])
    assert {"message.received", "message.recalled", "message.read_changed", "group.invite_received",
            "message.volatile", "gateway.event", "state_change", "app.*"} <= known
    with session.events("c", kinds=["app.typing", "org.*", "message.volatile"]) as events:  # members of families: fine
        assert events.get(timeout=0.5) is None


def test_live_events_reach_current_subscribers(aund_alice, devnet):
    _client, session, alice, _daemon = aund_alice
    kinds = ["app.*", "storage.object_changed", "stream.created", "push.offline_message", "gateway.event"]
    with session.events("live", kinds=kinds, start="now") as events:
        events.get(timeout=0.3)  # subscribed before the pushes
        pushes = [("app.typing", {"thread_id": "t1"}), ("storage.object_changed", {"path": "/a.txt", "op": "put"}),
                  ("stream/created", {"stream_id": "s1"}), ("push.offline_message", {"count": 2}),
                  ("relay.message", {"x": 1}), ("message.ack", {"seq": 3})]  # message.ack: not subscribed
        for name, params in pushes:
            assert devnet.push_event(alice, name, params)["sent"] == 1
        got = [_next(events) for _ in range(5)]
        assert [(e.kind, e.cursor) for e in got] == [("app.typing", None), ("storage.object_changed", None),
                                                     ("stream.created", None), ("push.offline_message", None),
                                                     ("gateway.event", None)]
        assert got[0].data["thread_id"] == "t1" and got[2].data["stream_id"] == "s1"
        assert got[4].data["event"] == "relay.message" and got[4].data["params"]["x"] == 1
        assert events.get(timeout=0.5) is None  # message.ack was not asked for


def test_a_replayed_durable_event_is_stored_once(aund_alice, devnet):
    _client, session, alice, _daemon = aund_alice
    recall = {"group_id": "g-1.aid.test", "message_ids": ["gm-2", "gm-1"], "sender_aid": "x.aid.test", "seq": 9}
    mine = {"owner_aid": alice, "scope": "p2p", "topic_key": "t", "last_read_message_id": "m-1", "last_read_order": 4}
    other = dict(mine, owner_aid="someone-else.aid.test")  # another AID's position: not ours, ignored (as the SDK)
    devnet.set_faults(replay_pushes=1)
    for name, params in (("group.message_recalled", recall), ("group.message_recalled", recall),
                         ("message.read_changed", other), ("message.read_changed", mine)):
        assert devnet.push_event(alice, name, params)["sent"] == 1
    with session.events("d", kinds=["group.message_recalled", "message.read_changed"]) as events:
        first, second = _next(events), _next(events)
        assert events.get(timeout=1.0) is None  # three recall pushes, one row
        first.ack()
        second.ack()
    assert first.kind == "group.message_recalled" and first.data["message_ids"] == ["gm-1", "gm-2"]
    assert isinstance(first.cursor, int) and second.cursor > first.cursor
    assert second.kind == "message.read_changed" and second.data["owner_aid"] == alice


JSONS = st.recursive(st.none() | st.booleans() | st.integers(-(2**53 - 1), 2**53 - 1) | st.text(max_size=20),
                     lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=5),
                     max_leaves=12)
FIELDS = ["message_ids", "from", "group_id", "owner_aid", "scope", "topic_key", "last_read_message_id",
          "last_read_order", "invite_ids", "invite_id", "invitee_aid", "status", "storage", "inline_message",
          "volatile_cursor", "message_id", "sender_aid", "envelope_json", "payload", "seq", "expires_at"]
PARAMS = st.dictionaries(st.sampled_from(FIELDS) | st.text(max_size=8), JSONS, max_size=8)
NAMES = st.sampled_from(sorted(gw_events.RULES) + ["message.received", "peer.v2.message_received", "app.x",
                                                    "org.y", "credential.z", "gateway.disconnect"]) | st.text(min_size=1,
                                                                                                               max_size=30)


def test_random_events_never_break_the_link(aund_alice, devnet):
    client, session, alice, daemon = aund_alice
    bob = _aid("gwevbob")
    client.ensure_identity(bob)
    b = client.session(bob)
    b.wait_ready(timeout=30)

    @settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                     HealthCheck.function_scoped_fixture])
    @given(name=NAMES, params=PARAMS)
    def push(name, params):
        if name == "gateway.disconnect":
            params = {k: v for k, v in params.items() if k not in ("code", "reason")} | {"code": 4012}
        json.dumps(params)
        devnet.push_event(alice, name, params)

    push()
    assert session.wait_ready(timeout=5)["state"] == "ready"
    with session.events("after", kinds=["message.received"], start="now") as events:
        events.get(timeout=0.3)
        b.call("message.send", {"to": alice, "payload": {"type": "text", "text": "still here"}})
        event = _next(events, 20)
    assert event.data["payload"]["text"] == "still here"
    logged = daemon.log_events()
    assert not [e for e in logged if e.get("event") == "events.failed" or e.get("level") in ("error", "critical")]
    assert any(e.get("event") == "events.ignored" for e in logged)  # malformed durable events were seen, and skipped


async def test_invites_missed_while_offline_arrive_after_connect(devnet, tmp_path):
    """bob's daemon is down while alice invites him twice (two groups) and revokes one: when it comes
    back, the pending invite is caught up (`group.list_my_invites`), once, and a later push of the
    same invite is no second row."""
    alice, bob = _aid("inva"), _aid("invb")
    with trio.fail_after(90):
        async with trio.open_nursery() as nursery:  # bob exists, then goes away
            daemon = await start_daemon(nursery, devnet, tmp_path / "b", [bob])
            await ready_handle(daemon, bob)
            await daemon.aclose()
            nursery.cancel_scope.cancel()
        async with trio.open_nursery() as nursery:
            daemon = await start_daemon(nursery, devnet, tmp_path / "a", [alice])
            handle = await ready_handle(daemon, alice)

            async def call(method, params):
                return await handle.call(method, params, timeout=None, background=False, app=APP)

            invites = []
            for name in ("kept", "revoked"):
                gid = (await call("group.create", {"name": name, "join_mode": "approval"}))["group"]["group_id"]
                invites.append((gid, (await call("group.invite_member", {"group_id": gid, "invitee_aid": bob}))
                                ["invite"]["invite_id"]))
            await call("group.revoke_invite", {"invite_id": invites[1][1]})
            await daemon.aclose()
            nursery.cancel_scope.cancel()
        async with trio.open_nursery() as nursery:
            daemon = await start_daemon(nursery, devnet, tmp_path / "b", [bob])
            await ready_handle(daemon, bob)
            got = []
            async with aclosing(daemon.subscribe(APP, bob, ("group.invite_received",), "t", 0)) as events:
                async for event in events:
                    got.append(event)
                    break
            entry = daemon.links[(bob, "main")]
            await entry.events.catch_up()  # again, as after a reconnect: nothing new
            rows = await daemon.inbox.read(bob, 0, ("group.invite_received",), 100)
            await daemon.aclose()
            nursery.cancel_scope.cancel()
    assert [(e.data["group_id"], e.data["invite_ids"]) for e in got] == [(invites[0][0], [invites[0][1]])]
    assert len(rows) == 1 and got[0].data["status"] == "pending" and got[0].data["inviter_aids"] == [alice]


async def test_group_recall_reaches_every_member_once(devnet, tmp_path):
    """alice (aund) recalls her group message: bob's apps (aund too) get `group.message_recalled`
    durably, once though the push is replayed; a message of someone else cannot be recalled."""
    alice, bob = _aid("grca"), _aid("grcb")
    with trio.fail_after(90):
        async with trio.open_nursery() as nursery:
            daemon = await start_daemon(nursery, devnet, tmp_path, [alice, bob])
            ha, hb = await ready_handle(daemon, alice), await ready_handle(daemon, bob)

            async def call(handle, method, params):
                return await handle.call(method, params, timeout=None, background=False, app=APP)

            gid = (await call(ha, "group.create", {"name": "recalls", "join_mode": "approval"}))["group"]["group_id"]
            await call(ha, "group.add_member", {"group_id": gid, "aid": bob})
            sent = await call(ha, "group.send", {"group_id": gid, "payload": {"type": "text", "text": "oops"}})
            theirs = await call(hb, "group.send", {"group_id": gid, "payload": {"type": "text", "text": "mine"}})
            got = []
            async with aclosing(daemon.subscribe(APP, bob, ("group.message.received",), "t", 0)) as events:
                async for event in events:
                    got.append(event)
                    if any(e.data.get("message_id") == sent["message_id"] for e in got):
                        break
            await trio.to_thread.run_sync(lambda: devnet.set_faults(replay_pushes=2))  # alice's and bob's push twice
            r = await call(ha, "group.recall", {"group_id": gid, "message_ids": [sent["message_id"], theirs["message_id"]]})
            assert (await trio.to_thread.run_sync(devnet.set_faults))["replay_pushes"] == 0  # both were replayed
            assert r["recalled"] == [sent["message_id"]] and r["errors"] == [
                {"message_id": theirs["message_id"], "error": "not_sender"}], r
            recalls = []
            async with aclosing(daemon.subscribe(APP, bob, ("group.message_recalled",), "r", 0)) as events:
                async for event in events:
                    recalls.append(event)
                    break
            with trio.move_on_after(1.0):  # a second row would come now
                async with aclosing(daemon.subscribe(APP, bob, ("group.message_recalled",), "r2", recalls[0].cursor)) as evs:
                    async for event in evs:
                        recalls.append(event)
            await daemon.aclose()
            nursery.cancel_scope.cancel()
    assert len(recalls) == 1 and recalls[0].data["group_id"] == gid
    assert recalls[0].data["message_ids"] == [sent["message_id"]] and recalls[0].data["recalled_by"] == alice
