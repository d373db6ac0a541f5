"""`aund.testing.local_aund`, as an app developer's test uses it: a devnet, a daemon and its app
socket inside the test's trio run; two identities exchange an E2EE message through client_stub
(the blocking Client, in a worker thread)."""
from __future__ import annotations

import os

import pytest
import trio

from aund.testing import local_aund
from client_stub import Client

pytestmark = pytest.mark.timeout(60)


def _exchange(socket, alice: str, bob: str) -> dict:
    with Client(socket) as app:
        for aid in (alice, bob):
            app.ensure_identity(aid)
            app.session(aid).wait_ready(timeout=30)
        app.session(alice).call("message.send", {"to": bob, "payload": {"type": "text", "text": "hi"}})
        with app.session(bob).events("t") as events:
            return events.get(timeout=30).data


async def test_local_aund_is_a_whole_network_in_one_test(tmp_path):
    tag = os.getpid() % 100000
    alice, bob = f"tst-a-{tag}.aid.test", f"tst-b-{tag}.aid.test"
    with trio.fail_after(50):
        async with local_aund(tmp_path) as env:
            got = await trio.to_thread.run_sync(_exchange, env.socket, alice, bob)
            assert env.devnet.gateway_url.startswith("ws://127.0.0.1:")
    assert got["from"] == alice and got["encrypted"] is True and got["payload"]["text"] == "hi"
