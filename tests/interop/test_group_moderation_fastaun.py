"""Group moderation both ways between aund-held AIDs and the official SDK (fastaun in a subprocess,
tests/interop/fastaun_group_moderation_driver.py) on the devnet.

1. An app on client_stub, through a real `aund run`, owns a group: it makes an invite code, a
   fastaun client joins with it (aund signs the state naming it) and they exchange E2EE group
   messages; the app suspends the group (fastaun's send is refused with -33003, it sees the events)
   and resumes it; a revoked code is refused to fastaun.
2. fastaun owns a group with an aund member (carol): an aund AID (dave) joins with fastaun's invite
   code and they exchange E2EE messages; fastaun suspends (carol's send is refused, the owner's
   message still reaches her) and resumes; fastaun blocks carol: her app sees the event, gets
   nothing sent meanwhile but may send, and once she unblocks herself through aund she receives
   again.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from typing import Any

import pytest

from client_stub import Client, GatewayError
from tests.helpers import ROOT, AundProcess
from tests.interop.test_group_admin_fastaun import _actions, _refused, _run
from tests.interop.test_groups_aund_fastaun import _file

pytestmark = [pytest.mark.interop, pytest.mark.timeout(180)]

DRIVER = ROOT / "tests" / "interop" / "fastaun_group_moderation_driver.py"
KINDS = ("group.message.received", "group.changed")


class Seen:
    """What an app's client_stub subscription delivered (acked as read)."""

    def __init__(self, stream) -> None:
        self.stream, self.events = stream, []

    def until(self, predicate, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while not predicate() and time.monotonic() < deadline:
            event = self.stream.get(timeout=max(0.05, deadline - time.monotonic()))
            if event is not None:
                self.events.append((event.kind, event.data))
                event.ack()
        return predicate()

    def texts(self) -> list[str]:
        return [d["payload"].get("text") for k, d in self.events if k == "group.message.received"]

    def actions(self) -> list[str]:
        return [d.get("action") for k, d in self.events if k == "group.changed"]


def _wait_file(path, proc, seconds: float = 60.0) -> dict[str, Any]:
    deadline = time.monotonic() + seconds
    while not path.exists():
        if proc.poll() is not None:
            out, err = proc.communicate()
            pytest.fail(f"the fastaun driver ended before {path.name}: {out[-3000:]}\n{err[-3000:]}")
        assert time.monotonic() < deadline, f"{path.name} did not appear within {seconds}s"
        time.sleep(0.05)
    time.sleep(0.05)
    return json.loads(path.read_text() or "{}")


def _checks(proc) -> list[dict[str, Any]]:
    out, err = proc.communicate(timeout=60)
    checks = [json.loads(x) for x in out.splitlines() if x.startswith('{"check"')]
    failed = [c for c in checks if not c["ok"]]
    assert proc.returncode == 0 and checks and not failed, (failed, err[-3000:])
    return checks


def test_aund_app_owner_admits_fastaun_by_invite_code_and_suspends(devnet, tmp_path):
    alice = f"mod-alice-{os.getpid() % 100000}.aid.test"
    cfg = tmp_path / "aund.toml"
    cfg.write_text(f'gateway_url = ["{devnet.gateway_url}"]\nroot_ca = ["{devnet.root_ca}"]\n'
                   f'identities = ["{alice}"]\n')
    daemon = AundProcess(tmp_path / "state", tmp_path / "aund.sock", cfg)
    daemon.start()
    work = tmp_path / "sdk"
    work.mkdir()
    env = dict(os.environ, AUN_GW_URL=devnet.gateway_url, AUN_ROOT_CA=devnet.root_ca, AUN_WORKDIR=str(work))
    fa = subprocess.Popen([sys.executable, str(DRIVER), "joiner"], env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)
    try:
        with Client(daemon.socket, app="moderation-test", timeout=30) as client:
            client.ensure_identity(alice)
            session = client.session(alice)
            session.wait_ready(timeout=60)
            seen = Seen(session.events("test", KINDS).open())
            gid = session.call("group.create", {"name": "by code"})["group"]["group_id"]
            made = session.call("group.create_invite_code", {"group_id": gid, "max_uses": 3})["invite_code"]
            assert (made["max_uses"], made["used_count"], made["status"]) == (3, 0, "active")
            fast = _wait_file(work / "fast.json", fa)["aid"]
            (work / "code.json").write_text(json.dumps({"gid": gid, "code": made["code"], "alice": alice}))

            # fastaun joins with the code; aund signs a state naming it (the invite_code_used event)
            assert seen.until(lambda: "invite_code_used" in seen.actions(), 30), seen.actions()
            _wait_file(work / "joined.json", fa)
            assert seen.until(lambda: "hello from the code joiner" in seen.texts(), 30), seen.texts()
            session.call("group.send", {"group_id": gid, "payload": {"type": "text", "text": "welcome, joiner"}})
            listed = session.call("group.list_invite_codes", {"group_id": gid})["items"]
            assert [(i["code"], i["used_count"]) for i in listed] == [(made["code"], 1)]
            members = session.call("group.get_members", {"group_id": gid})["members"]
            assert {m["aid"]: m["role"] for m in members} == {alice: "owner", fast: "member"}

            # suspend: fastaun is refused; the app still speaks; resume
            assert session.call("group.suspend", {"group_id": gid})["status"] == "suspended"
            (work / "suspended.json").write_text("{}")
            _wait_file(work / "suspend_checked", fa)
            session.call("group.send", {"group_id": gid, "payload": {"type": "text", "text": "owner while suspended"}})
            assert session.call("group.resume", {"group_id": gid})["status"] == "active"
            (work / "resumed.json").write_text("{}")
            assert seen.until(lambda: "after resume" in seen.texts(), 30), seen.texts()

            # a revoked code admits nobody
            other = session.call("group.create_invite_code", {"group_id": gid})["invite_code"]["code"]
            assert session.call("group.revoke_invite_code", {"group_id": gid, "code": other})["status"] == "revoked"
            with pytest.raises(GatewayError) as refused:
                session.call("group.use_invite_code", {"code": other})
            assert refused.value.remote_code == -33008
            (work / "revoked.json").write_text(json.dumps({"code": other}))
            _wait_file(work / "fast_done", fa)
            assert seen.until(lambda: {"suspended", "resumed", "invite_code_revoked"} <= set(seen.actions()), 10)
            (work / "done").touch()
        checks = _checks(fa)
        assert len(checks) >= 10
    finally:
        if fa.poll() is None:
            fa.kill()
            fa.communicate()
        assert daemon.stop() == 0


async def test_fastaun_owner_moderates_aund_members(devnet, tmp_path):
    tag = os.getpid() % 100000
    carol, dave = f"mod-carol-{tag}.aid.test", f"mod-dave-{tag}.aid.test"

    async def body(work, daemon, call, readers) -> None:
        def texts(aid: str) -> list[str]:
            return readers[aid].texts()

        (work / "aund.json").write_text(json.dumps({"carol": carol, "dave": dave}))
        info = await _file(work / "group.json", 40)
        gid, code = info["gid"], info["code"]

        # --- dave joins with fastaun's code and they exchange E2EE messages ------------------------------
        joined = await call(dave, "group.use_invite_code", {"code": code})
        assert joined["status"] == "joined" and joined["invite_code"]["status"] == "used_up"
        err = await _refused(call, dave, "group.use_invite_code", {"code": code})
        assert err.data.get("remote_code") == -33008
        await _file(work / "dave_in.json", 30)
        (work / "dave_ready").touch()
        assert await readers[dave].wait_for(lambda: "welcome, dave" in texts(dave), 30), texts(dave)
        await call(dave, "group.send", {"group_id": gid, "payload": {"type": "text", "text": "thanks from dave"}})
        assert ("invite_code_used", dave) in _actions(readers[dave])

        # --- suspended: carol's send is refused, the owner's reaches her --------------------------------
        await _file(work / "suspended.json", 40)
        assert await readers[carol].wait_for(lambda: ("suspended", None) in _actions(readers[carol]), 15)
        err = await _refused(call, carol, "group.send", {"group_id": gid, "payload": {"type": "text", "text": "no"}})
        assert err.data.get("remote_code") == -33003 and "suspended" in str(err)
        assert await readers[carol].wait_for(lambda: "the owner speaks while suspended" in texts(carol), 30)
        (work / "suspend_checked").touch()
        await _file(work / "resumed.json", 30)
        assert await readers[carol].wait_for(lambda: ("resumed", None) in _actions(readers[carol]), 15)
        await call(carol, "group.send", {"group_id": gid, "payload": {"type": "text", "text": "carol after resume"}})

        # --- blocked: nothing for carol, but she may speak; she unblocks herself ---------------------------
        await _file(work / "blocked.json", 40)
        assert await readers[carol].wait_for(lambda: ("member_blocked", carol) in _actions(readers[carol]), 15)
        sync = daemon.links[(carol, "main")].groups
        assert gid in sync._blocked  # aund stopped pulling what it may not read
        await call(carol, "group.send", {"group_id": gid, "payload": {"type": "text", "text": "carol while blocked"}})
        err = await _refused(call, carol, "group.history", {"group_id": gid, "before_seq": 1000})
        assert "blocked" in str(err)
        out = await call(carol, "group.unblock", {"group_id": gid, "subject": carol})
        assert out["status"] == "removed" and gid not in sync._blocked
        await _file(work / "unblocked_sent", 30)
        assert await readers[carol].wait_for(lambda: "after the unblock" in texts(carol), 30), texts(carol)
        assert "while carol is blocked" not in texts(carol)
        assert ("member_unblocked", carol) in _actions(readers[carol])

    checks = await _run(devnet, tmp_path, "owner", [carol, dave], body, driver=DRIVER)
    assert len(checks) >= 14
