"""E2EE groups between aund-held AIDs and the official SDK, through a real devnet process.

One in-process Daemon holds two AIDs (alice, the owner, and bob); a fastaun client runs in a
subprocess (tests/interop/fastaun_groups_aund_driver.py). Each member sends N E2EE group messages
concurrently; every member reads all 3N (aund members through their inbox subscription, fastaun by
its events and a pull); then bob is removed and can read nothing new while the others can. A
second test shows the link's pull gate serializing group pulls per group and coalescing identical
ones, as the devnet counts them.
"""
from __future__ import annotations

import json
import os
import sys
from contextlib import aclosing
from pathlib import Path
from typing import Any

import pytest
import trio

from aund.daemon import Daemon
from aund.errors import AundError
from tests.helpers import ROOT
from tests.inproc import APP, ready_handle, start_daemon

pytestmark = [pytest.mark.interop, pytest.mark.timeout(90)]

DRIVER = ROOT / "tests" / "interop" / "fastaun_groups_aund_driver.py"
N = 20
KINDS = ("group.message.received", "message.undecryptable", "group.changed")


class Reader:
    """An app's subscription to one AID's group events (durable: from the inbox, acked as read)."""

    def __init__(self, daemon: Daemon, aid: str) -> None:
        self.daemon, self.aid = daemon, aid
        self.events: list[Any] = []
        self.changed = trio.Event()

    async def run(self) -> None:
        async with aclosing(self.daemon.subscribe(APP, self.aid, KINDS, "test", "last_ack")) as events:
            async for event in events:
                self.events.append(event)
                await self.daemon.ack(APP, self.aid, "test", event.cursor)
                self.changed.set()
                self.changed = trio.Event()

    def messages(self) -> list[dict[str, Any]]:
        return [e.data for e in self.events if e.kind == "group.message.received"]

    def texts(self) -> list[str]:
        return [m["payload"].get("text") for m in self.messages()]

    async def wait_for(self, predicate, timeout: float) -> bool:
        with trio.move_on_after(timeout):
            while not predicate():
                await self.changed.wait()
            return True
        return predicate()


async def _file(path: Path, timeout: float) -> dict[str, Any]:
    with trio.fail_after(timeout):
        while not path.exists():
            await trio.sleep(0.05)
    await trio.sleep(0.05)
    return json.loads(path.read_text() or "{}")


async def test_group_with_two_aund_aids_and_a_fastaun_member(devnet, tmp_path):
    tag = os.getpid() % 100000
    alice, bob = f"alice-{tag}.aid.test", f"bob-{tag}.aid.test"
    work = tmp_path / "sdk"
    work.mkdir()
    result: dict[str, Any] = {}
    with trio.fail_after(80):
        async with trio.open_nursery() as nursery:
            env = dict(os.environ, AUN_GW_URL=devnet.gateway_url, AUN_ROOT_CA=devnet.root_ca, AUN_WORKDIR=str(work),
                       N=str(N))

            async def fastaun() -> None:
                result["proc"] = await trio.run_process([sys.executable, str(DRIVER), "aund_member"], env=env,
                                                        capture_stdout=True, capture_stderr=True, check=False)

            nursery.start_soon(fastaun)
            daemon = await start_daemon(nursery, devnet, tmp_path, [alice, bob], sync_poll_seconds=5.0)
            handles = {alice: await ready_handle(daemon, alice), bob: await ready_handle(daemon, bob)}

            async def call(aid: str, method: str, params: dict[str, Any]) -> dict[str, Any]:
                return await handles[aid].call(method, params, timeout=None, background=False, app=APP)

            handles[bob].set_protected_headers(APP, {"trace": "from-aund-bob"})
            readers = {aid: Reader(daemon, aid) for aid in (alice, bob)}
            for reader in readers.values():
                nursery.start_soon(reader.run)
            fast = (await _file(work / "fast.json", 30))["aid"]

            # --- alice creates an approval group and adds bob and the fastaun client -------------------
            created = await call(alice, "group.create", {"name": "aund + fastaun", "join_mode": "approval"})
            gid = created["group"]["group_id"]
            for member in (bob, fast):
                added = await call(alice, "group.add_member", {"group_id": gid, "aid": member})
                assert added["member"]["aid"] == member
            state = await call(alice, "group.get_state", {"group_id": gid})
            snapshot = json.loads(state["membership_snapshot"])
            assert state["state_version"] >= 3 and state["state_actor_aid"] == alice
            assert {m["aid"] for m in snapshot["members"]} == {alice, bob, fast}
            assert snapshot["admin_set"]["admin_aids"] == [alice]
            (work / "group.json").write_text(json.dumps({"gid": gid, "aund": {"alice": alice, "bob": bob}}))
            await _file(work / "ready", 30)

            # --- everyone sends N E2EE messages at once ---------------------------------------------------
            sent: dict[str, int] = {}

            async def send_all(aid: str, name: str) -> None:
                for i in range(N):
                    r = await call(aid, "group.send", {"group_id": gid, "payload": {"type": "text",
                                                                                     "text": f"{name} {i}"}})
                    sent[f"{name} {i}"] = r["seq"]

            (work / "go").touch()
            async with trio.open_nursery() as senders:
                senders.start_soon(send_all, alice, "alice")
                senders.start_soon(send_all, bob, "bob")
            phase1 = await _file(work / "phase1.json", 50)
            sent.update(phase1["sent"])
            assert sorted(sent.values()) == list(range(1, 3 * N + 1)), sorted(sent.values())
            by_seq = [t for t, _ in sorted(sent.items(), key=lambda kv: kv[1])]

            for aid, name in ((alice, "alice"), (bob, "bob")):
                reader = readers[aid]
                assert await reader.wait_for(lambda r=reader: len(r.messages()) >= 2 * N, 30), reader.texts()
                msgs = reader.messages()
                others = [t for t in by_seq if not t.startswith(name + " ")]
                assert [m["payload"]["text"] for m in msgs] == others  # all of them, once, in group order
                assert [m["seq"] for m in msgs] == [sent[t] for t in others]
                assert all(m["encrypted"] and m["group_id"] == gid and m["headers_verified"] for m in msgs)
                merged = sorted([(m["seq"], m["payload"]["text"]) for m in msgs]
                                + [(sent[f"{name} {i}"], f"{name} {i}") for i in range(N)])
                assert [t for _, t in merged] == by_seq  # with its own: all 3N, in seq order
                assert not [e for e in reader.events if e.kind == "message.undecryptable"]
                fast_msgs = [m for m in msgs if m["from"] == fast]
                assert [m["protected_headers"]["trace"] for m in fast_msgs] == [f"fast-{i}" for i in range(N)]
            bob_msgs = [m for m in readers[alice].messages() if m["from"] == bob]
            assert all(m["protected_headers"]["trace"] == "from-aund-bob" for m in bob_msgs)
            assert phase1["received"] == {t: sent[t] for t in by_seq if not t.startswith("fast ")}
            changed = {(e.data.get("action"), e.data.get("member_aid")) for e in readers[bob].events
                       if e.kind == "group.changed"}
            assert ("member_added", bob) in changed and ("member_added", fast) in changed

            # --- group.history: bob's aund reads back every message, page by page, decrypted ----------------
            history, before, pages = [], 10**9, 0
            while True:
                page = await call(bob, "group.history", {"group_id": gid, "before_seq": before, "limit": 25})
                pages += 1
                assert len(page["messages"]) <= 25 and "envelope_json" not in json.dumps(page)
                history = page["messages"] + history
                if not page["has_older"]:
                    break
                before = page["next_before_seq"]
            readable = [t for t in by_seq if not t.startswith("bob ")]  # his own sends were not wrapped for him
            assert [m["payload"]["text"] for m in history] == readable and pages >= 2
            assert all(m["encrypted"] and m["group_id"] == gid and "history_error" not in m for m in history)
            assert [m["seq"] for m in history] == [sent[t] for t in readable]
            with pytest.raises(AundError):  # the SDK's cap on group.history pages
                await call(bob, "group.history", {"group_id": gid, "before_seq": before, "limit": 51})

            # --- a thought: sealed for the members, opened by bob's aund ------------------------------------
            ctx = {"type": "run", "id": "run-1"}
            put = await call(alice, "group.thought.put", {"group_id": gid, "context": ctx,
                                                          "payload": {"type": "thought", "text": "pondering"}})
            assert put["stored_count"] == 1
            got = await call(bob, "group.thought.get", {"group_id": gid, "sender_aid": alice, "context": ctx})
            assert [t["payload"] for t in got["thoughts"]] == [{"type": "thought", "text": "pondering"}]
            assert all(t["encrypted"] and "decrypt_error" not in t for t in got["thoughts"])

            # --- alice removes bob: he reads nothing new, the others do ------------------------------------
            kicked = await call(alice, "group.kick", {"group_id": gid, "aid": bob})
            assert kicked["removed_aid"] == bob
            state = await call(alice, "group.get_state", {"group_id": gid})
            assert {m["aid"] for m in json.loads(state["membership_snapshot"])["members"]} == {alice, fast}
            assert await readers[bob].wait_for(lambda: any(
                e.kind == "group.changed" and e.data.get("action") == "member_removed"
                for e in readers[bob].events), 10)
            (work / "phase2.json").write_text(json.dumps({"removed": bob, "remaining": ["alice"]}))
            for i in range(3):
                await call(alice, "group.send", {"group_id": gid,
                                                 "payload": {"type": "text", "text": f"alice-after {i}"}})
            want = [f"fast-after {i}" for i in range(3)]
            assert await readers[alice].wait_for(lambda: set(want) <= set(readers[alice].texts()), 30)
            await _file(work / "phase2_done.json", 30)
            await trio.sleep(1.0)  # the others have everything; give bob's link the same chance
            stored = await daemon.inbox.read(bob, 0, ("group.message.received",), 1000)
            assert not [e for e in stored if "-after" in e.data["payload"]["text"]]
            assert len(stored) == 2 * N
            bob_link = daemon.links[(bob, "main")].link
            with pytest.raises(AundError) as refused:
                await bob_link.call("group.v2.pull", {"group_id": gid, "after_seq": 0, "limit": 200})
            assert refused.value.data.get("remote_code") == -33006
            with pytest.raises(AundError) as refused:
                await call(bob, "group.send", {"group_id": gid, "payload": {"type": "text", "text": "let me in"}})
            assert refused.value.data.get("remote_code") == -33006
            assert gid in daemon.links[(bob, "main")].groups._blocked
            (work / "done").touch()
            with trio.fail_after(20):
                while "proc" not in result:
                    await trio.sleep(0.05)
            stats = {aid: dict(daemon.links[(aid, "main")].groups.stats) for aid in (alice, bob)}
            await daemon.aclose()
            nursery.cancel_scope.cancel()  # the readers
    proc = result["proc"]
    lines = [json.loads(x) for x in proc.stdout.decode().splitlines() if x.startswith("{")]
    checks = [x for x in lines if "check" in x]
    failed = [c for c in checks if not c["ok"]]
    assert proc.returncode == 0 and checks and not failed, (failed, proc.stderr.decode()[-3000:])
    assert len(checks) >= 12
    assert stats[alice]["undecryptable"] == stats[bob]["undecryptable"] == 0
    assert stats[alice]["inline"] + stats[alice]["pulls"] > 0
    devnet_stats = await trio.to_thread.run_sync(devnet.stats)
    assert devnet_stats["rpc"]["group.v2.send"] >= 3 * N + 6
    assert devnet_stats["rpc"]["group.v2.propose_state"] >= 3


async def test_pull_gate_serializes_group_pulls_and_coalesces_identical_ones(devnet, tmp_path):
    tag = os.getpid() % 100000
    alice, bob = f"gatea-{tag}.aid.test", f"gateb-{tag}.aid.test"
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            daemon = await start_daemon(nursery, devnet, tmp_path, [alice, bob], sync_poll_seconds=5.0)
            handles = {alice: await ready_handle(daemon, alice), bob: await ready_handle(daemon, bob)}

            async def call(aid: str, method: str, params: dict[str, Any]) -> dict[str, Any]:
                return await handles[aid].call(method, params, timeout=None, background=False, app=APP)

            gid = (await call(alice, "group.create", {"name": "gate", "join_mode": "approval"}))["group"]["group_id"]
            await call(alice, "group.add_member", {"group_id": gid, "aid": bob})
            for i in range(30):
                await call(alice, "group.send", {"group_id": gid, "payload": {"type": "text", "text": f"m{i}"}})
            reader = Reader(daemon, bob)
            nursery.start_soon(reader.run)
            assert await reader.wait_for(lambda: len(reader.messages()) == 30, 20)
            assert reader.texts() == [f"m{i}" for i in range(30)]
            sync = daemon.links[(bob, "main")].groups
            link = daemon.links[(bob, "main")].link
            await trio.to_thread.run_sync(lambda: devnet.set_faults(reply_delay_ms=150))
            before = (await trio.to_thread.run_sync(devnet.stats))["rpc"].get("group.v2.pull", 0)

            identical: list[dict[str, Any]] = []

            async def same() -> None:
                identical.append(await sync.fetch_page(gid, 0))

            async with trio.open_nursery() as pulls:
                for _ in range(20):
                    pulls.start_soon(same)
            middle = (await trio.to_thread.run_sync(devnet.stats))["rpc"].get("group.v2.pull", 0)

            pages: dict[int, dict[str, Any]] = {}

            async def distinct(after: int) -> None:
                pages[after] = await sync.fetch_page(gid, after)

            started = trio.current_time()
            async with trio.open_nursery() as pulls:
                for after in range(0, 24, 3):
                    pulls.start_soon(distinct, after)
            elapsed = trio.current_time() - started
            await trio.to_thread.run_sync(lambda: devnet.set_faults(reply_delay_ms=0))
            stats = await trio.to_thread.run_sync(devnet.stats)
            await daemon.aclose()
            nursery.cancel_scope.cancel()  # the reader
    assert len(identical) == 20 and all(p == identical[0] for p in identical)
    assert len(identical[0]["messages"]) == 30
    assert middle - before == 1  # twenty identical pulls of one group: one request at the gateway
    assert stats["rpc"]["group.v2.pull"] - middle == 8  # eight different pages: eight requests ...
    assert stats["max_inflight_by_method"]["group.v2.pull"] == 1  # ... one at a time on the connection
    assert elapsed >= 8 * 0.15
    assert [p["messages"][0]["seq"] for _, p in sorted(pages.items())] == [a + 1 for a in range(0, 24, 3)]
    assert link.pulls.coalesced >= 19
