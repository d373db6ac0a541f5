"""The fastaun side of the gateway-event exchange with an aund-held AID.

Run as `python fastaun_events_driver.py events` with env AUN_GW_URL, AUN_ROOT_CA, AUN_WORKDIR and
PEER_AID (the aund AID). Imports only fastaun, never aund. Coordination through files in
AUN_WORKDIR:

  we write fast.json {aid}                 -> the test subscribes, writes go
  we send an E2EE message and recall it, write recalled.json {message_id}
  test arms the devnet's replay fault, writes armed
  we send a volatile E2EE message (ttl), create a group, invite the peer,
      write sent.json {volatile_id, group_id, invite_id}
  test sends us "please read", writes aund_sent.json {message_id}
  we write plain_seen once it came     -> the test sends a volatile "aund volatile"
  we read it (message.read): our SDK must publish message.read_changed; write read.json
  test writes revoke                       -> we revoke the invite, write revoked
  we create a second group with the peer, send "group oops", write group_sent.json
  test writes group_seen (aund got it)     -> we recall it (group.recall), write group_recalled
  test writes done                         -> we leave
"""
import asyncio
import json
import os
import secrets
import sys

from fastaun_common import AUNClient, WORK, check, ensure, failed, note, open_phase, wait_for


async def wait_file(name: str, timeout: float = 60.0) -> dict:
    path = WORK / name
    await wait_for(path.exists, timeout)
    if not path.exists():
        raise SystemExit(f"timed out waiting for {name}")
    await asyncio.sleep(0.05)
    return json.loads(path.read_text() or "{}")


async def events():
    peer = os.environ["PEER_AID"]
    aid, ident = await ensure("fastev")
    client = AUNClient(ident)
    inbox, read_changed = {}, []
    client.on("message.received", lambda m: inbox.setdefault((m.get("payload") or {}).get("text"), m))
    client.on("message.read_changed", lambda e: read_changed.append(e))
    group_recalls = []
    client.on("group.message_recalled", lambda e: group_recalls.append(e))
    await asyncio.wait_for(client.connect({"auto_reconnect": False}), 30)
    check("connect", client.state.value == "ready", client.state.value)
    (WORK / "fast.json").write_text(json.dumps({"aid": aid}))
    try:
        await wait_file("go")
        mid = "m-" + secrets.token_hex(8)
        r = await client.call("message.send", {"to": peer, "payload": {"type": "text", "text": "to be recalled"},
                                               "encrypt": True, "message_id": mid})
        check("send the message to recall", r.get("status") == "delivered", r)
        r = await client.call("message.recall", {"message_ids": [mid]})
        check("recall answered", r.get("success") is True and r.get("recalled") == 1 and not r.get("errors"), r)
        r = await client.call("message.recall", {"message_ids": [mid]})
        check("a second recall is refused per id", r.get("recalled") == 0
              and (r.get("errors") or [{}])[0].get("error") == "already_recalled", r)
        (WORK / "recalled.json").write_text(json.dumps({"message_id": mid}))

        await wait_file("armed")
        vid = "v-" + secrets.token_hex(8)
        r = await client.call("message.send", {"to": peer, "payload": {"type": "text", "text": "volatile hello"},
                                               "encrypt": True, "ttl": 60, "message_id": vid})
        check("volatile send answered as volatile", r.get("storage") == "volatile" and "seq" not in r
              and bool(r.get("volatile_cursor")) and r.get("expires_at", 0) > r.get("created_at", 0), r)
        created = await client.call("group.create", {"name": "invites aund", "join_mode": "approval"})
        gid = created["group"]["group_id"]
        r = await client.call("group.invite_member", {"group_id": gid, "invitee_aid": peer})
        invite = r.get("invite") or {}
        check("invite the aund AID", r.get("status") == "pending" and invite.get("invite_id"), r)
        (WORK / "sent.json").write_text(json.dumps({"volatile_id": vid, "group_id": gid,
                                                    "invite_id": invite.get("invite_id")}))

        info = await wait_file("aund_sent.json")
        got = await wait_for(lambda: "please read" in inbox, 30)
        check("got aund's message", got, sorted(k for k in inbox if k))
        # the SDK takes a volatile push inline only from a peer it already follows (it would pull
        # otherwise, and this devnet serves no volatile messages on pull): let the peer settle first
        await asyncio.sleep(1.0)
        (WORK / "plain_seen").write_text("1")
        got = await wait_for(lambda: "aund volatile" in inbox, 30)
        check("got aund's message and its volatile one", got, sorted(k for k in inbox if k))
        v = inbox.get("aund volatile") or {}
        check("aund's volatile message came as the SDK expects one", v.get("storage") == "volatile"
              and v.get("encrypted") is True and not v.get("seq") and bool(v.get("volatile_cursor")),
              {k: v.get(k) for k in ("storage", "encrypted", "seq", "volatile_cursor", "expires_at")})
        r = await client.call("message.read", {"states": [{"scope": "p2p", "topic_key": "chat-with-aund",
                                                            "last_read_message_id": info["message_id"]}]})
        check("read answered", r.get("updated") == 1 and (r.get("states") or [{}])[0].get("changed") is True, r)
        got = await wait_for(lambda: read_changed, 15)
        ev = read_changed[0] if read_changed else {}
        check("our SDK accepted the devnet's message.read_changed", got and ev.get("owner_aid") == aid
              and ev.get("topic_key") == "chat-with-aund" and ev.get("last_read_message_id") == info["message_id"]
              and isinstance(ev.get("last_read_order"), int) and ev["last_read_order"] > 0, ev)
        r = await client.call("message.read_state", {"topic_key": "chat-with-aund"})
        check("read_state answers the position", r.get("last_read_message_id") == info["message_id"], r)
        (WORK / "read.json").write_text(json.dumps({"read_changed": len(read_changed)}))

        await wait_file("revoke")
        r = await client.call("group.revoke_invite", {"invite_id": invite.get("invite_id")})
        check("revoke the invite", r.get("status") == "revoked", r)
        (WORK / "revoked").write_text("1")

        # a group with the peer in it: a group message, then its recall
        created = await client.call("group.create", {"name": "recalls", "join_mode": "approval"})
        rgid = created["group"]["group_id"]
        r = await client.call("group.add_member", {"group_id": rgid, "aid": peer})
        check("added the aund AID", (r.get("member") or {}).get("aid") == peer, r)
        r = await client.call("group.send", {"group_id": rgid, "payload": {"type": "text", "text": "group oops"}})
        gmid = r.get("message_id")
        check("group message sent", bool(gmid), r)
        (WORK / "group_sent.json").write_text(json.dumps({"group_id": rgid, "message_id": gmid}))
        await wait_file("group_seen")
        r = await client.call("group.recall", {"group_id": rgid, "message_ids": [gmid]})
        check("group recall answered", r.get("recalled") == [gmid] and not r.get("errors"), r)
        got = await wait_for(lambda: group_recalls, 15)
        check("our SDK took the devnet's group.message_recalled", got and group_recalls[0].get("message_ids") == [gmid]
              and group_recalls[0].get("group_id") == rgid, group_recalls[:1])
        (WORK / "group_recalled").write_text("1")
        note(aid=aid, group_id=gid)
        await wait_file("done", 60)
    finally:
        await client.close()


async def volatile_offline():
    """One phase per process (env PHASE, PEER_AID): `register` connects once (publishing our
    prekey) and leaves; `recv` connects and must get the peer's volatile message, sent while we
    were away, by pull; `again` connects and must not get it again (acked); `send` sends the peer
    a volatile message (while the peer is away) and leaves."""
    peer, phase = os.environ["PEER_AID"], os.environ["PHASE"]
    aid, client, got = await open_phase("voff", phase)
    try:
        if phase == "recv":
            ok = await wait_for(lambda: any((m.get("payload") or {}).get("text") == "while away" for m in got), 20)
            v = next((m for m in got if (m.get("payload") or {}).get("text") == "while away"), {})
            check("the volatile message sent while away came by pull", ok and v.get("storage") == "volatile"
                  and v.get("encrypted") is True and not v.get("seq"), {k: v.get(k) for k in ("storage", "seq")})
            await asyncio.sleep(0.5)  # let the SDK ack it
        elif phase == "again":
            await asyncio.sleep(2.0)
            check("not delivered again once acked", not any((m.get("payload") or {}).get("text") == "while away"
                                                             for m in got), [m.get("message_id") for m in got])
        elif phase == "send":
            r = await client.call("message.send", {"to": peer, "payload": {"type": "text", "text": "to an absent aund"},
                                                   "encrypt": True, "ttl": 120})
            check("volatile sent to the absent peer", r.get("storage") == "volatile", r)
    finally:
        await client.close()


SCENARIOS = {"events": events, "volatile_offline": volatile_offline}

if __name__ == "__main__":
    asyncio.run(SCENARIOS[sys.argv[1]]())
    sys.exit(1 if failed else 0)
