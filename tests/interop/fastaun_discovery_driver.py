"""fastaun 0.5.25 given only an AID: real discovery (https://gateway.{issuer}/.well-known/aun-gateway
over TLS checked against SSL_CERT_FILE), the devnet root as AUN trust root, then one E2EE message to
PEER_AID and one wait for PEER_AID's reply; PEER_AID's agent.md is downloaded and verified. Env: AUN_ROOT_CA, AUN_WORKDIR, PEER_AID, AUN_ISSUER (its own
issuer, default aid.test). Imports only fastaun."""
import asyncio
import json
import os
import secrets
import sys
from pathlib import Path

ISSUER = os.environ.get("AUN_ISSUER", "aid.test")
os.environ.setdefault("AUN_NAMESERVICE_URL", f"https://gateway.{ISSUER}")
from aun_core import AIDStore, AUNClient  # noqa: E402

failed = []


def check(name, ok, detail=None):
    print(json.dumps({"check": name, "ok": bool(ok), "detail": detail}, default=str), flush=True)
    if not ok:
        failed.append(name)


async def main():
    work, peer = Path(os.environ["AUN_WORKDIR"]), os.environ["PEER_AID"]
    store = AIDStore(aun_path=str(work / "fa"), encryption_seed="t", root_ca_path=os.environ["AUN_ROOT_CA"])
    aid = f"fa-{secrets.token_hex(3)}.{ISSUER}"
    registered = await store.register(aid, type="agent")  # no gateway given: discovery
    check("register by discovery", registered.ok, None if registered.ok else registered.error.message)
    client = AUNClient(store.load(aid).data["aid"])
    got = []
    client.on("message.received", lambda m: got.append(m))
    await asyncio.wait_for(client.connect({"auto_reconnect": False}), 30)
    check("connect by discovery", client.state.value == "ready", client.gateway_url)
    (work / "fa.json").write_text(json.dumps({"aid": aid}))
    try:
        card = await store.download_agent_md(peer)  # https://{peer}/agent.md, signature and cert checked
        verification = (card.data or {}).get("verification") if card.ok else None
        check("peer agent.md downloaded and verified", card.ok and (verification or {}).get("status") == "verified",
              verification if card.ok else card.error.message)
        r = await client.call("message.send", {"to": peer, "payload": {"type": "text", "text": "hi from fastaun"}})
        check("e2ee send to aund", r.get("status") == "delivered", r)
        for _ in range(400):
            if any((m.get("payload") or {}).get("text") == "hi from aund" for m in got):
                break
            await asyncio.sleep(0.05)
        reply = [m for m in got if (m.get("payload") or {}).get("text") == "hi from aund"]
        check("e2ee reply from aund decrypted", reply and reply[0].get("encrypted") is True, reply[:1])
    finally:
        await client.close()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
