"""fastaun's side of group identities held by aund (the daemon makes, stores and publishes them).

Run as `python fastaun_group_identity_aund_driver.py SCENARIO` with env AUN_GW_URL, AUN_ROOT_CA and
AUN_WORKDIR, against a devnet with `--group-identity-check`; imports only fastaun (through the
shared drivers), never aund. Coordination with the test goes through files in AUN_WORKDIR.

  aund_owner:   an aund AID creates a named group; we check its card and certificate with the
                SDK's own verification (a reader without keys), join, exchange E2EE messages, see
                aund's renewal (new certificate and card, the old one revoked) and take over the
                ownership aund transfers to us (with the group key's transfer_auth): our new group
                key is certified and our card names us.
  fastaun_owner: we create a named group with the SDK's facade, admit an aund AID, exchange E2EE
                messages and start a transfer to it (`start_group_transfer`): aund's daemon
                completes it with a group key of its own, and the card it publishes names it.
"""
import asyncio
import json
import sys
from urllib.parse import quote

from fastaun_group_identity_driver import (
    foreign_lookups, http_get, owner_member, projection, reader_checks,
)
from fastaun_groups_aund_driver import wait_file
from fastaun_groups_driver import WORK, check, failed, fails, wait_for


def lifecycle(gid, fp):
    status, headers, _ = http_get(f"/pki/cert/{quote(gid)}?cert_fingerprint={fp}&consistency=authoritative"
                                  "&key_purpose=group_identity")
    return status, headers.get("x-aun-cert-lifecycle-state")


async def texts_from(me, prefix, n, timeout=20):
    await wait_for(lambda: len(me.texts(prefix)) >= n, timeout)
    return me.texts(prefix)


async def aund_owner():
    me = await owner_member("gidfast")
    (WORK / "fast.json").write_text(json.dumps({"aid": me.aid}))
    try:
        info = await wait_file("group.json")
        gid, alice, fp = info["gid"], info["alice"], info["fp"]
        check("aund's group: authoritative certificate is active", lifecycle(gid, fp) == (200, "active_signing"),
              lifecycle(gid, fp))
        await reader_checks(gid, alice, fp, "aund named")
        status, proj = projection(gid)
        check("aund's group: owner projection names aund's AID", proj.get("x-aun-entity-owner-aid") == alice
              and proj.get("x-aun-entity-verification-status") == "current", proj)

        got = await texts_from(me, "from aund", 1, 40)  # aund sends again until we say we got one
        check("we decrypt aund's group message", bool(got), sorted(got))
        (WORK / "fast_got").write_text("1")
        r = await me.client.group.send({"group_id": gid, "payload": {"type": "text", "text": "from fastaun 1"}})
        check("we send E2EE in aund's group", isinstance(r.get("seq"), int), r)
        (WORK / "fast_sent").write_text("1")

        renewed = await wait_file("renewed.json")
        fp2 = renewed["fp"]
        check("renewal: a new certificate", fp2 != fp and lifecycle(gid, fp2) == (200, "active_signing"),
              lifecycle(gid, fp2))
        check("renewal: the old certificate is revoked", lifecycle(gid, fp) == (200, "revoked"), lifecycle(gid, fp))
        await reader_checks(gid, alice, fp2, "aund renewed")
        (WORK / "renewal_checked").write_text("1")

        await wait_file("transferring.json")
        took = await wait_for(lambda: any(e.get("action") == "owner_transfer_rekey_pending" for e in me.changed), 20)
        check("we saw owner_transfer_rekey_pending", took, [e.get("action") for e in me.changed])
        # the SDK completes on its own when it sees the event; only if it did not, through its facade
        if not await wait_for(lambda: me.store.load(gid).ok, 10):
            raised, done = await fails(asyncio.wait_for(me.client.complete_group_transfer(
                {"group_id": gid, "group_aid": gid}, aid_store=me.store), 25))
            check("complete_group_transfer", not raised and bool((done.get("aid_cert") or {}).get("cert")),
                  done if raised else {k: v for k, v in done.items() if k != "aid_cert"})
        ok = await wait_for(lambda: me.store.load(gid).ok, 20)
        mine = me.store.load(gid).data["aid"] if ok else None
        check("our new group key is in our store", mine is not None and mine.is_private_key_valid(), None)
        if mine is not None:
            fp3 = mine.cert_fingerprint
            check("our group certificate is the active one", fp3 not in (fp, fp2)
                  and lifecycle(gid, fp3) == (200, "active_signing"), lifecycle(gid, fp3))
            await wait_for(lambda: projection(gid)[1].get("x-aun-entity-verification-status") == "current"
                           and projection(gid)[1].get("x-aun-entity-cert-fingerprint") == fp3, 20)
            await reader_checks(gid, me.aid, fp3, "we own aund's group")
        (WORK / "owner_done").write_text("1")
        await wait_file("done")
    finally:
        await me.close()


async def fastaun_owner():
    me = await owner_member("gidfown")
    try:
        bob = (await wait_file("aund.json"))["aid"]
        name = f"team-{me.aid.split('.')[0][-6:]}"
        created = await me.client.group.create({"group_name": name, "name": "fastaun's team"}, aid_store=me.store)
        gid = (created.get("group") or {}).get("group_aid", "")
        check("named create by the SDK", gid == f"{name}.aid.test", created.get("group"))
        fp = me.store.load(gid).data["aid"].cert_fingerprint
        r = await me.client.group.add_member({"group_id": gid, "aid": bob})
        check("we admit aund's AID", (r.get("member") or {}).get("aid") == bob, r)
        (WORK / "group.json").write_text(json.dumps({"gid": gid, "owner": me.aid, "fp": fp}))
        # E2EE reaches a device once its group prekey is published: send until aund says it got one
        for k in range(1, 16):
            r = await me.client.group.send({"group_id": gid, "payload": {"type": "text", "text": f"from fastaun {k}"}})
            if await wait_for(lambda: (WORK / "aund_got").exists(), 2):
                break
        check("we send E2EE to aund's AID", isinstance(r.get("seq"), int) and (WORK / "aund_got").exists(), r)
        got = await texts_from(me, "from aund", 1)
        check("we decrypt aund's reply", "from aund 1" in got, sorted(got))

        pending = await me.client.start_group_transfer({"group_id": gid, "new_owner": bob}, aid_store=me.store)
        check("start_group_transfer (transfer_auth by our group key)", pending.get("status") == "pending_rekey", pending)
        moved = await wait_for(lambda: projection(gid)[1].get("x-aun-entity-owner-aid") == bob, 30)
        status, proj = projection(gid)
        check("aund completed: the projection names aund's AID", moved, proj)
        fp_new = proj.get("x-aun-entity-cert-fingerprint", "")
        check("aund's new group certificate replaced ours", fp_new and fp_new != fp
              and lifecycle(gid, fp_new) == (200, "active_signing") and lifecycle(gid, fp)[1] == "revoked",
              (lifecycle(gid, fp_new), lifecycle(gid, fp)))
        await wait_for(lambda: projection(gid)[1].get("x-aun-entity-verification-status") == "current", 20)
        await reader_checks(gid, bob, fp_new, "aund took over")
        (WORK / "owner_done").write_text(json.dumps({"fp": fp_new}))
        await wait_file("done")
    finally:
        await me.close()


async def main(scenario):
    await {"aund_owner": aund_owner, "fastaun_owner": fastaun_owner}[scenario]()
    check("no name outside *.aid.test was looked up", not foreign_lookups, foreign_lookups)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main(sys.argv[1])))
