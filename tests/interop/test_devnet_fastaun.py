"""The official SDK (fastaun 0.5.25, in a subprocess) against a real `aund devnet` process."""
from __future__ import annotations

import pytest

from tests.helpers import run_fastaun

pytestmark = [pytest.mark.interop, pytest.mark.timeout(180)]


def test_register_connect_send_both_ways(devnet, tmp_path):
    lines = run_fastaun("both_ways", devnet, tmp_path / "sdk")
    names = {c["check"] for c in lines if "check" in c}
    # every path was exercised: plain and E2EE, both directions, by push and by pull, and dedupe
    assert {"push e2ee to bob", "push e2ee to alice", "pull e2ee to bob", "duplicate message_id"} <= names
    stats = devnet.stats()
    assert stats["rpc_errors"] == {}
    for method in ("auth.create_aid", "auth.aid_login1", "auth.aid_login2", "auth.connect",
                   "message.v2.put_peer_pk", "message.v2.bootstrap", "message.peers", "message.v2.pull",
                   "message.v2.ack"):
        assert stats["rpc"].get(method, 0) >= 1, method
    assert stats["pushes"] >= 4 and stats["pushes_dropped"] == 0


def test_restart_keeps_state_and_offline_messages_arrive_in_order(devnet, tmp_path):
    work = tmp_path / "sdk"
    run_fastaun("offline_phase1", devnet, work, N="6")
    devnet.kill()  # SIGKILL: what was acked as stored must survive
    devnet.start()
    lines = run_fastaun("offline_phase2", devnet, work, N="6")
    order = next(c for c in lines if c.get("check") == "offline messages in order, once")
    assert order["detail"] == [f"offline {i}" for i in range(6)]
    # the second run logged in with stored credentials: no new registrations after the restart
    assert devnet.stats()["rpc"].get("auth.create_aid", 0) == 0


def test_second_long_connection_replaces_the_first(devnet, tmp_path):
    run_fastaun("slot_kick", devnet, tmp_path / "sdk")
    events = devnet.stats()["connections"]
    connects = [e for e in events if e["event"] == "connect"]
    closes = [e for e in events if e["event"] == "close"]
    assert [c["kicked"] for c in connects] == [0, 1]
    assert closes[0]["conn_id"] == connects[0]["conn_id"] and closes[0]["code"] == 4015
