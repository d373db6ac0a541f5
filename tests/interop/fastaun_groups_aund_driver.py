"""The fastaun member of a group whose other members are aund-held AIDs.

Run as `python fastaun_groups_aund_driver.py aund_member` with env AUN_GW_URL, AUN_ROOT_CA,
AUN_WORKDIR and N. Reuses the helpers of the shared fastaun_groups_driver.py (imported, never
edited) and imports only fastaun, never aund. Coordination with the test goes through files in
AUN_WORKDIR:

  we write fast.json {aid}            -> the test creates the group, adds us and another aund member
  test writes group.json {gid, aund}  -> we wait to see our own admission, write ready
  test writes go                      -> we send N E2EE messages "fast i", then wait for the aund
                                         members' N each, re-read them by group.pull and by
                                         group.history; write phase1.json {sent, received}
  test writes phase2.json {removed}   -> (a member was removed) we send 3 "fast-after i", expect
                                         "{name}-after i" from the remaining aund member(s);
                                         write phase2_done.json
"""
import asyncio
import json
import os
import sys

from fastaun_groups_driver import WORK, Member, check, failed, fails, note, wait_for  # noqa: E402


async def wait_file(name: str, timeout: float = 60.0) -> dict:
    path = WORK / name
    await wait_for(path.exists, timeout)
    if not path.exists():
        raise SystemExit(f"timed out waiting for {name}")
    await asyncio.sleep(0.05)  # written with one write_text: let it land
    return json.loads(path.read_text() or "{}")


async def aund_member():
    n = int(os.environ.get("N", "20"))
    me = Member("fast")
    await me.open()
    (WORK / "fast.json").write_text(json.dumps({"aid": me.aid}))
    try:
        info = await wait_file("group.json")
        gid, aund = info["gid"], info["aund"]  # aund: {name: aid}
        got = await wait_for(lambda: any(e.get("action") == "member_added" and e.get("joined_aid") == me.aid
                                         for e in me.changed), 20)
        check("saw our own admission", got, [e.get("action") for e in me.changed])
        r = await me.call("group.get_members", {"group_id": gid})
        roles = {x["aid"]: x["role"] for x in r.get("members", [])}
        check("members as aund set them up", roles.get(me.aid) == "member" and set(aund.values()) <= set(roles), roles)
        (WORK / "ready").write_text("1")

        await wait_file("go")
        sent: dict[str, int] = {}
        for i in range(n):
            text = f"fast {i}"
            r = await me.call("group.send", {"group_id": gid, "payload": {"type": "text", "text": text},
                                             "protected_headers": {"trace": f"fast-{i}"}})
            sent[text] = r.get("seq")
        seqs = list(sent.values())
        check("our sends got increasing seqs", None not in seqs and seqs == sorted(seqs), seqs[:5])
        others = {f"{name} {i}" for name in aund for i in range(n)}
        got = await wait_for(lambda: others <= me.texts(), 45)
        check(f"received the {len(others)} messages of the aund members", got, sorted(others - me.texts())[:5])
        msgs = [x for x in me.messages.values() if me.text_of(x) in others]
        check("aund messages decrypted, group-bound", all(
            x.get("encrypted") is True and x.get("group_id") == gid and isinstance(x.get("seq"), int) for x in msgs),
            [(me.text_of(x), x.get("encrypted"), x.get("group_id")) for x in msgs[:3]])
        for name, aid in aund.items():
            mine = sorted((x for x in msgs if x.get("sender_aid", x.get("from")) == aid or
                           str(me.text_of(x)).startswith(name + " ")), key=lambda x: x["seq"])
            texts = [me.text_of(x) for x in mine]
            check(f"{name}'s messages in its send order", texts == [f"{name} {i}" for i in range(n)], texts[:5])
        check("nothing undecryptable", not me.undecryptable, me.undecryptable[:2])
        r = await me.call("group.pull", {"group_id": gid, "after_seq": 0, "limit": 200})
        pulled = [me.text_of(x) for x in r.get("messages", [])]
        by_seq = [me.text_of(x) for x in sorted(msgs, key=lambda x: x["seq"])]
        check("a pull re-reads the aund messages in seq order", pulled == by_seq, pulled[:5])
        history, before = [], 10**9
        for _ in range(10):  # group.history pages (at most 50 each), newest first
            page = await me.call("group.history", {"group_id": gid, "before_seq": before, "limit": 50})
            history = list(page.get("messages") or []) + history
            if not page.get("has_older"):
                break
            before = page["next_before_seq"]
        from_aund = [x for x in history if me.text_of(x) in others]
        check("group.history reads the aund messages decrypted, in seq order",
              [me.text_of(x) for x in from_aund] == by_seq and all(x.get("encrypted") is True for x in from_aund),
              [me.text_of(x) for x in history][:5])
        (WORK / "phase1.json").write_text(json.dumps({
            "sent": sent, "received": {me.text_of(x): x["seq"] for x in msgs}}))

        phase2 = await wait_file("phase2.json")
        removed = phase2["removed"]
        got = await wait_for(lambda: any(
            e.get("action") == "member_removed" and removed in (e.get("member_aid"), e.get("aid"), e.get("removed_aid"))
            for e in me.changed), 15)
        check("saw the removal", got, [e.get("action") for e in me.changed][-3:])
        after = {}
        for i in range(3):
            text = f"fast-after {i}"
            raised, r = await fails(me.call("group.send", {"group_id": gid, "payload": {"type": "text", "text": text}}))
            check(f"send {text} after the removal", not raised, r)
            after[text] = None if raised else r.get("seq")
        want = {f"{name}-after {i}" for name in phase2["remaining"] for i in range(3)}
        got = await wait_for(lambda: want <= me.texts(), 30)
        check("received the remaining members' messages after the removal", got, sorted(want - me.texts()))
        (WORK / "phase2_done.json").write_text(json.dumps({"sent": after}))
        note(group_id=gid, aid=me.aid, sources=me.sources)
        await wait_file("done", 30)
    finally:
        await me.close()


SCENARIOS = {"aund_member": aund_member}

if __name__ == "__main__":
    asyncio.run(SCENARIOS[sys.argv[1]]())
    sys.exit(1 if failed else 0)
