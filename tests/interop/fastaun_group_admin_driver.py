"""fastaun's side of group administration with aund-held AIDs (issue 13: group admin both ways).

Run as `python fastaun_group_admin_driver.py SCENARIO` with env AUN_GW_URL, AUN_ROOT_CA and
AUN_WORKDIR; imports only fastaun (through the shared drivers), never aund. Coordination with the
test goes through files in AUN_WORKDIR (see each scenario). Every call goes through the SDK's own
group facade (`client.group.*`) where it has one.

  member: an aund owner (alice) makes us admin, bans its other member, changes the profile and
          settings; we publish a signed announcement (group.index), take over the ownership the
          owner transfers to us, and dissolve the group.
  owner:  we own the group and make an aund member (carol) admin; carol bans the other aund
          member, changes the profile and settings; we transfer the ownership to carol, who
          completes it and dissolves the group.
"""
import asyncio
import json
import sys

from fastaun_groups_aund_driver import wait_file
from fastaun_groups_driver import WORK, Member, check, failed, fails, note, wait_for


def saw(me: Member, action: str, **fields) -> bool:
    return any(e.get("action") == action and all(e.get(k) == v for k, v in fields.items()) for e in me.changed)


async def roles_of(me: Member, gid: str) -> dict:
    r = await me.client.group.get_members({"group_id": gid})
    return {x["aid"]: x["role"] for x in r.get("members", [])}


async def admin_set(me: Member, gid: str) -> list:
    state = await me.call("group.get_state", {"group_id": gid})
    return (json.loads(state.get("membership_snapshot") or "{}").get("admin_set") or {}).get("admin_aids", [])


async def member():
    me = Member("fadm")
    await me.open()
    (WORK / "fast.json").write_text(json.dumps({"aid": me.aid}))
    try:
        info = await wait_file("group.json")
        gid, alice, bob = info["gid"], info["alice"], info["bob"]
        got = await wait_for(lambda: saw(me, "role_changed", aid=me.aid, new_role="admin"), 20)
        check("saw role_changed to admin", got, [e.get("action") for e in me.changed])
        check("get_members shows us admin", (await roles_of(me, gid)).get(me.aid) == "admin", await roles_of(me, gid))
        (WORK / "admin_seen").write_text("1")

        await wait_file("banned.json")
        check("saw member_banned", await wait_for(lambda: saw(me, "member_banned", aid=bob), 10),
              [e.get("action") for e in me.changed])
        bans = await me.client.group.get_banlist({"group_id": gid})
        check("get_banlist (as admin) names bob", [b["subject"] for b in bans.get("items", [])] == [bob], bans)
        r = await me.client.group.get_info({"group_id": gid})
        check("group.update by aund seen", r.get("name") == "renamed by aund" and r.get("description") == "admin test",
              r)
        s = await me.client.group.get_settings({"group_id": gid, "keys": ["mention_mode", "join.mode"]})
        values = {x["key"]: x["value"] for x in s.get("settings", [])}
        check("set_settings by aund seen", values == {"mention_mode": "mention-only", "join.mode": "approval"}, values)
        ann = await me.client.group.update_announcement({"group_id": gid, "content": "hello from fastaun"})
        check("update_announcement (signed group.index)", ann["announcement"]["content"] == "hello from fastaun", ann)
        index = await me.client.group.get_group_index({"group_id": gid})
        check("group.index verified by the SDK", index["meta"].get("signed_by") == me.aid
              and index["settings"].get("announcement.content") == "hello from fastaun",
              {"meta": index.get("meta"), "settings": index.get("settings")})
        (WORK / "announced").write_text("1")

        await wait_file("rules.json")  # alice's aund wrote rules: its own group.index, on top of ours
        index = await me.client.group.get_group_index({"group_id": gid})
        check("aund's group.index verified by the SDK", index["meta"].get("signed_by") == alice
              and index["settings"].get("rules.content") == "be kind"
              and index["settings"].get("announcement.content") == "hello from fastaun",
              {"meta": index.get("meta"), "settings": index.get("settings")})
        (WORK / "rules_checked").write_text("1")

        got = await wait_for(lambda: saw(me, "owner_transfer_rekey_pending", new_owner=me.aid), 20)
        check("saw owner_transfer_rekey_pending", got, [e.get("action") for e in me.changed])
        # the SDK tries to complete on its own (and fails after the call, wanting a group certificate);
        # the facade's plain call completes, or returns the completed transfer again
        done = await me.client.group.complete_transfer({"group_id": gid})
        check("complete_transfer", done.get("status") == "transferred" and done.get("new_owner") == me.aid, done)
        roles = await roles_of(me, gid)
        check("we own the group, alice is admin", roles.get(me.aid) == "owner" and roles.get(alice) == "admin", roles)
        got = await wait_for(lambda: saw(me, "owner_transferred", new_owner=me.aid), 10)
        check("saw owner_transferred", got, [e.get("action") for e in me.changed])
        want = sorted([me.aid, alice])
        ok = False
        for _ in range(60):
            if await admin_set(me, gid) == want:
                ok = True
                break
            await asyncio.sleep(0.25)
        check("the signed state names both admins", ok, await admin_set(me, gid))
        (WORK / "owner_done").write_text("1")

        await wait_file("dissolve_go")
        r = await me.client.group.dissolve({"group_id": gid})
        check("dissolve", r.get("status") == "dissolved", r)
        raised, err = await fails(me.call("group.send", {"group_id": gid, "payload": {"type": "text", "text": "x"}}))
        check("a send to the dissolved group fails", raised, err)
        (WORK / "dissolved").write_text("1")
        note(group_id=gid, aid=me.aid)
        await wait_file("done", 30)
    finally:
        await me.close()


async def owner():
    me = Member("fown")
    await me.open()
    (WORK / "fast.json").write_text(json.dumps({"aid": me.aid}))
    try:
        info = await wait_file("aund.json")
        carol, dave = info["carol"], info["dave"]
        created = await me.call("group.create", {"name": "fastaun owns", "join_mode": "approval"})
        gid = created["group"]["group_id"]
        for aid in (carol, dave):
            r = await me.client.group.add_member({"group_id": gid, "aid": aid})
            check(f"add {aid}", (r.get("member") or {}).get("aid") == aid, r)
        r = await me.client.group.set_role({"group_id": gid, "aid": carol, "role": "admin"})
        check("set_role carol admin", r.get("old_role") == "member" and r.get("new_role") == "admin", r)
        (WORK / "group.json").write_text(json.dumps({"gid": gid, "fast": me.aid}))

        await wait_file("admin_done")
        r = await me.client.group.get_info({"group_id": gid})
        check("carol's group.update seen", r.get("description") == "carol was here", r)
        s = await me.client.group.get_settings({"group_id": gid, "keys": ["mention_mode"]})
        check("carol's set_settings seen", [x["value"] for x in s.get("settings", [])] == ["mention-only"], s)
        bans = await me.client.group.get_banlist({"group_id": gid})
        check("carol's ban of dave listed", [(b["subject"], b["banned_by"]) for b in bans.get("items", [])]
              == [(dave, carol)], bans)
        check("saw member_banned by carol", saw(me, "member_banned", aid=dave, actor_aid=carol),
              [e.get("action") for e in me.changed])
        r = await me.client.group.transfer_owner({"group_id": gid, "new_owner": carol})
        check("transfer_owner to carol: pending", r.get("status") == "pending_rekey" and r.get("new_owner") == carol, r)
        got = await wait_for(lambda: saw(me, "owner_transferred", new_owner=carol, old_owner=me.aid), 20)
        check("carol completed the transfer", got, [e.get("action") for e in me.changed])
        roles = await roles_of(me, gid)
        check("carol owns, we are admin", roles.get(carol) == "owner" and roles.get(me.aid) == "admin", roles)
        raised, err = await fails(me.client.group.dissolve({"group_id": gid}))
        check("we may no longer dissolve", raised and ("-33007" in err or "role" in err.lower()), err)
        (WORK / "transferred").write_text("1")

        got = await wait_for(lambda: saw(me, "dissolved", actor_aid=carol), 20)
        check("saw carol dissolve the group", got, [e.get("action") for e in me.changed])
        raised, err = await fails(me.call("group.send", {"group_id": gid, "payload": {"type": "text", "text": "x"}}))
        check("a send to the dissolved group fails", raised, err)
        (WORK / "fast_done").write_text("1")
        note(group_id=gid, aid=me.aid)
        await wait_file("done", 30)
    finally:
        await me.close()


SCENARIOS = {"member": member, "owner": owner}

if __name__ == "__main__":
    asyncio.run(SCENARIOS[sys.argv[1]]())
    sys.exit(1 if failed else 0)
