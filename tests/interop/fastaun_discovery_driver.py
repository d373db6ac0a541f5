"""fastaun 0.5.25 given only an AID: real discovery (https://gateway.{issuer}/.well-known/aun-gateway
over TLS checked against SSL_CERT_FILE), the devnet root as AUN trust root. Imports only fastaun.

Env: AUN_ROOT_CA, AUN_WORKDIR, PEER_AID (the aund-held AID), AUN_ISSUER (its own issuer, default
aid.test). Scenarios (argv[1], default p2p):

  p2p     one E2EE message to PEER_AID and a wait for its reply; PEER_AID's agent.md is downloaded
          and verified.
  groups  (PEER_AID of another issuer) group A lives on PEER_AID's devnet: we wait for
          group_a.json {gid} (aund created it and added us), see our admission pushed, send
          "fa to A" and wait for "aund to A"; then we create group B on our own devnet, add PEER_AID,
          write group_b.json {gid}, wait for "aund to B" and answer "fa to B"; we end on `done`.

We write fa.json {aid} once connected. One JSON line per check on stdout; exit 1 if any failed.
"""
import asyncio
import json
import os
import secrets
import sys
from pathlib import Path

ISSUER = os.environ.get("AUN_ISSUER", "aid.test")
os.environ.setdefault("AUN_NAMESERVICE_URL", f"https://gateway.{ISSUER}")
from aun_core import AIDStore, AUNClient  # noqa: E402

WORK, PEER = Path(os.environ["AUN_WORKDIR"]), os.environ["PEER_AID"]
failed = []


def check(name, ok, detail=None):
    print(json.dumps({"check": name, "ok": bool(ok), "detail": detail}, default=str), flush=True)
    if not ok:
        failed.append(name)


async def wait_for(pred, timeout):
    for _ in range(int(timeout / 0.05)):
        if pred():
            return True
        await asyncio.sleep(0.05)
    return pred()


async def wait_file(name, timeout=60.0):
    path = WORK / name
    if not await wait_for(path.exists, timeout):
        raise SystemExit(f"timed out waiting for {name}")
    await asyncio.sleep(0.05)  # written with one write_text: let it land
    return json.loads(path.read_text() or "{}")


def text_of(msg):
    return (msg.get("payload") or {}).get("text") if isinstance(msg, dict) else None


async def p2p(store, client, aid, got):
    card = await store.download_agent_md(PEER)  # https://{peer}/agent.md, signature and cert checked
    verification = (card.data or {}).get("verification") if card.ok else None
    check("peer agent.md downloaded and verified", card.ok and (verification or {}).get("status") == "verified",
          verification if card.ok else card.error.message)
    r = await client.call("message.send", {"to": PEER, "payload": {"type": "text", "text": "hi from fastaun"}})
    check("e2ee send to aund", r.get("status") == "delivered", r)
    await wait_for(lambda: any(text_of(m) == "hi from aund" for m in got["p2p"]), 20)
    reply = [m for m in got["p2p"] if text_of(m) == "hi from aund"]
    check("e2ee reply from aund decrypted", reply and reply[0].get("encrypted") is True, reply[:1])


async def group_round(client, gid, got, *, mine, theirs, first):
    """We send `mine` (before or after `theirs` arrives) and must decrypt `theirs`."""
    async def send():
        r = await client.call("group.send", {"group_id": gid, "payload": {"type": "text", "text": mine}})
        check(f"group.send {mine!r}", isinstance(r.get("seq"), int), r)

    if first:
        await send()
    arrived = await wait_for(lambda: any(text_of(m) == theirs for m in got["group"]), 45)
    msgs = [m for m in got["group"] if text_of(m) == theirs]
    check(f"decrypted {theirs!r} across domains", arrived and msgs[0].get("encrypted") is True
          and msgs[0].get("group_id") == gid and msgs[0].get("sender_aid", msgs[0].get("from")) == PEER, msgs[:1])
    if not first:
        await send()


async def groups(store, client, aid, got):
    gid_a = (await wait_file("group_a.json"))["gid"]
    admitted = await wait_for(lambda: any(e.get("action") == "member_added" and e.get("joined_aid") == aid
                                          and e.get("group_id") == gid_a for e in got["changed"]), 30)
    check("our admission to a foreign group was pushed to us", admitted, got["changed"][-3:])
    r = await client.call("group.get_members", {"group_id": gid_a})
    roles = {m["aid"]: m["role"] for m in r.get("members", [])}
    check("members of the foreign group", roles == {PEER: "owner", aid: "member"}, roles)
    await group_round(client, gid_a, got, mine="fa to A", theirs="aund to A", first=True)

    created = await client.call("group.create", {"name": "fastaun home", "join_mode": "approval"})
    gid_b = (created.get("group") or {}).get("group_id", "")
    check("group B lives on our issuer", gid_b.endswith("." + ISSUER), created.get("group"))
    r = await client.call("group.add_member", {"group_id": gid_b, "aid": PEER})
    check("added the aund AID of the other issuer", (r.get("member") or {}).get("aid") == PEER, r)
    mine = await client.call("group.list_my", {})
    listed = {g["group_id"]: g.get("role") for g in mine.get("items", [])}
    check("list_my merges both devnets", listed.get(gid_a) == "member" and listed.get(gid_b) == "owner", listed)
    (WORK / "group_b.json").write_text(json.dumps({"gid": gid_b}))
    await group_round(client, gid_b, got, mine="fa to B", theirs="aund to B", first=False)
    check("nothing undecryptable", not got["undecryptable"], got["undecryptable"][:2])
    await wait_file("done", 45)


async def main(scenario):
    store = AIDStore(aun_path=str(WORK / "fa"), encryption_seed="t", root_ca_path=os.environ["AUN_ROOT_CA"])
    aid = f"fa-{secrets.token_hex(3)}.{ISSUER}"
    registered = await store.register(aid, type="agent")  # no gateway given: discovery
    check("register by discovery", registered.ok, None if registered.ok else registered.error.message)
    client = AUNClient(store.load(aid).data["aid"])
    got = {"p2p": [], "group": [], "changed": [], "undecryptable": []}
    client.on("message.received", got["p2p"].append)
    client.on("group.message_created", got["group"].append)
    client.on("group.changed", lambda e: got["changed"].append(e) if isinstance(e, dict) else None)
    client.on("group.message_undecryptable", got["undecryptable"].append)
    await asyncio.wait_for(client.connect({"auto_reconnect": False}), 30)
    check("connect by discovery", client.state.value == "ready", client.gateway_url)
    (WORK / "fa.json").write_text(json.dumps({"aid": aid}))
    try:
        await {"p2p": p2p, "groups": groups}[scenario](store, client, aid, got)
    finally:
        await client.close()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main(sys.argv[1] if len(sys.argv) > 1 else "p2p")))
