"""fastaun's side of group moderation with aund-held AIDs: invite codes, suspend / resume, block.

Run as `python fastaun_group_moderation_driver.py SCENARIO` with env AUN_GW_URL, AUN_ROOT_CA and
AUN_WORKDIR; imports only fastaun (through the shared drivers), never aund. Coordination with the
test goes through files in AUN_WORKDIR. Calls go through the SDK's group facade (`client.group.*`).

  joiner: an aund owner (alice, an app on client_stub) gives us an invite code; we join with it and
          exchange E2EE group messages with alice; alice suspends the group (our send is refused)
          and resumes it; a revoked code is refused.
  owner:  we own the group with an aund member (carol); we make an invite code that an aund AID
          (dave) joins with, and exchange E2EE messages with it; we suspend (carol's send is
          refused, ours still reaches her) and resume; we block carol (she gets nothing we send
          but may send) until she unblocks herself.
"""
import asyncio
import json
import sys

from fastaun_groups_aund_driver import wait_file
from fastaun_groups_driver import WORK, Member, check, failed, fails, note, wait_for


def saw(me: Member, action: str, **fields) -> bool:
    return any(e.get("action") == action and all(e.get(k) == v for k, v in fields.items()) for e in me.changed)


async def send(me: Member, gid: str, text: str):
    return await me.client.group.send({"group_id": gid, "payload": {"type": "text", "text": text}})


async def state_names(me: Member, gid: str, aid: str, timeout: float = 20.0) -> bool:
    """Wait until the signed state names `aid` (the owner proposes it after the join)."""
    for _ in range(int(timeout / 0.25)):
        state = await me.call("group.get_state", {"group_id": gid})
        members = (json.loads(state.get("membership_snapshot") or "{}") or {}).get("members") or []
        if aid in {m.get("aid") for m in members if isinstance(m, dict)}:
            return True
        await asyncio.sleep(0.25)
    return False


async def joiner():
    me = Member("fjoin")
    await me.open()
    (WORK / "fast.json").write_text(json.dumps({"aid": me.aid}))
    try:
        info = await wait_file("code.json")
        gid, code, alice = info["gid"], info["code"], info["alice"]
        r = await me.client.group.use_invite_code({"code": code})
        check("use_invite_code joins", r.get("status") == "joined" and (r.get("member") or {}).get("aid") == me.aid, r)
        check("saw our invite_code_used", await wait_for(lambda: saw(me, "invite_code_used", joined_aid=me.aid), 10),
              [e.get("action") for e in me.changed])
        check("alice's aund signs a state naming us", await state_names(me, gid, me.aid), gid)
        await send(me, gid, "hello from the code joiner")
        (WORK / "joined.json").write_text(json.dumps({"aid": me.aid}))
        got = await wait_for(lambda: "welcome, joiner" in me.texts(), 30)
        check("alice's E2EE message decrypted", got, sorted(me.texts()))

        await wait_file("suspended.json")
        check("saw suspended", await wait_for(lambda: saw(me, "suspended", actor_aid=alice), 10),
              [e.get("action") for e in me.changed])
        raised, err = await fails(send(me, gid, "while suspended"))
        check("our send is refused while suspended", raised and "-33003" in err and "suspended" in err, err)
        raised, err = await fails(me.client.group.create_invite_code({"group_id": gid}))
        check("a member makes no invite code", raised and "-33007" in err, err)
        (WORK / "suspend_checked").write_text("1")
        await wait_file("resumed.json")
        check("saw resumed", await wait_for(lambda: saw(me, "resumed", actor_aid=alice), 10),
              [e.get("action") for e in me.changed])
        await send(me, gid, "after resume")
        revoked = (await wait_file("revoked.json"))["code"]
        raised, err = await fails(me.client.group.use_invite_code({"code": revoked}))
        check("a revoked code is refused", raised and "-33008" in err and "revoked" in err, err)
        (WORK / "fast_done").write_text("1")
        note(group_id=gid, aid=me.aid)
        await wait_file("done", 30)
    finally:
        await me.close()


async def owner():
    me = Member("fmodown")
    await me.open()
    (WORK / "fast.json").write_text(json.dumps({"aid": me.aid}))
    try:
        info = await wait_file("aund.json")
        carol, dave = info["carol"], info["dave"]
        created = await me.call("group.create", {"name": "fastaun moderates", "join_mode": "approval"})
        gid = created["group"]["group_id"]
        r = await me.client.group.add_member({"group_id": gid, "aid": carol})
        check("add carol", (r.get("member") or {}).get("aid") == carol, r)
        r = await me.client.group.create_invite_code({"group_id": gid, "max_uses": 1, "expires_in_seconds": 600})
        code = (r.get("invite_code") or {}).get("code")
        check("create_invite_code", bool(code) and r["invite_code"]["status"] == "active", r)
        (WORK / "group.json").write_text(json.dumps({"gid": gid, "code": code, "fast": me.aid}))

        # --- dave (aund) joins with the code --------------------------------------------------------
        check("saw dave's invite_code_used", await wait_for(lambda: saw(me, "invite_code_used", joined_aid=dave), 30),
              [e.get("action") for e in me.changed])
        codes = await me.client.group.list_invite_codes({"group_id": gid})
        check("the code is used up", [(i["code"], i["status"]) for i in codes.get("items", [])] == [(code, "used_up")],
              codes)
        check("our SDK signs a state naming dave", await state_names(me, gid, dave), gid)
        (WORK / "dave_in.json").write_text("{}")
        await wait_file("dave_ready")
        await send(me, gid, "welcome, dave")
        check("dave's E2EE message decrypted", await wait_for(lambda: "thanks from dave" in me.texts(), 30),
              sorted(me.texts()))

        # --- suspend: carol (member) is refused, we still reach her -----------------------------------
        r = await me.client.group.suspend({"group_id": gid})
        check("suspend", r.get("status") == "suspended", r)
        await send(me, gid, "the owner speaks while suspended")
        (WORK / "suspended.json").write_text("{}")
        await wait_file("suspend_checked")
        r = await me.client.group.resume({"group_id": gid})
        check("resume", r.get("status") == "active", r)
        (WORK / "resumed.json").write_text("{}")
        check("carol speaks after resume", await wait_for(lambda: "carol after resume" in me.texts(), 30),
              sorted(me.texts()))

        # --- block carol: she gets nothing we send until she unblocks herself --------------------------
        r = await me.client.group.block({"group_id": gid, "subject": carol, "reason": "quiet please"})
        check("block carol", (r.get("block") or {}).get("subject") == carol, r)
        blocks = await me.client.group.get_blocklist({"group_id": gid})
        check("get_blocklist names carol", [b["subject"] for b in blocks.get("items", [])] == [carol], blocks)
        await send(me, gid, "while carol is blocked")
        (WORK / "blocked.json").write_text("{}")
        check("blocked carol still speaks", await wait_for(lambda: "carol while blocked" in me.texts(), 30),
              sorted(me.texts()))
        check("saw carol unblock herself", await wait_for(lambda: saw(me, "member_unblocked", aid=carol,
                                                                      actor_aid=carol), 30),
              [e.get("action") for e in me.changed])
        await send(me, gid, "after the unblock")
        (WORK / "unblocked_sent").write_text("1")
        note(group_id=gid, aid=me.aid)
        await wait_file("done", 40)
    finally:
        await me.close()


SCENARIOS = {"joiner": joiner, "owner": owner}

if __name__ == "__main__":
    asyncio.run(SCENARIOS[sys.argv[1]]())
    sys.exit(1 if failed else 0)
