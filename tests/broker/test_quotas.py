"""Per-uid and per-AID shares of the broker: one user cannot take every
connection, one slow AID or one busy user cannot take every global call slot, and the gateway
links one app or one user may hold are capped. The real socket server over the scripted
FakeBackend; the other user is a real process that drops to uid 65534 before it connects (the
kernel's SO_PEERCRED then names it), so this test runs as root, as the CI does.
"""
from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import trio

from aund.broker import Limits, Policy
from client_stub import AsyncClient, Client, LimitsExceeded, RpcTimeout
from tests.broker.conftest import in_asyncio, in_thread, wait_until
from tests.broker.fakebackend import FakeBackend
from tests.broker.rawclient import RawConn
from tests.system.harness import finish, kill_all, spawn_app

pytestmark = pytest.mark.timeout(60)
ALICE, BOB = "alice.aid.test", "bob.aid.test"
NOBODY, NOGROUP = 65534, 65534


async def _probe(sock: Path, log: Path, connections: int) -> dict:
    proc = spawn_app("quota-probe", {"socket": str(sock), "uid": NOBODY, "gid": NOGROUP, "connections": connections,
                                     "aid": BOB}, log)
    try:
        return await in_thread(finish, proc, 40, log)
    finally:
        kill_all([proc])


async def test_one_uid_cannot_take_every_connection(start_broker, nogroup_socket_dir, tmp_path):
    """With the default limits, root opens connections until refused (64 of the 256): another user
    still connects, and its call runs."""
    backend = FakeBackend(Policy({BOB: {"uids": [NOBODY]}}))
    b = await start_broker(path=nogroup_socket_dir / "aund.sock", backend=backend)
    cap = Limits().connections_per_uid
    with trio.fail_after(50):
        raws = []
        try:
            for _ in range(cap):
                raws.append(await RawConn.open(b.path))
                await raws[-1].hello()
            with pytest.raises(LimitsExceeded) as info:  # root's own next connection
                await in_thread(lambda: Client(b.path, app="one-more").connect())
            assert info.value.data == {"quota": "connections_per_uid", "limit": cap}
            got = await _probe(b.path, tmp_path / "probe.log", 1)
            assert got["connections"] == ["ok"] and got["echo"] == "ok", got
        finally:
            for raw in raws:
                await raw.aclose()


async def test_a_busy_uid_leaves_call_slots_to_the_others(start_broker, nogroup_socket_dir, tmp_path):
    """Root holds all the call slots its uid may have: its next call waits for its own share (and
    times out naming it) while another user's call runs at once; every slot comes back."""
    limits = Limits(global_calls=8, calls_per_uid=4, calls_per_aid=8)
    backend = FakeBackend(Policy({BOB: {"uids": [NOBODY]}}))
    b = await start_broker(limits=limits, path=nogroup_socket_dir / "aund.sock", backend=backend)
    with trio.fail_after(50):
        mine = [await in_thread(lambda: Client(b.path, app=f"root{i}").connect()) for i in range(2)]
        async with trio.open_nursery() as nursery:
            for _ in range(4):
                nursery.start_soon(in_thread, mine[0].session(ALICE).call, "hold")
            await wait_until(lambda: b.limiter.statistics().borrowed_tokens == 4)
            with pytest.raises(RpcTimeout) as slow:
                await in_thread(mine[1].session(BOB).call, "echo", timeout=0.3)
            assert slow.value.data["queue"] == "uid"
            got = await _probe(b.path, tmp_path / "probe.log", 1)
            assert got["echo"] == "ok", got
            b.backend.gate.set()
        for client in mine:
            await in_thread(client.close)
    assert b.limiter.statistics().borrowed_tokens == 0 and not b.server._shares


async def test_a_slow_aid_leaves_the_global_budget_to_the_others(start_broker):
    """The attack with the default limits: four apps fill ALICE with 4 x 64 slow calls (the whole
    global budget of 256, before): ALICE now gets at most calls_per_aid slots, and BOB's call is
    answered at once."""
    b = await start_broker()
    per_app, apps = Limits().calls_per_app, 4

    async def attack() -> dict:
        clients = [AsyncClient(b.path, app=f"slow{i}") for i in range(apps)]
        for c in clients:
            await c.connect()
        try:
            holds = [asyncio.ensure_future(c.session(ALICE).call("hold")) for c in clients for _ in range(per_app)]
            while b.backend.in_flight < Limits().calls_per_aid:
                await asyncio.sleep(0.01)
            async with AsyncClient(b.path, app="quick") as quick:
                try:
                    answer = await quick.session(BOB).call("echo", timeout=2)
                except RpcTimeout as exc:
                    answer = {"timeout": exc.data}
            trio.from_thread.run_sync(b.backend.gate.set)
            await asyncio.gather(*holds)
            return answer
        finally:
            for c in clients:
                await c.close()

    with trio.fail_after(40):
        answer = await in_asyncio(attack)
    assert answer.get("aid") == BOB, answer
    assert b.backend.max_in_flight <= Limits().calls_per_aid + 1  # ALICE's share (+ BOB's one call)
    assert b.limiter.statistics().borrowed_tokens == 0 and not b.server._shares


async def test_links_per_app_and_per_uid_are_capped(start_broker):
    b = await start_broker(limits=Limits(links_per_app=2, links_per_uid=3))

    async def app() -> dict:
        out = {}
        async with AsyncClient(b.path, app="one") as one, AsyncClient(b.path, app="two") as two:
            await one.session(ALICE, "main").open()
            await one.session(ALICE, "s2").open()
            await one.session(ALICE, "main").open()  # the same link again: no new one
            try:
                await one.session(ALICE, "s3").open()
            except LimitsExceeded as exc:
                out["app"] = exc.data
            await two.session(BOB, "main").open()  # the uid's third link
            try:
                await two.session(BOB, "other").open()
            except LimitsExceeded as exc:
                out["uid"] = exc.data
            await asyncio.sleep(0)
        return out

    with trio.fail_after(20):
        out = await in_asyncio(app)
    assert out == {"app": {"quota": "links", "limit": 2}, "uid": {"quota": "links_per_uid", "limit": 3}}


def test_limits_table_names_what_is_wrong():
    assert Limits.from_table({"connections_per_uid": 5, "stall_timeout": 3}).connections_per_uid == 5
    for table, words in (({"nope": 1}, "unknown key 'nope'"), ({"calls_per_aid": "x"}, "calls_per_aid must be"),
                         ({"links_per_uid": 0}, "links_per_uid must be a positive"), ([], "must be a table")):
        with pytest.raises(ValueError) as info:
            Limits.from_table(table)
        assert words in str(info.value)
