"""Issue 13, group admin both ways: aund-held AIDs and the official SDK administer one group each.

1. aund owns: alice (aund) makes the fastaun member admin (a new signed state names it in the
   admin set), bans bob (aund: his sends are refused, and once removed he cannot rejoin), renames
   the group and changes settings; fastaun publishes a signed announcement (group.index) alice
   reads, alice's aund signs rules into the index on top of it and fastaun verifies that; alice
   transfers the ownership to fastaun, which completes it; fastaun dissolves the
   group and alice's aund refuses sends there with a clear error.
2. fastaun owns: it makes carol (aund) admin; carol renames, sets settings and bans dave (aund);
   fastaun transfers the ownership to carol, whose aund completes it and signs the new state;
   carol dissolves the group.
fastaun runs in a subprocess (tests/interop/fastaun_group_admin_driver.py).
"""
from __future__ import annotations

import json
import os
import sys
from typing import Any

import pytest
import trio

from aund.aun import group_index
from aund.errors import AundError, InvalidParams
from tests.helpers import ROOT
from tests.inproc import APP, ready_handle, start_daemon
from tests.interop.test_groups_aund_fastaun import Reader, _file

pytestmark = [pytest.mark.interop, pytest.mark.timeout(120)]

DRIVER = ROOT / "tests" / "interop" / "fastaun_group_admin_driver.py"


def _actions(reader: Reader) -> list[tuple[str, Any]]:
    return [(e.data.get("action"), e.data.get("aid")) for e in reader.events if e.kind == "group.changed"]


async def _run(devnet, tmp_path, scenario: str, aids: list[str], body, driver=DRIVER) -> list[dict[str, Any]]:
    """Start the daemon holding `aids` and the fastaun `driver`'s `scenario`; run `body`; the driver's checks."""
    work = tmp_path / "sdk"
    work.mkdir()
    result: dict[str, Any] = {}
    with trio.fail_after(110):
        async with trio.open_nursery() as nursery:
            env = dict(os.environ, AUN_GW_URL=devnet.gateway_url, AUN_ROOT_CA=devnet.root_ca, AUN_WORKDIR=str(work))

            async def fastaun() -> None:
                result["proc"] = await trio.run_process([sys.executable, str(driver), scenario], env=env,
                                                        capture_stdout=True, capture_stderr=True, check=False)

            nursery.start_soon(fastaun)
            daemon = await start_daemon(nursery, devnet, tmp_path, aids, sync_poll_seconds=5.0)
            handles = {aid: await ready_handle(daemon, aid) for aid in aids}
            readers = {aid: Reader(daemon, aid) for aid in aids}
            for reader in readers.values():
                nursery.start_soon(reader.run)

            async def call(aid: str, method: str, params: dict[str, Any]) -> dict[str, Any]:
                return await handles[aid].call(method, params, timeout=None, background=False, app=APP)

            await body(work, daemon, call, readers)
            (work / "done").touch()
            with trio.fail_after(30):
                while "proc" not in result:
                    await trio.sleep(0.05)
            await daemon.aclose()
            nursery.cancel_scope.cancel()
    proc = result["proc"]
    checks = [json.loads(x) for x in proc.stdout.decode().splitlines() if x.startswith('{"check"')]
    failed = [c for c in checks if not c["ok"]]
    assert proc.returncode == 0 and checks and not failed, (failed, proc.stderr.decode()[-3000:])
    return checks


async def _refused(call, aid: str, method: str, params: dict[str, Any]) -> AundError:
    with pytest.raises(AundError) as refused:
        await call(aid, method, params)
    return refused.value


async def _admins(call, aid: str, gid: str) -> tuple[list[str], str]:
    state = await call(aid, "group.get_state", {"group_id": gid})
    return json.loads(state["membership_snapshot"])["admin_set"]["admin_aids"], state["state_actor_aid"]


async def test_aund_owner_administers_a_fastaun_member_then_hands_over(devnet, tmp_path):
    tag = os.getpid() % 100000
    alice, bob = f"adm-alice-{tag}.aid.test", f"adm-bob-{tag}.aid.test"

    async def body(work, daemon, call, readers) -> None:
        fast = (await _file(work / "fast.json", 30))["aid"]
        gid = (await call(alice, "group.create", {"name": "aund owns", "join_mode": "approval"}))["group"]["group_id"]
        for aid in (fast, bob):
            await call(alice, "group.add_member", {"group_id": gid, "aid": aid})
        changed = await call(alice, "group.set_role", {"group_id": gid, "aid": fast, "role": "admin"})
        assert (changed["old_role"], changed["new_role"], changed["member"]["role"]) == ("member", "admin", "admin")
        assert await _admins(call, alice, gid) == (sorted([alice, fast]), alice)  # signed inside the call
        with pytest.raises(InvalidParams, match="role must be admin or member"):
            await call(alice, "group.set_role", {"group_id": gid, "aid": fast, "role": "owner"})
        (work / "group.json").write_text(json.dumps({"gid": gid, "alice": alice, "bob": bob}))
        await _file(work / "admin_seen", 30)

        # --- ban bob: a member who may not send; removed, he may not come back ----------------------
        ban = await call(alice, "group.ban", {"group_id": gid, "subject": bob, "reason": "spam"})
        assert ban["ban"]["subject"] == bob and ban["ban"]["banned_by"] == alice
        err = await _refused(call, bob, "group.send", {"group_id": gid, "payload": {"type": "text", "text": "hi"}})
        assert err.data.get("remote_code") == -33007 and "banned" in str(err)
        await call(alice, "group.kick", {"group_id": gid, "aid": bob})
        err = await _refused(call, bob, "group.request_join", {"group_id": gid, "message": "sorry"})
        assert err.data.get("remote_code") == -33009 and "banned" in str(err)

        # --- profile and settings ------------------------------------------------------------------------
        await call(alice, "group.update", {"group_id": gid, "name": "renamed by aund", "description": "admin test"})
        out = await call(alice, "group.set_settings", {"group_id": gid, "settings": {"mention_mode": "mention-only"}})
        assert out["updated_keys"] == ["mention_mode"]
        with pytest.raises(InvalidParams, match="unknown setting"):
            await call(alice, "group.set_settings", {"group_id": gid, "settings": {"colour": "red"}})
        (work / "banned.json").write_text(json.dumps({"bob": bob}))
        await _file(work / "announced", 40)
        got = await call(alice, "group.get_settings", {"group_id": gid, "keys": ["announcement.content"]})
        assert [(s["value"], s["updated_by"]) for s in got["settings"]] == [("hello from fastaun", fast)]
        assert got["_meta"]["group_indexes"][gid]["schema"] == "aun.group.index.v1"
        assert await readers[alice].wait_for(lambda: ("announcement_updated", None) in _actions(readers[alice]), 10)
        # rules through aund: it signs a group.index merged on fastaun's, which fastaun verifies
        out = await call(alice, "group.set_settings", {"group_id": gid, "settings": {"rules.content": "be kind"}})
        assert sorted(out["updated_keys"]) == ["group.index", "rules.content"]
        got = await call(alice, "group.get_settings", {"group_id": gid, "keys": ["group.index"]})
        meta, entries = group_index.parse(got["settings"][0]["value"])
        assert meta["signed_by"] == alice and [e["key"] for e in entries] == ["announcement.content", "rules.content"]
        (work / "rules.json").write_text(json.dumps({"by": alice}))
        await _file(work / "rules_checked", 30)

        # --- hand over: fastaun completes, alice stays admin -----------------------------------------------
        pending = await call(alice, "group.transfer_owner", {"group_id": gid, "new_owner": fast})
        assert pending["status"] == "pending_rekey" and pending["new_owner"] == fast
        await _file(work / "owner_done", 40)
        assert await readers[alice].wait_for(lambda: ("owner_transferred", fast) in _actions(readers[alice]), 10)
        members = await call(alice, "group.get_members", {"group_id": gid})
        assert {m["aid"]: m["role"] for m in members["members"]} == {fast: "owner", alice: "admin"}
        err = await _refused(call, alice, "group.transfer_owner", {"group_id": gid, "new_owner": alice})
        assert err.data.get("remote_code") == -33007

        # --- fastaun dissolves -------------------------------------------------------------------------------
        (work / "dissolve_go").touch()
        await _file(work / "dissolved", 30)
        assert await readers[alice].wait_for(lambda: ("dissolved", None) in _actions(readers[alice]), 10)
        sync = daemon.links[(alice, "main")].groups
        assert gid in sync.session.dissolved and gid in sync._blocked
        err = await _refused(call, alice, "group.send", {"group_id": gid, "payload": {"type": "text", "text": "x"}})
        assert err.data.get("remote_code") == -33002 and "dissolved" in str(err)
        info = await call(alice, "group.get_info", {"group_id": gid})
        assert info["status"] == "dissolved"
        kinds = [a for a, _ in _actions(readers[alice])]
        for action in ("role_changed", "member_banned", "member_removed", "update", "owner_transfer_rekey_pending",
                       "owner_transferred", "dissolved"):
            assert action in kinds, kinds

    checks = await _run(devnet, tmp_path, "member", [alice, bob], body)
    assert len(checks) >= 16


async def test_fastaun_owner_administers_an_aund_admin_who_takes_over(devnet, tmp_path):
    tag = os.getpid() % 100000
    carol, dave = f"adm-carol-{tag}.aid.test", f"adm-dave-{tag}.aid.test"

    async def body(work, daemon, call, readers) -> None:
        fast = (await _file(work / "fast.json", 30))["aid"]
        (work / "aund.json").write_text(json.dumps({"carol": carol, "dave": dave}))
        gid = (await _file(work / "group.json", 40))["gid"]
        assert await readers[carol].wait_for(lambda: ("role_changed", carol) in _actions(readers[carol]), 15)
        members = await call(carol, "group.get_members", {"group_id": gid})
        assert {m["aid"]: m["role"] for m in members["members"]} == {fast: "owner", carol: "admin", dave: "member"}

        # --- carol administers as admin ---------------------------------------------------------------------
        await call(carol, "group.update", {"group_id": gid, "description": "carol was here"})
        await call(carol, "group.set_settings", {"group_id": gid, "settings": {"mention_mode": "mention-only"}})
        await call(carol, "group.ban", {"group_id": gid, "aid": dave})
        err = await _refused(call, dave, "group.send", {"group_id": gid, "payload": {"type": "text", "text": "hi"}})
        assert err.data.get("remote_code") == -33007
        bans = await call(carol, "group.get_banlist", {"group_id": gid})
        assert [b["subject"] for b in bans["items"]] == [dave]
        err = await _refused(call, carol, "group.set_role", {"group_id": gid, "aid": dave, "role": "admin"})
        assert err.data.get("remote_code") == -33007  # only the owner sets roles
        err = await _refused(call, carol, "group.dissolve", {"group_id": gid})
        assert err.data.get("remote_code") == -33007
        (work / "admin_done").touch()

        # --- fastaun hands over; carol's aund completes and signs the new admin set ---------------------------
        await _file(work / "transferred", 40)
        members = await call(carol, "group.get_members", {"group_id": gid})
        assert {m["aid"]: m["role"] for m in members["members"]}[carol] == "owner"
        with trio.fail_after(15):
            while (await _admins(call, carol, gid))[0] != sorted([carol, fast]):
                await trio.sleep(0.2)
        again = await call(carol, "group.complete_transfer", {"group_id": gid})  # idempotent
        assert again["status"] == "transferred" and again["new_owner"] == carol

        # --- carol dissolves ---------------------------------------------------------------------------------
        out = await call(carol, "group.dissolve", {"group_id": gid})
        assert out["status"] == "dissolved"
        await _file(work / "fast_done", 30)
        for aid in (carol, dave):
            assert await readers[aid].wait_for(lambda a=aid: ("dissolved", None) in _actions(readers[a]), 10)
        err = await _refused(call, carol, "group.send", {"group_id": gid, "payload": {"type": "text", "text": "x"}})
        assert err.data.get("remote_code") == -33002 and "dissolved" in str(err)

    checks = await _run(devnet, tmp_path, "owner", [carol, dave], body)
    assert len(checks) >= 12
