"""--pki production, revocation and refresh by token alone, against the in-process devnet."""
from __future__ import annotations

import json

import pytest
import trio
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509 import ocsp

from aund.aun import jsonrpc as rpc
from aund.devnet import PKIModeMismatch, serve_devnet
from aund.identity import pki
from tests.devnet.rawclient import connect, fresh_aid, http, http_base, new_account, open_raw, short_rpc

DEADLINE = 20


async def test_production_chain_crl_ocsp_and_revocation(start_devnet):
    with trio.fail_after(DEADLINE):
        info = await start_devnet(pki_mode="production")
        url, base = info.gateway_url, http_base(info.gateway_url)
        alice = await new_account(url, fresh_aid("alice"), root_ca=info.root_ca)  # login checks ES384 nonce sig
        chain = pki.split_pem_bundle((await http("GET", base + "/pki/chain")).body.decode())
        assert len(chain) == 3 and chain[-1] == pki.load_cert_pem(info.root_ca.read_bytes())
        assert all(isinstance(c.public_key().curve, ec.SECP384R1) for c in chain)
        assert [c.extensions.get_extension_for_class(x509.BasicConstraints).value.path_length for c in chain] == [0, 1, 2]
        assert isinstance(alice.identity.cert.public_key().curve, ec.SECP256R1)
        pki.verify_chain(alice.identity.cert, chain, [chain[-1]])
        issuer = chain[0]
        r = await http("POST", base + "/devnet/revoke", body=json.dumps({"aid": alice.aid}).encode())
        assert r.status == 200 and r.json()["already_revoked"] is False
        crl = x509.load_pem_x509_crl(json.loads((await http("GET", base + "/pki/crl.json")).body)["crl_pem"].encode())
        assert pki.verify_signature(issuer.public_key(), crl.signature, crl.tbs_certlist_bytes)
        assert crl.get_revoked_certificate_by_serial_number(alice.identity.cert.serial_number) is not None
        o = (await http("GET", f"{base}/pki/ocsp/{format(alice.identity.cert.serial_number, 'x')}")).json()
        resp = ocsp.load_der_ocsp_response(pki.b64d(o["ocsp_response"]))
        assert o["status"] == "revoked" and resp.certificate_status == ocsp.OCSPCertStatus.REVOKED
        assert pki.verify_signature(issuer.public_key(), resp.signature, resp.tbs_response_bytes)
        async with open_raw(url) as c:  # production refuses the login of a revoked certificate
            reply = await c.call("auth.aid_login1", {"aid": alice.aid, "cert": pki.cert_pem(alice.identity.cert),
                                                     "client_nonce": "bm9uY2U="})
            assert reply["error"]["code"] == rpc.CERT_INVALID and "revoked" in reply["error"]["message"]
        refused = await short_rpc(url, "auth.refresh_token", {"refresh_token": alice.refresh_token})
        assert refused["success"] is False and refused["relogin_required"] is True


async def test_refresh_token_alone_rotates(devnet_inproc, alice):
    with trio.fail_after(DEADLINE):
        url = devnet_inproc.gateway_url
        fresh = await short_rpc(url, "auth.refresh_token", {"refresh_token": alice.refresh_token})
        assert fresh["success"] is True and fresh["aid"] == alice.aid
        again = await short_rpc(url, "auth.refresh_token", {"refresh_token": alice.refresh_token})
        assert again["success"] is False and again["relogin_required"] is True
        async with connect(url, fresh["access_token"], "d1", "default") as c:
            assert await c.ping()


async def test_unsigned_plain_send_on_the_connection_identity(devnet_inproc, alice, bob):
    with trio.fail_after(DEADLINE):
        async with connect(devnet_inproc.gateway_url, alice.token, "d1", "default") as c:
            ok = await c.call("message.send", {"to": bob.aid, "payload": {"type": "text", "text": "echo hi"}})
            assert ok["result"]["status"] == "delivered"
            other = await c.call("message.send", {"to": bob.aid, "device_id": "d2",
                                                  "payload": {"type": "text", "text": "echo hi"}})
            assert other["error"]["code"] == rpc.CLIENT_SIGNATURE_INVALID  # another identity claimed


async def test_mode_is_fixed_per_state_dir(tmp_path):
    with trio.fail_after(DEADLINE):
        async with trio.open_nursery() as nursery:
            stop = trio.Event()
            await nursery.start(lambda task_status: serve_devnet("127.0.0.1", 0, tmp_path, stop=stop,
                                                                 task_status=task_status))
            stop.set()
        with pytest.raises(PKIModeMismatch, match="--pki dev"):
            await serve_devnet("127.0.0.1", 0, tmp_path, pki_mode="production")
