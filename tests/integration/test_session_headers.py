"""Protected headers belong to one app session: closing another session of the same AID (another
slot) leaves them in place, and they are signed into what this session sends. In-process daemon,
real devnet process."""
from __future__ import annotations

import os
from contextlib import aclosing

import pytest
import trio

from tests.inproc import APP, ready_handle, start_daemon

pytestmark = pytest.mark.timeout(60)


async def test_closing_another_session_of_the_aid_keeps_this_sessions_headers(devnet, tmp_path):
    tag = os.getpid() % 100000
    alice, bob = f"hdr-a-{tag}.aid.test", f"hdr-b-{tag}.aid.test"
    with trio.fail_after(45):
        async with trio.open_nursery() as nursery:
            daemon = await start_daemon(nursery, devnet, tmp_path, [alice, bob])
            main = await ready_handle(daemon, alice)
            other = await ready_handle(daemon, alice, slot_id="other")
            await ready_handle(daemon, bob)
            main.set_protected_headers(APP, {"trace": "main-session"})
            other.set_protected_headers(APP, {"trace": "other-session"})
            await daemon.release_session(APP, other)  # the other slot's session ends
            await main.call("message.send", {"to": bob, "payload": {"type": "text", "text": "hi"}},
                            timeout=None, background=False, app=APP)
            async with aclosing(daemon.subscribe(APP, bob, ("message.received",), "t", 0)) as events:
                async for event in events:
                    assert event.data["payload"]["text"] == "hi"
                    assert event.data["protected_headers"]["trace"] == "main-session"
                    break
            await daemon.aclose()
