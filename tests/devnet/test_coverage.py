"""aund.aun.coverage.verify_peer_page: each rule alone, and the devnet's real pull path as a property."""
from __future__ import annotations

import copy
import itertools

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from aund.aun.coverage import CoverageProofError, verify_peer_page
from aund.devnet.gateway import Conn, Devnet
from aund.devnet.pki import DevCA
from aund.devnet.store import Store, dumps

S = "alice-0001.aid.test"
OTHER = "mallory-01.aid.test"

# Pure, synchronous tests: pytest-timeout (signal based) is their deadline.
pytestmark = pytest.mark.timeout(40)


def row(seq, sender=S, **extra):
    return {"seq": seq, "message_id": f"m-{seq}", "from_aid": sender, "from": sender, "sender_aid": sender, **extra}


def good_page(**over):
    """A page for after_seq=10 that covers (10, 30] of a head at 40, with rows 12 and 30."""
    page = {"cursor_scope": "peer", "sender_aid": S, "device_id": "d1", "messages": [row(12), row(30)], "count": 2,
            "scan_after_seq": 10, "covered_through_seq": 30, "next_after_seq": 30, "head_seq": 40,
            "retention_floor_seq": 0, "persistent_has_more": True, "volatile_has_more": False, "has_more": True,
            "server_ack_seq": 5}
    page.update(over)
    return page


REQ = {"cursor_scope": "peer", "sender_aid": S, "after_seq": 10, "limit": 50, "device_id": "d1", "slot_id": "svc/a"}


def test_good_pages_pass():
    verify_peer_page(REQ, good_page(), local_ack=0)
    # the last page: covered == head, nothing more
    verify_peer_page(REQ, good_page(covered_through_seq=40, next_after_seq=40, persistent_has_more=False,
                                    has_more=False), local_ack=0)
    # an empty page that covers nothing new
    verify_peer_page(REQ, good_page(messages=[], covered_through_seq=10, next_after_seq=10, head_seq=10,
                                    persistent_has_more=False, has_more=False), local_ack=0)
    # scan_after may start at the local ack (ahead of after_seq) ...
    verify_peer_page(REQ, good_page(scan_after_seq=12, messages=[row(30)]), local_ack=12)
    # ... and at the retention floor
    verify_peer_page(REQ, good_page(scan_after_seq=20, retention_floor_seq=20, messages=[row(30)]), local_ack=0)
    # volatile rows carry no seq and are outside the seq rules; volatile_has_more alone sets has_more
    verify_peer_page(REQ, good_page(messages=[row(12), {"storage": "volatile", "from_aid": S}, row(30)],
                                    volatile_has_more=True), local_ack=0)
    # the same slot isolation key is the same cursor
    verify_peer_page(REQ, good_page(slot_id="svc:b"), local_ack=0)
    # an empty or null sender field counts as absent (as in the SDK); one naming the sender suffices
    verify_peer_page(REQ, good_page(messages=[{"seq": 12, "from_aid": "", "from": None, "sender_aid": S}]), local_ack=0)


# (rule, how to break it); each case breaks exactly one rule of a good page.
BROKEN = {
    "not_an_object": lambda p: ["not", "a", "page"],
    "cursor_scope": lambda p: p.update(cursor_scope="global"),
    "sender_aid": lambda p: p.update(sender_aid=OTHER),
    "device_id": lambda p: p.update(device_id="d2"),
    "slot_id": lambda p: p.update(slot_id="other/a"),
    "messages": lambda p: p.update(messages={"12": row(12)}),
    "flags_type": lambda p: p.update(persistent_has_more=1),
    "has_more": lambda p: p.update(has_more=False),
    "seq_type": lambda p: p.update(head_seq=40.0),
    "scan_after": lambda p: p.update(scan_after_seq=9, messages=[row(30)]),
    "covered_range": lambda p: p.update(covered_through_seq=41, next_after_seq=41),
    "covered_below_head": lambda p: p.update(persistent_has_more=False, volatile_has_more=True),
    "next_after_seq": lambda p: p.update(next_after_seq=31),
    "row_count": None,  # needs a smaller limit: see the test
    "row_seq_type": lambda p: p["messages"].__setitem__(0, row("12")),
    "row_seq_range": lambda p: p["messages"].append(row(31)),
    "row_order": lambda p: p.update(messages=[row(30), row(12)]),
    "row_sender": lambda p: p["messages"].__setitem__(1, row(30, from_aid=OTHER)),
}


@pytest.mark.parametrize("reason", sorted(BROKEN))
def test_each_rule_alone(reason):
    page, request = good_page(), dict(REQ)
    if reason == "row_count":
        request["limit"] = 1
    else:
        replaced = BROKEN[reason](page)
        page = page if replaced is None else replaced
    with pytest.raises(CoverageProofError) as info:
        verify_peer_page(request, page, local_ack=0)
    assert info.value.reason == reason, str(info.value)


@pytest.mark.parametrize("page_over, reason", [
    ({"scan_after_seq": 12, "messages": [row(30)]}, "scan_after"),     # beyond after with no ack to justify it
    ({"messages": [row(12), row(12), row(30)]}, "row_order"),          # duplicate seq
    ({"messages": [row(10), row(30)]}, "row_seq_range"),               # at scan_after: exclusive bound
    ({"messages": [row(True)]}, "row_seq_type"),                       # bool is not a seq
    ({"volatile_has_more": None}, "flags_type"),
    ({"retention_floor_seq": -1}, "seq_type"),
    ({"covered_through_seq": 2**53, "next_after_seq": 2**53, "head_seq": 2**53}, "seq_type"),
    ({"messages": [{"seq": 12, "message_id": "m"}]}, "row_sender"),    # a row naming no sender
    ({"messages": [row(12, sender_aid=OTHER), row(30)]}, "row_sender"),  # every named sender must match
])
def test_more_violations(page_over, reason):
    with pytest.raises(CoverageProofError) as info:
        verify_peer_page(REQ, good_page(**page_over), local_ack=0)
    assert info.value.reason == reason, str(info.value)


def test_force_ignores_the_local_ack():
    page = good_page(scan_after_seq=12, messages=[row(30)])
    verify_peer_page(REQ, page, local_ack=12)
    with pytest.raises(CoverageProofError, match="scan_after"):
        verify_peer_page(dict(REQ, force=True), page, local_ack=12)


def test_tail_mode():
    req = dict(REQ, window_mode="tail", after_seq=0)
    tail = good_page(window_start_seq=25, covered_through_seq=40, next_after_seq=40, messages=[row(30), row(40)])
    del tail["has_more"]  # neither the continuation flags nor scan_after/next_after are read in tail mode
    del tail["scan_after_seq"], tail["next_after_seq"]
    verify_peer_page(req, tail, local_ack=0)
    for over, reason in [({"window_start_seq": None}, "window_start"), ({"covered_through_seq": 39}, "tail_window"),
                         ({"window_start_seq": 0}, "tail_window"), ({"messages": [row(24)]}, "row_seq_range")]:
        with pytest.raises(CoverageProofError) as info:
            verify_peer_page(req, dict(tail, **over), local_ack=0)
        assert info.value.reason == reason
    # nothing after after_seq: an empty window at head
    verify_peer_page(dict(req, after_seq=40), dict(tail, window_start_seq=40, messages=[]), local_ack=0)
    with pytest.raises(CoverageProofError, match="tail_window"):
        verify_peer_page(dict(req, after_seq=40), dict(tail, window_start_seq=40), local_ack=0)


def test_bad_request_is_a_caller_bug():
    with pytest.raises(ValueError):
        verify_peer_page({"sender_aid": S, "limit": 5}, good_page(), local_ack=0)
    with pytest.raises(ValueError):
        verify_peer_page({"sender_aid": S, "after_seq": True, "limit": 5}, good_page(), local_ack=0)


def test_input_is_not_modified():
    page = good_page()
    before = copy.deepcopy(page)
    verify_peer_page(REQ, page, local_ack=0)
    assert page == before


# --- the devnet's real pull path, as a property --------------------------------------------------
SENDERS = [f"sender{i}-x.aid.test" for i in range(4)]
RECEIVER_DEVICE = "dev-1"


def make_conn(net: Devnet, receiver: str, slot_id: str = "svc/main") -> Conn:
    conn = Conn(net, None, None)  # rpc_pull only touches the store, never the socket
    conn.aid, conn.device_id, conn.slot_id = receiver, RECEIVER_DEVICE, slot_id
    conn.slot_key = slot_id.split("/")[0]
    return conn


inboxes = st.lists(st.tuples(st.integers(0, len(SENDERS) - 1), st.booleans()), min_size=0, max_size=60)


def test_devnet_pull_pages_satisfy_the_proof(tmp_path):
    store = Store(tmp_path / "devnet.sqlite3")
    net = Devnet(store, DevCA.open(tmp_path / "pki", "aid.test"), "aid.test")
    receivers = (f"recv{i:06d}-x.aid.test" for i in itertools.count())
    try:
        check_property(net, receivers)
    finally:
        store.close()


def check_property(net: Devnet, receivers) -> None:
    @settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(inbox=inboxes, limit=st.integers(1, 200), after=st.integers(0, 70),
           acks=st.lists(st.integers(0, 70), max_size=4),
           local_ack=st.integers(0, 70), walk_limit=st.integers(1, 7), data=st.data())
    def prop(inbox, limit, after, acks, local_ack, walk_limit, data):
        receiver = next(receivers)  # a fresh inbox per example in the same database
        store = net.store
        for n, (who, encrypted) in enumerate(inbox):
            sender = SENDERS[who]
            if encrypted:
                body = dumps({"type": "e2ee.p2p_encrypted", "version": "v2", "aad": {"from": sender},
                              "recipients": [[receiver, "", "peer", "aid_master", "fp", "", "AA==", "AA=="]]})
            else:
                body = dumps({"type": "text", "text": f"#{n}"})
            store.append_message(receiver, sender, "sd", f"m-{n}", "e2ee" if encrypted else "plain", body, True)
        conn = make_conn(net, receiver)
        sender = SENDERS[data.draw(st.integers(0, len(SENDERS) - 1), label="sender")]
        for ack in acks:  # server-side acks of this device/slot; pages never depend on them
            store.ack(receiver, conn.device_id, conn.slot_key, sender, ack)
        expected = [(seq, f"m-{n}") for seq, (n, (who, _)) in enumerate(enumerate(inbox), start=1)
                    if SENDERS[who] == sender]

        # one page from a random cursor
        request = {"cursor_scope": "peer", "sender_aid": sender, "after_seq": after, "limit": limit,
                   "device_id": conn.device_id, "slot_id": conn.slot_id}
        page = conn.rpc_pull(dict(request))
        verify_peer_page(request, page, local_ack=local_ack)
        assert [(m["seq"], m["message_id"]) for m in page["messages"]] == [e for e in expected if e[0] > after][:limit]

        # walking from 0 by next_after_seq yields every message of that sender exactly once, in order
        walked, cursor = [], 0
        for _ in range(len(inbox) + 2):
            request = {"cursor_scope": "peer", "sender_aid": sender, "after_seq": cursor, "limit": walk_limit}
            page = conn.rpc_pull(dict(request))
            verify_peer_page(request, page, local_ack=0)
            walked += [(m["seq"], m["message_id"]) for m in page["messages"]]
            assert page["next_after_seq"] >= cursor
            cursor = page["next_after_seq"]
            if not page["has_more"]:
                break
        else:
            raise AssertionError("the walk did not end")
        assert walked == expected
        assert cursor == page["head_seq"]

    prop()


def test_devnet_pull_with_piggybacked_ack_and_force(tmp_path):
    """The ack_up_to_seq piggy-back and force pulls also satisfy the proof (force: ack counts as 0)."""
    store = Store(tmp_path / "devnet.sqlite3")
    try:
        net = Devnet(store, DevCA.open(tmp_path / "pki", "aid.test"), "aid.test")
        receiver = "recv-pig-x.aid.test"
        for n in range(9):
            store.append_message(receiver, SENDERS[n % 2], "sd", f"m-{n}", "plain", dumps({"n": n}), True)
        conn = make_conn(net, receiver)
        for request in ({"sender_aid": SENDERS[0], "after_seq": 0, "limit": 2, "ack_up_to_seq": 3},
                        {"sender_aid": SENDERS[0], "after_seq": 3, "limit": 2, "force": True},
                        {"sender_aid": SENDERS[1], "after_seq": 0, "limit": 10, "ack_up_to_seq": 100}):
            request["cursor_scope"] = "peer"
            page = conn.rpc_pull(dict(request))
            verify_peer_page(request, page, local_ack=request.get("ack_up_to_seq", 0))
            assert page["messages"] and page["server_ack_seq"] == min(request.get("ack_up_to_seq", 3), page["head_seq"])
    finally:
        store.close()


def test_a_lying_devnet_page_is_rejected(tmp_path):
    """The devnet's break_proof fault claims coverage past the head: verify_peer_page refuses it."""
    store = Store(tmp_path / "devnet.sqlite3")
    try:
        net = Devnet(store, DevCA.open(tmp_path / "pki", "aid.test"), "aid.test")
        receiver = "recv-lie-x.aid.test"
        for n in range(3):
            store.append_message(receiver, SENDERS[0], "sd", f"m-{n}", "plain", dumps({"n": n}), True)
        conn = make_conn(net, receiver)
        request = {"cursor_scope": "peer", "sender_aid": SENDERS[0], "after_seq": 0, "limit": 50}
        verify_peer_page(request, conn.rpc_pull(dict(request)), local_ack=0)
        net.faults.break_proof = 1
        with pytest.raises(CoverageProofError) as info:
            verify_peer_page(request, conn.rpc_pull(dict(request)), local_ack=0)
        assert info.value.reason == "covered_range"
        verify_peer_page(request, conn.rpc_pull(dict(request)), local_ack=0)  # one lie only
    finally:
        store.close()
