"""fastaun as the judge of aund's identity operations (sign, renew, rekey, notify), in its own process.

Run as `python fastaun_identity_driver.py judge` with env AUN_GW_URL, AUN_ROOT_CA, AUN_WORKDIR and
PEER_AID (the aund-held AID). The two sides meet through files in WORK:

1. we connect and write judge.json {aid};
2. aund writes signed.json [{data_b64, signature_b64, cert_fingerprint}]: we fetch each certificate
   by fingerprint with the SDK's own verified fetch (chain, CRL, OCSP, AID) and verify; we write
   fa_signed.json {data_b64, signature_b64, cert_fingerprint} made with our key;
3. aund notifies us `event/app.ping` until we touch got_ping;
4. after WORK/go_before we send "before-rekey" (E2EE) while aund is offline, then touch sent_before;
5. after WORK/rekeyed we send "after-rekey" (E2EE: the SDK must find aund's new key), touch
   sent_after, and wait for aund's "from-aund-after-rekey", which we must verify and decrypt.
Prints one JSON line per check; exits 1 if any failed. Imports only fastaun, never aund.
"""
import asyncio
import base64
import json
import os
import sys

from aun_core._cert_utils import verify_bytes
from cryptography import x509
from fastaun_common import AUNClient, WORK, check, ensure, failed, wait_for

PEER = os.environ.get("PEER_AID", "")


async def _send(client, text):
    """An E2EE send; a stale bootstrap (the peer rekeyed) is refetched by the SDK on retry."""
    last = None
    for _ in range(5):
        try:
            return await client.call("message.send", {"to": PEER, "payload": {"type": "text", "text": text},
                                                      "encrypt": True})
        except Exception as exc:  # noqa: BLE001 (the SDK's error tree; reported in the check)
            last = repr(exc)
            await asyncio.sleep(0.5)
    return {"error": last}


async def judge():
    aid, ident = await ensure("judge")
    client = AUNClient(ident)
    inbox, pings = {}, []
    client.on("message.received", lambda m: inbox.setdefault((m.get("payload") or {}).get("text"), m))
    client.on("app.ping", lambda data: pings.append(data))
    await asyncio.wait_for(client.connect({"auto_reconnect": True}), 30)
    check("connect judge", client.state.value == "ready", client.state.value)
    (WORK / "judge.json").write_text(json.dumps({"aid": aid}))
    try:
        check("aund's signatures arrived", await wait_for((WORK / "signed.json").exists, 60))
        for i, item in enumerate(json.loads((WORK / "signed.json").read_text())):
            pem = await client._fetch_peer_cert(PEER, item["cert_fingerprint"])
            cert = x509.load_pem_x509_certificate(pem)
            ok = verify_bytes(cert.public_key(), base64.b64decode(item["data_b64"]), item["signature_b64"])
            check(f"fastaun verifies aund's signature {i} ({item['cert_fingerprint'][:19]})", ok, item)
            forged = verify_bytes(cert.public_key(), base64.b64decode(item["data_b64"]) + b"!", item["signature_b64"])
            check(f"fastaun refuses aund's signature {i} over other data", not forged)
        data = b"signed by fastaun"
        signed = ident.sign(data)
        (WORK / "fa_signed.json").write_text(json.dumps({
            "data_b64": base64.b64encode(data).decode(), "signature_b64": signed.data["signature"],
            "cert_fingerprint": ident.cert_fingerprint}))

        got = await wait_for(lambda: bool(pings), 30)
        check("aund's notification arrived as app.ping", got and pings[0].get("n") == 1, pings[:1])
        stamp = (pings[0].get("_notify") or {}) if pings else {}
        check("the gateway stamped the sender", stamp.get("from_aid") == PEER, stamp)
        (WORK / "got_ping").touch()

        check("aund went offline", await wait_for((WORK / "go_before").exists, 60))
        r = await _send(client, "before-rekey")
        check("sent before the rekey", r.get("status") == "delivered", r)
        (WORK / "sent_before").touch()

        check("aund rekeyed", await wait_for((WORK / "rekeyed").exists, 90))
        r = await _send(client, "after-rekey")
        check("sent after the rekey (to aund's new key)", r.get("status") == "delivered", r)
        (WORK / "sent_after").touch()
        got = await wait_for(lambda: "from-aund-after-rekey" in inbox, 60)
        m = inbox.get("from-aund-after-rekey", {})
        check("aund's message after the rekey verified and decrypted", got and m.get("encrypted") is True, m)
    finally:
        await client.close()


SCENARIOS = {"judge": judge}

if __name__ == "__main__":
    asyncio.run(SCENARIOS[sys.argv[1]]())
    sys.exit(1 if failed else 0)
