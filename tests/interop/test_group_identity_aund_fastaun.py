"""Group identities held by aund, judged by the official SDK (fastaun 0.5.25 in a subprocess), on a
devnet with production's group identity admission (`--group-identity-check`: group calls of
clients that declare agent.md validation are refused until the group has its certificate and
card, as on the public network).

1. aund owns: an aund AID creates a named group through the daemon; the group key is in aund's
   store (`AIDs/_groups/`, never the app's), fastaun verifies the card and certificate with the
   SDK's own checks, joins and exchanges E2EE messages; aund renews the group key (the old one
   kept in the store, its certificate revoked) and fastaun verifies the new card; aund transfers
   the ownership (signed with the group key) and fastaun's new group key takes over.
2. fastaun owns: the SDK's facade creates a named group and admits an aund AID; E2EE both ways;
   fastaun starts a transfer to the aund AID, whose daemon completes it on the event with a group
   key of its own and publishes the card the SDK then verifies.
Also: an anonymous `group.create` through aund gets its identity bound at once, and a group that
lost its card gets it back from the admission's -32003 without the app noticing.
"""
from __future__ import annotations

import json
import os
import urllib.request

import pytest
import trio

from aund.identity import pki
from tests.conftest import _running_devnet
from tests.interop.test_group_admin_fastaun import _run
from tests.interop.test_groups_aund_fastaun import _file

pytestmark = [pytest.mark.interop, pytest.mark.timeout(150)]
DRIVER = __import__("tests.helpers", fromlist=["ROOT"]).ROOT / "tests" / "interop" / "fastaun_group_identity_aund_driver.py"


@pytest.fixture
def gated_devnet(tmp_path):
    yield from _running_devnet(tmp_path, "--group-identity-check")


async def _appears(path, seconds: float) -> bool:
    with trio.move_on_after(seconds):
        while not path.exists():
            await trio.sleep(0.05)
    return path.exists()


async def _texts(reader, prefix: str, n: int) -> set[str]:
    def got() -> set[str]:
        return {str((e.data.get("payload") or {}).get("text")) for e in reader.events
                if e.kind == "group.message.received" and str((e.data.get("payload") or {}).get("text")).startswith(prefix)}
    await reader.wait_for(lambda: len(got()) >= n, 40)
    return got()


async def test_aund_owned_group_identity_verified_renewed_and_handed_to_fastaun(gated_devnet, tmp_path):
    tag = os.getpid() % 100000
    alice = f"gida-alice-{tag}.aid.test"

    async def body(work, daemon, call, readers) -> None:
        fast = (await _file(work / "fast.json", 30))["aid"]
        groups = daemon.store.groups()
        name = f"team-{tag}"
        created = await call(alice, "group.create", {"group_name": name, "name": "aund's team"})
        gid = created["group"]["group_aid"]
        assert gid == f"{name}.aid.test" and "aid_cert" in created
        held = await trio.to_thread.run_sync(groups.load, gid)
        meta = await trio.to_thread.run_sync(groups.load_meta, gid)
        assert meta["entity"] == "group" and meta["owner_aid"] == alice and meta["agent_md_etag"]
        assert gid not in daemon.store.list()  # never an agent AID of the daemon
        anon = await call(alice, "group.create", {"name": "anonymous, bound at once"})
        assert anon["group_identity"]["bound"] is True and await trio.to_thread.run_sync(
            groups.exists, anon["group_identity"]["group_aid"])

        await call(alice, "group.add_member", {"group_id": gid, "aid": fast})
        (work / "group.json").write_text(json.dumps({"gid": gid, "alice": alice, "fp": held.cert_fingerprint}))
        for k in range(1, 16):  # E2EE reaches fastaun's device once its group prekey is up: send until it has one
            await call(alice, "group.send", {"group_id": gid, "payload": {"type": "text", "text": f"from aund {k}"}})
            if (work / "fast_got").exists() or await _appears(work / "fast_got", 2):
                break
        await _file(work / "fast_sent", 40)
        assert "from fastaun 1" in await _texts(readers[alice], "from fastaun", 1)

        renewed = await call(alice, "group.renew_group_aid", {"group_id": gid})
        new_pem = renewed["aid_cert"]["cert"]
        now = await trio.to_thread.run_sync(groups.load, gid)
        assert now.cert_fingerprint == pki.cert_fingerprint(pki.load_cert_pem(new_pem)) != held.cert_fingerprint
        past = await trio.to_thread.run_sync(groups.past_keys, gid)
        assert [k.private_numbers() for k in past] == [held.private_key.private_numbers()]  # kept, never deleted
        (work / "renewed.json").write_text(json.dumps({"fp": now.cert_fingerprint}))
        await _file(work / "renewal_checked", 40)

        pending = await call(alice, "group.transfer_owner", {"group_id": gid, "new_owner": fast})
        assert pending["status"] == "pending_rekey"
        (work / "transferring.json").write_text("{}")
        try:
            await _file(work / "owner_done", 60)
        except trio.TooSlowError:
            raise AssertionError({p.name: p.read_text()[:300] for p in work.iterdir() if p.is_file()}) from None
        assert await readers[alice].wait_for(
            lambda: any(e.kind == "group.changed" and e.data.get("action") == "owner_transferred"
                        for e in readers[alice].events), 15), [(e.kind, e.data.get("action")) for e in readers[alice].events][-12:]
        assert await trio.to_thread.run_sync(groups.exists, gid)  # the old owner's key stays in its store
        with trio.fail_after(10):  # its meta says who owns the group now: no card of ours is published again
            while (await trio.to_thread.run_sync(groups.load_meta, gid)).get("owner_aid") != fast:
                await trio.sleep(0.05)

    checks = await _run(gated_devnet, tmp_path, "aund_owner", [alice], body, driver=DRIVER)
    names = {c["check"] for c in checks}
    assert {"aund named: card downloaded and verified", "aund renewed: card downloaded and verified",
            "renewal: the old certificate is revoked", "we decrypt aund's group message",
            "our group certificate is the active one", "we own aund's group: card downloaded and verified"} <= names
    stats = gated_devnet.stats()
    assert stats["rpc"]["group.renew_group_aid"] == 1 and stats["rpc"]["group.bind_group_aid"] >= 1


async def test_fastaun_owned_group_handed_to_aund_which_takes_a_group_key(gated_devnet, tmp_path):
    tag = os.getpid() % 100000
    bob = f"gidb-bob-{tag}.aid.test"

    async def body(work, daemon, call, readers) -> None:
        (work / "aund.json").write_text(json.dumps({"aid": bob}))
        info = await _file(work / "group.json", 40)
        gid = info["gid"]
        assert await _texts(readers[bob], "from fastaun", 1)  # one of fastaun's repeated sends
        (work / "aund_got").write_text("1")
        await call(bob, "group.send", {"group_id": gid, "payload": {"type": "text", "text": "from aund 1"}})
        done = await _file(work / "owner_done", 60)
        groups = daemon.store.groups()
        held = await trio.to_thread.run_sync(groups.load, gid)
        meta = await trio.to_thread.run_sync(groups.load_meta, gid)
        assert held.cert_fingerprint == done["fp"] and meta["owner_aid"] == bob
        members = await call(bob, "group.get_members", {"group_id": gid})
        assert {m["aid"]: m["role"] for m in members["members"]}[bob] == "owner"
        # the card lost (as by a name service that forgot it): the admission's -32003 makes aund
        # publish it again and retry, and the app's call just succeeds
        def forget() -> int:
            req = urllib.request.Request(f"{gated_devnet.http_url}/devnet/agent-md?aid={gid}", method="DELETE")
            with urllib.request.urlopen(req, timeout=5) as r:
                return r.status
        refused = lambda stats: sum(n for key, n in stats["rpc_errors"].items() if key.endswith("-32003"))  # noqa: E731
        before = refused(await trio.to_thread.run_sync(gated_devnet.stats))
        assert await trio.to_thread.run_sync(forget) == 200
        sent = await call(bob, "group.send", {"group_id": gid, "payload": {"type": "text", "text": "from aund 2"}})
        assert isinstance(sent.get("seq"), int)
        def card_status() -> int:
            req = urllib.request.Request(f"{gated_devnet.http_url}/agent.md", headers={"Host": gid})
            with urllib.request.urlopen(req, timeout=5) as r:
                return r.status
        assert await trio.to_thread.run_sync(card_status) == 200  # published again by bob's aund
        assert refused(await trio.to_thread.run_sync(gated_devnet.stats)) > before  # the refusal it recovered from

    checks = await _run(gated_devnet, tmp_path, "fastaun_owner", [bob], body, driver=DRIVER)
    names = {c["check"] for c in checks}
    assert {"named create by the SDK", "we decrypt aund's reply", "start_group_transfer (transfer_auth by our group key)",
            "aund completed: the projection names aund's AID", "aund's new group certificate replaced ours",
            "aund took over: card downloaded and verified"} <= names
