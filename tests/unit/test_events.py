"""aund/aun/events.py: the gateway event table against the SDK's own lists, the durable decoders
under random input, and the volatile dedupe window."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st

from aund.aun import events as ev
from aund.aun.groups import GROUP_EVENTS
from aund.daemon import ALL_KINDS, LINK_EVENT_KINDS
from aund.inbox import Inbox

pytestmark = pytest.mark.timeout(60)

# Reads fastaun 0.5.25's lists in its own process (aund never imports the SDK): the names of its
# EVENT_NAME_MAP, every `_raw.*` it subscribes to, and the events it passes through as they are.
SDK_LISTS = r"""
import inspect, json, re
import aun_core.client as client, aun_core.transport as transport
src = inspect.getsource(client)
raw = set(re.findall(r'subscribe_protocol\(f?"_raw\.([^"{]+)"', src))
loop = re.search(r'for evt in \(([^)]*)\):\s*\n\s*self\._dispatcher\.subscribe_protocol\(f"_raw\.\{evt\}"', src)
passthrough = re.findall(r'"([^"]+)"', loop.group(1))
print(json.dumps({"map": sorted(transport.EVENT_NAME_MAP), "raw": sorted(raw), "passthrough": passthrough}))
"""


def test_every_event_the_sdk_handles_has_a_place():
    out = subprocess.run([sys.executable, "-c", SDK_LISTS], capture_output=True, text=True, timeout=30, check=True)
    sdk = json.loads(out.stdout)
    assert sdk["passthrough"] and "message.recalled" in sdk["raw"]  # the parse found the lists
    placed = set(ev.RULES) | ev.MESSAGE_PUSHES | GROUP_EVENTS | LINK_EVENT_KINDS
    missing = (set(sdk["map"]) | set(sdk["raw"]) | set(sdk["passthrough"])) - placed
    assert not missing, f"gateway events the SDK handles that aund's table does not name: {sorted(missing)}"
    for name in sdk["passthrough"]:  # what the SDK hands apps as it is stays live here
        assert not ev.RULES[name].durable
    for name in ("message.recalled", "message.read_changed", "group.invite_created", "group.message_recalled"):
        assert ev.RULES[name].durable


def test_kinds_subscribe_knows():
    assert ev.DURABLE_KINDS.isdisjoint(ev.LIVE_KINDS)
    assert {"message.recalled", "group.invite_received", "message.volatile", "app.*"} <= ALL_KINDS
    assert ev.is_known_kind("app.typing") and ev.is_known_kind("org.member.changed")
    assert not ev.is_known_kind("app.") and not ev.is_known_kind("message.recieved")
    assert ev.rule_for("stream/created").kind == "stream.created"
    assert ev.rule_for("no.such.event").kind == ev.OTHER_KIND
    assert ev.kind_matches(frozenset({"app.*"}), "app.typing") and not ev.kind_matches(frozenset({"app.*"}), "org.x")


def test_recall_keys_match_push_and_tombstone():
    push = ev.durable_event("me.aid.test", "message.recalled", {"from": "Bob.aid.test", "message_ids": ["b", "a", "a"]})
    tomb = ev.durable_event("me.aid.test", "message.recalled", {"from": "bob.aid.test", "recalled_message_id": "x"})
    assert push.kind == "message.recalled" and push.sender == "bob.aid.test" and push.message_id == "recall|a,b"
    assert push.data["message_ids"] == ["a", "b"] and tomb.message_id == "recall|x"
    assert ev.durable_event("me.aid.test", "message.recalled", {"from": "bob.aid.test"}) is None


def test_read_changed_only_for_this_aid_with_an_order():
    base = {"owner_aid": "me.aid.test", "scope": "p2p", "topic_key": "t", "last_read_message_id": "m", "last_read_order": 3}
    event = ev.durable_event("me.aid.test", "message.read_changed", base)
    assert event is not None and event.sender == "me.aid.test"
    # the dedupe key leaves the order out (as the SDK's event id): the same position is one row
    assert ev.durable_event("me.aid.test", "message.read_changed", dict(base, last_read_order=9)).message_id == event.message_id
    for bad in ({"owner_aid": "other.aid.test"}, {"scope": "group"}, {"last_read_order": 0}, {"last_read_order": True},
                {"topic_key": ""}, {"last_read_message_id": 5}):
        assert ev.durable_event("me.aid.test", "message.read_changed", dict(base, **bad)) is None, bad


JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=10),
                    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
                    max_leaves=10)
KEYS = st.sampled_from(["message_ids", "from", "from_aid", "group_id", "group_aid", "owner_aid", "scope", "topic_key",
                        "last_read_message_id", "last_read_order", "invite_ids", "invite_id", "invitee_aid", "status",
                        "recalled_message_id", "target_message_seqs", "storage", "inline_message"])


@settings(max_examples=400, deadline=None)
@given(name=st.sampled_from(sorted(ev.KEYS)), params=st.dictionaries(KEYS | st.text(max_size=5), JSON, max_size=8),
       aid=st.sampled_from(["me.aid.test", ""]))
def test_random_params_never_raise(name, params, aid):
    event = ev.durable_event(aid, name, params)
    if event is not None:
        assert isinstance(event.sender, str) and event.message_id and isinstance(event.data, dict)
        json.dumps(event.data)
        assert len(event.message_id) <= ev.MAX_KEY_CHARS + 100
    ev.is_volatile(params)
    ev.rule_for(str(params.get("status", name)))


@given(value=JSON)
def test_non_dict_params_are_no_event(value):
    for name in ev.KEYS:
        if not isinstance(value, dict):
            assert ev.durable_event("me.aid.test", name, value) is None
    assert ev.is_volatile(value) in (True, False)


def test_volatile_seen_until_expiry_and_bounded():
    now = [1000.0]
    seen = ev.VolatileSeen(lambda: now[0], limit=3)
    seen.add(("bob", "v1"), int((now[0] + 300) * 1000))
    assert seen.seen(("bob", "v1"))
    now[0] += 299
    assert seen.seen(("bob", "v1"))
    now[0] += 2
    assert not seen.seen(("bob", "v1"))  # expired: forgotten
    seen.add(("bob", "short"), int(now[0] * 1000))  # already expiring: still kept the minimum window
    now[0] += ev.VOLATILE_MIN_SECONDS - 1
    assert seen.seen(("bob", "short"))
    for i in range(5):
        seen.add(("bob", f"n{i}"), None)
    assert not seen.seen(("bob", "short")) and seen.seen(("bob", "n4")) and not seen.seen(("bob", "n1"))


def test_catch_up_splits_invites_and_owns_read_states():
    listed = {"items": [{"group_id": "g.aid.test", "invite_ids": ["i1", "i2"], "inviter_aids": ["a", "b"],
                         "status": "pending"}, {"group_id": "h.aid.test", "invite_id": "i3", "status": "accepted"}, 7]}
    out = ev.catch_up_events("me.aid.test", "group.list_my_invites", listed)
    assert [(n, p["invite_ids"], p["inviter_aids"]) for n, p in out] == [
        ("group.invite_created", ["i1"], ["a"]), ("group.invite_created", ["i2"], ["b"])]
    pushed = ev.durable_event("me.aid.test", "group.invite_created",
                              {"group_id": "g.aid.test", "invite_id": "i1", "invite_ids": ["i1"], "status": "pending"})
    assert ev.durable_event("me.aid.test", *out[0]).message_id == pushed.message_id  # one row for push and list
    states = {"states": [{"scope": "p2p", "topic_key": "t", "last_read_message_id": "m", "last_read_order": 2},
                         {"topic_key": "u", "last_read_message_id": "x", "last_read_order": 0}]}
    out = ev.catch_up_events("me.aid.test", "message.read_state", states)
    assert [ev.durable_event("me.aid.test", *o) is not None for o in out] == [True, False]  # unresolved: no event
    assert ev.catch_up_events("me.aid.test", "message.read_state", None) == []


class _CountingLink:
    """Stands in for a link (fault injection: a burst larger than the queue); answers the catch-up calls."""

    aid = "me.aid.test"
    gateway = "ws://127.0.0.1:1/aun"

    def __init__(self) -> None:
        self.calls: list[str] = []

    async def call(self, method, params, **_):
        self.calls.append(method)
        if method == "group.list_my_invites":
            return {"items": [{"group_id": "g.aid.test", "invite_ids": ["late"], "status": "pending"}]}
        return {"states": []}


async def test_an_overflowing_queue_asks_again_once_drained(tmp_path):
    inbox = Inbox(tmp_path / "inbox.sqlite3", b"k" * 32)
    link = _CountingLink()
    sink = ev.GatewayEvents(link, None, inbox, lambda *a: None)
    for i in range(ev.EVENT_QUEUE + 10):  # the reader pushes faster than the sink drains
        sink.on_event("message.recalled", {"from": "bob.aid.test", "message_ids": [f"m{i}"]})
    assert sink.stats["dropped"] == 10
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(sink.run)
            while "message.read_state" not in link.calls:
                await trio.sleep(0.01)
            nursery.cancel_scope.cancel()
    rows = await inbox.read("me.aid.test", 0, (), 5000)
    assert sum(r.kind == "message.recalled" for r in rows) == ev.EVENT_QUEUE
    assert [r.data["invite_ids"] for r in rows if r.kind == "group.invite_received"] == [["late"]]
    assert link.calls == ["group.list_my_invites", "message.read_state"]
    inbox.close()
