"""fastaun 0.5.25 against a `--pki production` devnet: unsigned echo plaintext both ways, and a
reader refusing a revoked sender. Run as `python fastaun_prod_driver.py SCENARIO` (env as
fastaun_common). Imports only fastaun."""
import asyncio
import json
import sys

from fastaun_common import AUNClient, WORK, check, ensure, failed, note, wait_for


async def _client(name, aid=None):
    aid, ident = await ensure(name, aid)
    client = AUNClient(ident)
    got, bad = [], []
    client.on("message.received", lambda m: got.append(m))
    client.on("message.undecryptable", lambda m: bad.append(m))
    await asyncio.wait_for(client.connect({"auto_reconnect": False}), 30)
    check(f"connect {name}", client.state.value == "ready", client.state.value)
    return aid, client, got, bad


async def echo_both_ways():
    """Plaintext echo texts, which fastaun sends without client_signature, both ways."""
    (alice, A, a_got, _), (bob, B, b_got, _) = await _client("alice"), await _client("bob")
    await asyncio.sleep(1.0)
    try:
        for sender, to, inbox in ((A, bob, b_got), (B, alice, a_got)):
            r = await sender.call("message.send", {"to": to, "encrypt": False,
                                                   "payload": {"type": "text", "text": f"echo to {to}"}})
            check(f"send echo to {to}", r.get("status") == "delivered", r)
            ok = await wait_for(lambda: any(str((m.get("payload") or {}).get("text", "")).startswith(f"echo to {to}")
                                            for m in inbox))
            check(f"received echo at {to}", ok, [m.get("payload") for m in inbox])
    finally:
        for c in (A, B):
            await c.close()


async def revoke_send():
    """alice and bob exchange E2EE; bob leaves; alice sends one more to bob, then waits for WORK/revoked
    and sends another on her still-open connection."""
    (alice, A, _, _), (bob, B, b_got, _) = await _client("alice"), await _client("bob")
    await asyncio.sleep(1.0)
    try:
        r = await A.call("message.send", {"to": bob, "encrypt": True, "payload": {"type": "text", "text": "hello"}})
        check("e2ee before revoke", r.get("status") == "delivered", r)
        check("bob decrypted it", await wait_for(lambda: any((m.get("payload") or {}).get("text") == "hello"
                                                             for m in b_got)))
        await B.close()
        r = await A.call("message.send", {"to": bob, "encrypt": True, "payload": {"type": "text", "text": "offline"}})
        check("e2ee while bob is away", r.get("status") == "delivered", r)
        (WORK / "ids.json").write_text(json.dumps({"alice": alice, "bob": bob}))
        await wait_for((WORK / "revoked").exists, 60)
        r = await A.call("message.send", {"to": bob, "encrypt": True, "payload": {"type": "text", "text": "after"}})
        check("send after revoke (live connection)", r.get("status") == "delivered", r)
    finally:
        await A.close()


async def revoke_read():
    """A fresh bob process: what does fastaun do with the revoked sender's messages?"""
    ids = json.loads((WORK / "ids.json").read_text())
    _, B, got, bad = await _client("bob", ids["bob"])
    try:
        await wait_for(lambda: len(bad) >= 2, 20)
        from_alice = [m for m in got if m.get("from") == ids["alice"]]
        note(received=[(m.get("payload"), m.get("encrypted")) for m in from_alice],
             undecryptable=[{k: m.get(k) for k in ("from", "message_id", "reason", "code", "error", "detail")}
                            for m in bad])
        check("no plaintext from the revoked sender", not any(m.get("encrypted") and (m.get("payload") or {}).get("text")
                                                              for m in from_alice), from_alice[:2])
        check("undecryptable events for the revoked sender", len(bad) >= 2, bad[:2])
    finally:
        await B.close()


SCENARIOS = {"echo_both_ways": echo_both_ways, "revoke_send": revoke_send, "revoke_read": revoke_read}

if __name__ == "__main__":
    asyncio.run(SCENARIOS[sys.argv[1]]())
    sys.exit(1 if failed else 0)
