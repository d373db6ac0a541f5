"""The devnet's certificate lifecycle (auth.renew_cert, auth.rekey, --cert-ttl) and notifications
(notification/route, notification/group.route), over real loopback sockets with raw frames."""
from __future__ import annotations

import json
import time

import trio

from aund.aun import jsonrpc as rpc
from aund.identity import pki
from tests.devnet.rawclient import connect, fresh_aid, http, http_base, open_raw, register, short_rpc

DEADLINE = 20


async def _nonce(url: str, aid: str, cert) -> tuple[str, str]:
    r1 = await short_rpc(url, "auth.aid_login1", {"aid": aid, "cert": pki.cert_pem(cert),
                                                  "client_nonce": "Y2xpZW50bm9uY2Ux"})
    return r1["request_id"], r1["nonce"]


async def _call(url: str, method: str, params: dict) -> dict:
    async with open_raw(url) as c:
        return await c.call(method, params)


async def test_renew_and_rekey_keep_old_certs_served(start_devnet):
    info = await start_devnet(cert_ttl=120)
    url = info.gateway_url
    with trio.fail_after(DEADLINE):
        aid = fresh_aid("renew")
        key, cert = await register(url, aid)
        assert cert.not_valid_after_utc.timestamp() - time.time() < 125  # --cert-ttl
        rid, nonce = await _nonce(url, aid, cert)
        params = {"aid": aid, "request_id": rid, "nonce": nonce,
                  "signature": pki.b64e(pki.sign_for_key(key, nonce.encode()))}
        renewed = await short_rpc(url, "auth.renew_cert", params)
        new = pki.load_cert_pem(renewed["cert"])
        assert renewed["status"] == "renewed" and pki.spki_der(new.public_key()) == pki.spki_der(key.public_key())
        assert new.serial_number != cert.serial_number and pki.cert_aid(new) == aid
        assert (await _call(url, "auth.renew_cert", params))["error"]["code"] == rpc.BAD_NONCE  # single use
        # login with the old certificate no longer works: the renewed one is current
        old_login = await _call(url, "auth.aid_login1", {"aid": aid, "cert": pki.cert_pem(cert), "client_nonce": "eA=="})
        assert old_login["error"]["code"] == rpc.AUTH_FAILED

        new_key = pki.generate_key()
        new_pub = pki.public_key_b64(new_key.public_key())
        rid, nonce = await _nonce(url, aid, new)
        bad = {"aid": aid, "request_id": rid, "nonce": nonce, "new_public_key": new_pub,
               "signature": pki.b64e(pki.sign_for_key(new_key, f"{nonce}{new_pub}".encode()))}  # not the current key
        assert (await _call(url, "auth.rekey", bad))["error"]["code"] == rpc.AUTH_FAILED
        rid, nonce = await _nonce(url, aid, new)
        good = dict(bad, request_id=rid, nonce=nonce,
                    signature=pki.b64e(pki.sign_for_key(key, f"{nonce}{new_pub}".encode())))
        rekeyed = await short_rpc(url, "auth.rekey", good)
        third = pki.load_cert_pem(rekeyed["cert"])
        assert rekeyed["status"] == "rekeyed" and pki.spki_der(third.public_key()) == pki.spki_der(new_key.public_key())

        base = http_base(url)
        current = await http("GET", f"{base}/pki/cert/{aid}")
        assert pki.load_cert_pem(current.body) == third
        for old in (cert, new):  # every past certificate is still served by its fingerprint, and not revoked
            got = await http("GET", f"{base}/pki/cert/{aid}?cert_fingerprint={pki.cert_fingerprint(old)}")
            assert got.status == 200 and pki.load_cert_pem(got.body) == old
            status = json.loads((await http("GET", f"{base}/pki/ocsp/{format(old.serial_number, 'x')}")).body)
            assert status["status"] == "good"
        for method, extra in (("auth.renew_cert", {}), ("auth.rekey", {"new_public_key": "AAAA"})):
            reply = await _call(url, method, {"aid": aid, "request_id": "req-unknown", "nonce": "n", "signature": "AA==",
                                              **extra})
            assert reply["error"]["code"] == rpc.BAD_NONCE


async def test_notifications_reach_online_connections_only_as_app_events(devnet_inproc, alice, bob):
    url = devnet_inproc.gateway_url
    with trio.fail_after(DEADLINE):
        async with connect(url, alice.token, "da", "main") as a, connect(url, bob.token, "db1", "s1") as b1, \
                connect(url, bob.token, "db2", "s2") as b2:
            route = {"target": {"type": "aid", "aid": bob.aid}, "deliver": {"method": "event/app.typing",
                                                                           "params": {"t": 1, "_notify": "forged"}},
                     "ttl_ms": 5000}
            for frame in (rpc.notification("notification/route", route),
                          rpc.notification("notification/route", dict(route, target=dict(route["target"],
                                                                                         device_id="db2"))),
                          # refused silently: a gateway event, a bad ttl, an unknown direct notification
                          rpc.notification("notification/route", dict(route, deliver={"method": "event/message.received",
                                                                                      "params": {}})),
                          rpc.notification("notification/route", dict(route, ttl_ms=60001)),
                          rpc.notification("notification/whatever", {})):
                await a.send_text(json.dumps(frame))
            assert (await a.call("meta.ping", {}))["result"]["pong"] is True  # nothing answered the notifications
            first = await b1.next_frame(lambda f: f.get("method") == "event/app.typing")
            stamp = first["params"]["_notify"]
            assert "id" not in first and first["params"]["t"] == 1
            assert stamp["from_aid"] == alice.aid and stamp["device_id"] == "da" and stamp["ttl_ms"] == 5000
            got = [await b2.next_frame(lambda f: f.get("method") == "event/app.typing") for _ in range(2)]
            assert all(g["params"]["_notify"]["from_aid"] == alice.aid for g in got)
            await b1.ping()
            assert not [f for f in b1.frames if f.get("method", "").startswith("event/")], b1.frames
            stats = json.loads((await http("GET", http_base(url) + "/devnet/stats")).body)
            assert stats["rpc"]["notify notification/route"] == 4
            assert stats["rpc_errors"]["notification/route dropped"] == 2
