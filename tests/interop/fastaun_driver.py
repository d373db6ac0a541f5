"""Drive the official SDK (fastaun 0.5.25, asyncio) against a gateway, in its own process.

Run as `python fastaun_driver.py SCENARIO` with env AUN_GW_URL, AUN_ROOT_CA, AUN_WORKDIR.
Prints one JSON line per check ({"check", "ok", "detail"}) and exits 1 if any check failed.
This file imports only fastaun, never aund: it is the independent peer.
"""
import asyncio
import json
import os
import secrets
import sys

from fastaun_common import AUNClient, WORK, check, ensure, failed, note, open_phase, wait_for

async def open_client(name, aid=None, **opts):
    aid, ident = await ensure(name, aid)
    client = AUNClient(ident)
    inbox = {}
    client.on("message.received", lambda m: inbox.setdefault((m.get("payload") or {}).get("text"), m))
    await asyncio.wait_for(client.connect({"auto_reconnect": False, **opts}), 30)
    check(f"connect {name}", client.state.value == "ready", client.state.value)
    return aid, client, inbox




async def both_ways():
    """Two fastaun clients: plain and E2EE both ways, received by push and by pull."""
    (alice, A, a_in), (bob, B, b_in) = await open_client("alice"), await open_client("bob")
    await asyncio.sleep(1.0)  # let the post-connect gap fill settle, or it pulls what follows
    try:
        for sender, receiver, inbox, peer in ((A, bob, b_in, "bob"), (B, alice, a_in, "alice")):
            for text, enc in ((f"plain to {peer}", False), (f"e2ee to {peer}", True)):
                r = await sender.call("message.send", {"to": receiver, "payload": {"type": "text", "text": text},
                                                       "encrypt": enc})
                check(f"send {text}", r.get("status") in ("sent", "delivered", "accepted"), r)
            for text, enc in ((f"plain to {peer}", False), (f"e2ee to {peer}", True)):
                got = await wait_for(lambda: text in inbox)
                check(f"push {text}", got and bool(inbox[text].get("encrypted")) == enc,
                      inbox.get(text, {}).get("encrypted"))
        r = await B.call("message.pull", {"sender_aid": alice, "after_seq": 0, "limit": 50})
        rows = {(m.get("payload") or {}).get("text"): m for m in r.get("messages", [])}
        for text, enc in (("plain to bob", False), ("e2ee to bob", True)):
            check(f"pull {text}", text in rows and bool(rows[text].get("encrypted")) == enc)
        dup_id = "m-" + secrets.token_hex(8)
        first = await A.call("message.send", {"to": bob, "payload": {"type": "text", "text": "dup"},
                                              "encrypt": False, "message_id": dup_id})
        second = await A.call("message.send", {"to": bob, "payload": {"type": "text", "text": "dup"},
                                               "encrypt": False, "message_id": dup_id})
        check("duplicate message_id", second.get("status") == "duplicate" and second.get("seq") == first.get("seq"),
              [first, second])
        note(alice=alice, bob=bob)
    finally:
        for c in (A, B):
            await c.close()


async def offline_phase1():
    """Register and connect both once, then bob leaves; alice sends N E2EE messages while bob is away."""
    n = int(os.environ.get("N", "5"))
    (alice, A, _), (bob, B, _) = await open_client("alice"), await open_client("bob")
    await B.close()
    await asyncio.sleep(0.5)
    try:
        for i in range(n):
            r = await A.call("message.send", {"to": bob, "payload": {"type": "text", "text": f"offline {i}"},
                                              "encrypt": True})
            check(f"send offline {i}", r.get("status") == "delivered", r)
    finally:
        await A.close()
    (WORK / "ids.json").write_text(json.dumps({"alice": alice, "bob": bob}))


async def offline_phase2():
    """After a gateway restart: both reconnect (stored identities, cached tokens); bob gets all, in order."""
    n = int(os.environ.get("N", "5"))
    ids = json.loads((WORK / "ids.json").read_text())
    order = []
    (_, A, _) = await open_client("alice", ids["alice"])
    aid, ident = await ensure("bob", ids["bob"])
    B = AUNClient(ident)
    B.on("message.received", lambda m: order.append((m.get("payload") or {}).get("text")))
    await asyncio.wait_for(B.connect({"auto_reconnect": False}), 30)
    check("reconnect bob", B.state.value == "ready")
    try:
        await wait_for(lambda: len(order) >= n, 20)
        check("offline messages in order, once", order == [f"offline {i}" for i in range(n)], order)
        r = await A.call("message.send", {"to": ids["bob"], "payload": {"type": "text", "text": "after restart"},
                                          "encrypt": True})
        check("send after restart", r.get("status") == "delivered", r)
        await wait_for(lambda: "after restart" in order)
        check("push after restart", "after restart" in order, order)
    finally:
        await A.close()
        await B.close()


async def slot_kick():
    """A second long connection on the same (aid, device, slot) replaces the first, which must not reconnect."""
    aid, ident = await ensure("carol")
    first = AUNClient(ident)
    events = []
    first.on("gateway.disconnect", lambda e: events.append(("disconnect", e)))
    first.on("state_change", lambda e: events.append(("state", e)))
    await asyncio.wait_for(first.connect({"auto_reconnect": True}), 30)
    check("first long ready", first.state.value == "ready")
    _, ident2 = await ensure("carol", aid)
    second = AUNClient(ident2)
    await asyncio.wait_for(second.connect({"auto_reconnect": True}), 30)
    check("second long ready", second.state.value == "ready")
    await wait_for(lambda: first.state.value in ("connection_failed", "closed", "standby"), 10)
    codes = [e.get("code") for kind, e in events if kind == "disconnect"]
    check("first got gateway.disconnect 4015", 4015 in codes, events)
    check("first stopped (no reconnect)", first.state.value == "connection_failed", first.state.value)
    await asyncio.sleep(2.5)  # the SDK's reconnect would have fired by now; it must not
    check("second still ready", second.state.value == "ready", second.state.value)
    for c in (first, second):
        await c.close()


async def register_only():
    """Register one identity with the SDK and leave it on disk (for import into aund)."""
    aid, _ = await ensure("imported")
    (WORK / "ids.json").write_text(json.dumps({"imported": aid}))
    check("registered", True, aid)


async def peer():
    """The fastaun side of an exchange with an aund-held AID (env PEER_AID, N, HEADERS):
    register, publish our AID in WORK/peer.json, send N E2EE messages (with protected headers) to
    the peer, then wait until N E2EE messages from the peer arrived, checking order and headers."""
    n = int(os.environ.get("N", "5"))
    peer_aid = os.environ["PEER_AID"]
    aid, ident = await ensure("fastpeer")
    client = AUNClient(ident)
    client.set_protected_headers({"trace": "from-fastaun"})
    got = []
    client.on("message.received", lambda m: got.append(m))
    await asyncio.wait_for(client.connect({"auto_reconnect": False}), 30)
    check("connect fastpeer", client.state.value == "ready")
    (WORK / "peer.json").write_text(json.dumps({"aid": aid}))
    try:
        start_flag = WORK / "go"
        await wait_for(start_flag.exists, 60)
        for i in range(n):
            r = await client.call("message.send", {"to": peer_aid, "payload": {"type": "text", "text": f"f2a {i}"},
                                                   "encrypt": True, "protected_headers": {"seq_hint": str(i)}})
            check(f"send f2a {i}", r.get("status") == "delivered", r.get("status"))
        await wait_for(lambda: sum(1 for m in got if m.get("from") == peer_aid) >= n, 60)
        mine = [m for m in got if m.get("from") == peer_aid]
        texts = [(m.get("payload") or {}).get("text") for m in mine]
        check("received a2f in order, once", texts == [f"a2f {i}" for i in range(n)], texts)
        check("a2f all encrypted", all(m.get("encrypted") for m in mine), [m.get("encrypted") for m in mine])
        headers = [(m.get("e2ee") or {}).get("protected_headers") or m.get("protected_headers") for m in mine]
        check("a2f protected headers verified", all((h or {}).get("trace") == "from-aund" for h in headers), headers[:2])
    finally:
        await client.close()


async def peer_phase():
    """Offline exchange with an aund-held AID, one phase per process (env PHASE, PEER_AID, N):
    PHASE=send: connect once (publishing our prekey), send N E2EE messages "f2a-off i", leave.
    PHASE=recv: connect, expect N messages "a2f-off i" from the peer (sent while we were away),
    in order, once; then send N more "f2a-late i" (bootstrapped afresh: the peer's rotated prekey)."""
    n, peer_aid, phase = int(os.environ.get("N", "5")), os.environ["PEER_AID"], os.environ["PHASE"]
    aid, client, got = await open_phase("fastpeer", phase)
    try:
        if phase == "send":
            for i in range(n):
                r = await client.call("message.send", {"to": peer_aid, "encrypt": True,
                                                       "payload": {"type": "text", "text": f"f2a-off {i}"}})
                check(f"send f2a-off {i}", r.get("status") == "delivered", r.get("status"))
        else:
            await wait_for(lambda: sum(1 for m in got if m.get("from") == peer_aid) >= n, 60)
            texts = [(m.get("payload") or {}).get("text") for m in got if m.get("from") == peer_aid]
            check("a2f-off in order, once", texts == [f"a2f-off {i}" for i in range(n)], texts[:5])
            check("a2f-off encrypted", all(m.get("encrypted") for m in got if m.get("from") == peer_aid))
            for i in range(n):
                r = await client.call("message.send", {"to": peer_aid, "encrypt": True,
                                                       "payload": {"type": "text", "text": f"f2a-late {i}"}})
                check(f"send f2a-late {i}", r.get("status") == "delivered", r.get("status"))
    finally:
        await client.close()


async def thoughts():
    """P2P thoughts with an aund-held AID (env PEER_AID): we put one for the peer, wait for
    WORK/aund_put, then read the peer's thought for us; the SDK must find a V2 envelope (its
    `e2ee` metadata) and open it."""
    peer_aid = os.environ["PEER_AID"]
    aid, client, _ = await open_client("thinker")
    (WORK / "thinker.json").write_text(json.dumps({"aid": aid}))
    ctx = {"type": "run", "id": "run-aund"}
    try:
        r = await client.call("message.thought.put", {"to": peer_aid, "context": ctx,
                                                      "payload": {"type": "thought", "text": "f-thought"},
                                                      "protected_headers": {"step": "1"}})
        check("thought put to the aund AID", str(r.get("thought_id", "")).startswith("mt-") and r.get("stored_count") == 1, r)
        (WORK / "put").touch()
        await wait_for((WORK / "aund_put").exists, 60)
        r = await client.call("message.thought.get", {"sender_aid": peer_aid, "context": ctx})
        items = r.get("thoughts") or []
        last = items[-1] if items else {}
        check("aund's thought found", r.get("found") is True and len(items) == 1, r)
        check("aund's thought was a V2 envelope and opened", bool(last.get("e2ee")) and last.get("encrypted") is True
              and (last.get("payload") or {}).get("text") == "a-thought" and not last.get("decrypt_failed"), last)
    finally:
        await client.close()


async def history():
    """P2P history with an aund-held AID (env PEER_AID, N): we send N E2EE messages "f-hist i" to
    it, write WORK/sent, wait for WORK/aund_sent (aund sent us N "a-hist i"), then read
    `message.history` of the peer page by page (limit 2): every row opened, in seq order."""
    n = int(os.environ.get("N", "3"))
    peer_aid = os.environ["PEER_AID"]
    aid, client, inbox = await open_client("historian")
    (WORK / "historian.json").write_text(json.dumps({"aid": aid}))
    try:
        for i in range(n):
            r = await client.call("message.send", {"to": peer_aid, "payload": {"type": "text", "text": f"f-hist {i}"}})
            check(f"send f-hist {i}", r.get("status") == "delivered", r)
        (WORK / "sent").touch()
        await wait_for((WORK / "aund_sent").exists, 60)
        await wait_for(lambda: all(f"a-hist {i}" in inbox for i in range(n)), 20)
        rows, before, pages = [], 10**9, 0
        while pages < 10:
            page = await client.call("message.history", {"sender_aid": peer_aid, "before_seq": before, "limit": 2})
            pages += 1
            rows = list(page.get("messages") or []) + rows
            if not page.get("has_older"):
                break
            before = page["next_before_seq"]
        texts = [(m.get("payload") or {}).get("text") for m in rows]
        check("history of aund's messages, decrypted, oldest first", texts == [f"a-hist {i}" for i in range(n)], texts)
        check("history rows were E2EE", all(m.get("encrypted") is True for m in rows), [m.get("encrypted") for m in rows])
        check("history came in pages", pages == (n + 1) // 2, pages)
    finally:
        await client.close()


SCENARIOS = {"history": history, "thoughts": thoughts, "peer": peer, "peer_phase": peer_phase, "register_only": register_only, "both_ways": both_ways, "offline_phase1": offline_phase1, "offline_phase2": offline_phase2,
             "slot_kick": slot_kick}

if __name__ == "__main__":
    asyncio.run(SCENARIOS[sys.argv[1]]())
    sys.exit(1 if failed else 0)
