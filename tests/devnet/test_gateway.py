"""The devnet gateway over real loopback sockets: framing, auth, signatures, slots, HTTP side endpoints."""
from __future__ import annotations

import hashlib
import json
import time

import pytest
import trio
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509 import ocsp
from trio_websocket import ConnectionClosed

from aund.aun import jsonrpc as rpc
from aund.aun import signing
from aund.identity import agent_md, pki
from tests.devnet.rawclient import (
    connect,
    fresh_aid,
    http,
    http_base,
    login,
    login_result,
    new_account,
    open_raw,
    register,
    short_rpc,
)

DEADLINE = 20


def pull_params(sender: str, after: int = 0, limit: int = 50) -> dict:
    return {"cursor_scope": "peer", "sender_aid": sender, "after_seq": after, "limit": limit,
            "device_id": "d1", "slot_id": "default"}


def err_code(reply: dict) -> int | None:
    return reply.get("error", {}).get("code")


# --- framing ---------------------------------------------------------------------------------------
async def test_challenge_on_open(devnet_inproc):
    with trio.fail_after(DEADLINE):
        async with open_raw(devnet_inproc.gateway_url) as a, open_raw(devnet_inproc.gateway_url) as b:
            for c in (a, b):
                params = c.challenge["params"]
                assert c.challenge["jsonrpc"] == "2.0" and "id" not in c.challenge
                assert isinstance(params["nonce"], str) and len(params["nonce"]) >= 16
                assert params["protocol"] == {"min": "1.0", "max": "1.0"}
                assert abs(params["server_time"] - time.time()) < 60
            assert a.nonce != b.nonce


async def test_malformed_frames_are_answered_and_the_connection_keeps_serving(devnet_inproc, alice):
    with trio.fail_after(DEADLINE):
        async with connect(devnet_inproc.gateway_url, alice.token, "d1", "default") as c:
            cases = [
                ("{bad json", rpc.PARSE_ERROR),
                ('{"jsonrpc":"2.0","id":1,"method":"meta.ping","params":{"a":NaN}}', rpc.PARSE_ERROR),
                ('{"jsonrpc":"2.0","id":1,"id":2,"method":"meta.ping"}', rpc.PARSE_ERROR),  # duplicate key
                ('{"jsonrpc":"2.0","id":1,"method":"meta.ping"} trailing', rpc.PARSE_ERROR),
                ('{"id":1,"method":"meta.ping","params":{}}', rpc.INVALID_REQUEST),        # no jsonrpc
                ('{"jsonrpc":"1.0","id":1,"method":"meta.ping","params":{}}', rpc.INVALID_REQUEST),
                ('{"jsonrpc":"2.0","id":1,"method":"meta.ping","params":[]}', rpc.INVALID_REQUEST),
                ('{"jsonrpc":"2.0","id":1,"method":5}', rpc.INVALID_REQUEST),
                ('{"jsonrpc":"2.0","id":true,"method":"meta.ping"}', rpc.INVALID_REQUEST),
                ('{"jsonrpc":"2.0","id":9007199254740993,"method":"meta.ping"}', rpc.PARSE_ERROR),  # > 2^53-1
                ('{"jsonrpc":"2.0","id":1,"method":"meta.ping","params":{"x":1e400}}', rpc.PARSE_ERROR),  # overflows
            ]
            for text, code in cases:
                await c.send_text(text)
                reply = await c.next_frame(lambda f: "error" in f and f.get("id") is None)
                assert reply["error"]["code"] == code, (text, reply)
                assert await c.ping(), text
            await c.ws.send_message(b'{"jsonrpc":"2.0","id":1,"method":"meta.ping"}')  # binary frame
            reply = await c.next_frame(lambda f: "error" in f and f.get("id") is None)
            assert reply["error"]["code"] == rpc.INVALID_REQUEST
            assert await c.ping()


async def test_non_object_frame_is_invalid_request(devnet_inproc, alice):
    """Regression: valid JSON that is not an object was answered -32700 (not -32600)."""
    with trio.fail_after(DEADLINE):
        async with connect(devnet_inproc.gateway_url, alice.token, "d1", "default") as c:
            for text in ("[1]", '"text"', "42", "null", "[]"):
                await c.send_text(text)
                reply = await c.next_frame(lambda f: "error" in f and f.get("id") is None)
                assert reply["error"]["code"] == rpc.INVALID_REQUEST, (text, reply)
            assert await c.ping()


async def test_unknown_method_and_methods_before_connect(devnet_inproc, alice):
    with trio.fail_after(DEADLINE):
        async with open_raw(devnet_inproc.gateway_url) as c:
            for method in ("meta.ping", "message.send", "message.v2.pull", "no.such.method"):
                assert err_code(await c.call(method, {})) == rpc.SESSION_REQUIRED, method
            # and the socket can still authenticate afterwards
            reply = await c.authenticate(alice.token, "d1", "default")
            assert reply["result"]["status"] == "ok"
            assert reply["result"]["capabilities"]["p2p_peer_pull_v1"] is True
            assert reply["result"]["identity"]["aid"] == alice.aid
            assert err_code(await c.call("no.such.method", {})) == rpc.METHOD_NOT_FOUND
            assert err_code(await c.call("auth.aid_login1", {})) == rpc.INVALID_REQUEST  # pre-auth only
            assert await c.ping()


async def test_wrong_param_types(devnet_inproc, alice, bob):
    with trio.fail_after(DEADLINE):
        async with connect(devnet_inproc.gateway_url, alice.token, "d1", "default", identity=alice.identity) as c:
            for params in ({"filter": 5}, {"filter": "all", "limit": "10"}, {"filter": "all", "page_token": 7}):
                assert err_code(await c.call("message.peers", params)) == rpc.INVALID_PARAMS, params
            signed_cases = [
                ("message.v2.pull", dict(pull_params(bob.aid), limit="10")),
                ("message.v2.pull", dict(pull_params(bob.aid), after_seq=True)),
                ("message.v2.pull", dict(pull_params(bob.aid), sender_aid=["x"])),
                ("message.v2.ack", {"sender_aid": bob.aid, "up_to_seq": 1.5}),
                ("message.send", {"to": bob.aid, "payload": "text"}),
                ("message.send", {"to": bob.aid, "payload": {"t": 1}, "need_render": "yes"}),
                ("message.send", {"to": bob.aid, "payload": {"t": 1}, "message_id": 5}),
                ("message.send", {"to": 5, "payload": {"t": 1}}),
                ("message.v2.put_peer_pk", {"spk_id": "x", "spk_pk": "AA==", "spk_signature": "AA==",
                                            "spk_timestamp": "1"}),
                ("message.v2.bootstrap", {"peer_aid": None}),
            ]
            for method, params in signed_cases:
                assert err_code(await c.signed_call(method, params)) == rpc.INVALID_PARAMS, (method, params)
            assert await c.ping()


async def test_oversized_frame_closes_only_that_connection(devnet_inproc, alice):
    with trio.fail_after(DEADLINE):
        url = devnet_inproc.gateway_url
        async with connect(url, alice.token, "d1", "default") as big, connect(url, alice.token, "d2", "default") as other:
            await big.send_text('{"jsonrpc":"2.0","id":1,"method":"meta.ping","params":{"pad":"'
                                + "x" * (2 * 1024 * 1024) + '"}}')
            assert await big.closed_code() == 1009
            assert await other.ping()
            async with connect(url, alice.token, "d1", "default") as again:  # the devnet still accepts sockets
                assert await again.ping()


# --- auth ------------------------------------------------------------------------------------------
async def test_login2_replay_is_refused(devnet_inproc):
    with trio.fail_after(DEADLINE):
        url, aid = devnet_inproc.gateway_url, fresh_aid("replay")
        key, cert = await register(url, aid)
        login1 = {"aid": aid, "cert": pki.cert_pem(cert), "client_nonce": "Y2xpZW50bm9uY2Ux"}
        r1 = await short_rpc(url, "auth.aid_login1", login1)
        client_time = f"{time.time():.6f}"
        login2 = {"aid": aid, "request_id": r1["request_id"], "nonce": r1["nonce"], "client_time": client_time,
                  "signature": pki.b64e(pki.sign_der(key, f"{r1['nonce']}:{client_time}".encode()))}
        first = await short_rpc(url, "auth.aid_login2", login2)
        assert first["access_token"] and first["refresh_token"] and first["expires_in"] > 0
        async with open_raw(url) as c:
            assert err_code(await c.call("auth.aid_login2", login2)) == rpc.BAD_NONCE
        # a wrong signature on a fresh nonce is refused too (4001), and the nonce is spent
        r1 = await short_rpc(url, "auth.aid_login1", dict(login1, client_nonce="Y2xpZW50bm9uY2Uy"))
        bad = dict(login2, request_id=r1["request_id"], nonce=r1["nonce"])
        async with open_raw(url) as c:
            assert err_code(await c.call("auth.aid_login2", bad)) == rpc.AUTH_FAILED
            assert err_code(await c.call("auth.aid_login2", bad)) == rpc.BAD_NONCE


async def test_challenge_nonce_reuse_is_refused(devnet_inproc, alice):
    with trio.fail_after(DEADLINE):
        url = devnet_inproc.gateway_url
        async with open_raw(url) as first, open_raw(url) as second:
            reply = await first.authenticate(alice.token, "d1", "default")
            assert reply["result"]["status"] == "ok"
            # replaying the nonce the first socket already used, on another socket
            reply = await second.authenticate(alice.token, "d2", "default", nonce=first.nonce)
            assert err_code(reply) == rpc.BAD_NONCE
            assert await second.closed_code() == 4001
            assert await first.ping()


@pytest.mark.parametrize("which", ["bad", "expired", "refresh_as_access"])
async def test_bad_or_expired_token(devnet_inproc, alice, which):
    with trio.fail_after(DEADLINE):
        token = {"bad": "dat_not-a-token", "expired": alice.token, "refresh_as_access": alice.refresh_token}[which]
        if which == "expired":
            devnet_inproc.devnet.store.db.execute("UPDATE tokens SET expires_at=? WHERE token_hash=?",
                                                  (time.time() - 1, hashlib.sha256(token.encode()).hexdigest()))
        async with open_raw(devnet_inproc.gateway_url) as c:
            assert err_code(await c.authenticate(token, "d1", "default")) == rpc.AUTH_FAILED
            assert await c.closed_code() == 4001


async def test_refresh_token_rotates(devnet_inproc, alice):
    with trio.fail_after(DEADLINE):
        url = devnet_inproc.gateway_url
        params = {"refresh_token": alice.refresh_token, "aid": alice.aid, "device_id": "d1", "slot_id": "default",
                  "access_token": alice.token, "access_token_expires_at": time.time() + 3600,
                  "sdk_lang": "python", "sdk_version": "0.5.25"}
        fresh = await short_rpc(url, "auth.refresh_token", params)
        assert fresh["success"] is True and fresh["relogin_required"] is False
        assert fresh["refresh_token"] != alice.refresh_token and fresh["access_token"] != alice.token
        again = await short_rpc(url, "auth.refresh_token", params)  # the old refresh token is spent
        assert again["success"] is False and again["relogin_required"] is True
        assert again["error"] == "invalid_or_expired_refresh_token"
        # the new pair works: the access token connects, the refresh token rotates once more
        async with connect(url, fresh["access_token"], "d1", "default") as c:
            assert await c.ping()
        newer = await short_rpc(url, "auth.refresh_token", dict(params, refresh_token=fresh["refresh_token"]))
        assert newer["success"] is True
        # another AID's refresh token is refused
        stolen = await short_rpc(url, "auth.refresh_token",
                                 dict(params, aid=fresh_aid("thief"), refresh_token=newer["refresh_token"]))
        assert stolen["success"] is False
        owner = await short_rpc(url, "auth.refresh_token", dict(params, refresh_token=newer["refresh_token"]))
        assert owner["success"] is True  # the refused attempt did not spend it


async def test_register_and_login(devnet_inproc, bob):
    """The rawclient login checks the auth_cert chain and the client_nonce signature; the token works."""
    with trio.fail_after(DEADLINE):
        url, aid = devnet_inproc.gateway_url, fresh_aid("carol")
        key, cert = await register(url, aid)
        again = await short_rpc(url, "auth.create_aid", {"aid": aid, "public_key": pki.public_key_b64(key.public_key()),
                                                         "curve": "P-256"})
        assert pki.load_cert_pem(again["cert"]) == cert  # same key: the same certificate, idempotent
        async with open_raw(url) as c:  # login1 with a certificate that is not the AID's
            reply = await c.call("auth.aid_login1", {"aid": aid, "cert": pki.cert_pem(bob.identity.cert),
                                                     "client_nonce": "bm9uY2U="})
            assert err_code(reply) == rpc.AUTH_FAILED
        result = await login_result(url, aid, key, cert, root_ca=devnet_inproc.root_ca)
        assert result["status"] == "ok" and result["aid"] == aid
        token = await login(url, aid, key, cert, root_ca=devnet_inproc.root_ca)
        async with connect(url, token, "d1", "default") as c:
            status = await c.result("meta.status", {})
            assert status["aid"] == aid and status["protocol_version"] == "1.0"
        # registering the same AID with another key is refused
        async with open_raw(url) as c:
            other = pki.public_key_b64(pki.generate_key().public_key())
            reply = await c.call("auth.create_aid", {"aid": aid, "public_key": other, "curve": "P-256"})
            assert err_code(reply) == rpc.CONFLICT


# --- client_signature -----------------------------------------------------------------------------
async def test_client_signature_checks(devnet_inproc, alice, bob):
    with trio.fail_after(DEADLINE):
        url, a = devnet_inproc.gateway_url, alice.identity
        params = pull_params(bob.aid)
        sign = lambda **kw: signing.sign_params("message.v2.pull", params, **{  # noqa: E731
            "aid": a.aid, "key": a.key, "cert_fingerprint": a.fingerprint, **kw})
        tampered = sign()
        tampered["limit"] = 49
        cases = {
            "missing": dict(params),
            "tampered params": tampered,
            "wrong aid": sign(aid=bob.aid),
            "signed by another key": sign(key=bob.identity.key),
            "stale timestamp": sign(now=time.time() - 3600),
            "future timestamp": sign(now=time.time() + 3600),
            "wrong cert_fingerprint": sign(cert_fingerprint=bob.identity.fingerprint),
            "malformed": dict(params, client_signature={"aid": a.aid}),
            "signed for another method": signing.sign_params("message.v2.ack", params, aid=a.aid, key=a.key,
                                                             cert_fingerprint=a.fingerprint),
        }
        async with connect(url, alice.token, "d1", "default", identity=a) as c:
            for name, signed in cases.items():
                reply = await c.call("message.v2.pull", signed)
                assert err_code(reply) == rpc.CLIENT_SIGNATURE_INVALID, (name, reply)
            ok = await c.call("message.v2.pull", sign())
            assert ok["result"]["cursor_scope"] == "peer"
            # `_`-prefixed keys are outside the hash, the 16-hex SPKI fingerprint names the cert too
            extra = dict(sign(cert_fingerprint=pki.spki_fingerprint(a.cert.public_key(), 16)), _trace="t")
            assert "result" in await c.call("message.v2.pull", extra)


async def test_client_signature_unicode_digit_timestamp(devnet_inproc, alice, bob):
    """Regression: a timestamp of non-ASCII digits ('\u00b2') passed isdigit() and int() raised: close 1011."""
    with trio.fail_after(DEADLINE):
        async with connect(devnet_inproc.gateway_url, alice.token, "d1", "default", identity=alice.identity) as c:
            signed = signing.sign_params("message.v2.pull", pull_params(bob.aid), aid=alice.aid, key=alice.identity.key,
                                         cert_fingerprint=alice.identity.fingerprint)
            signed["client_signature"]["timestamp"] = "\u00b2"
            assert err_code(await c.call("message.v2.pull", signed)) == rpc.CLIENT_SIGNATURE_INVALID


# --- prekeys ------------------------------------------------------------------------------------------
def prekey_params(ik: ec.EllipticCurvePrivateKey, *, der: bool) -> dict:
    spk = pki.generate_key()
    spk_der = pki.spki_der(spk.public_key())
    spk_id = "sha256:" + hashlib.sha256(spk_der).hexdigest()[:16]
    ts = int(time.time())
    data = spk_der + spk_id.encode() + str(ts).encode()
    sig = pki.sign_der(ik, data) if der else pki.sign_raw(ik, data)
    return {"peer_aid": "", "key_source": "peer_device_prekey", "spk_id": spk_id, "spk_pk": pki.b64e(spk_der),
            "spk_signature": pki.b64e(sig), "spk_timestamp": ts}


async def test_put_peer_pk_wants_a_raw_signature(devnet_inproc, alice, bob):
    with trio.fail_after(DEADLINE):
        url = devnet_inproc.gateway_url
        async with connect(url, alice.token, "d1", "default", identity=alice.identity) as c:
            der = dict(prekey_params(alice.identity.key, der=True), peer_aid=alice.aid)
            assert err_code(await c.signed_call("message.v2.put_peer_pk", der)) == rpc.E2EE_PREKEY_INVALID
            wrong_id = dict(prekey_params(alice.identity.key, der=False), peer_aid=alice.aid, spk_id="sha256:" + "0" * 16)
            assert err_code(await c.signed_call("message.v2.put_peer_pk", wrong_id)) == rpc.E2EE_PREKEY_INVALID
            good = dict(prekey_params(alice.identity.key, der=False), peer_aid=alice.aid)
            result = (await c.signed_call("message.v2.put_peer_pk", good))["result"]
            assert result["success"] is True and result["spk_id"] == good["spk_id"]
        async with connect(url, bob.token, "d9", "default", identity=bob.identity) as c:
            boot = (await c.signed_call("message.v2.bootstrap", {"peer_aid": alice.aid}))["result"]
            assert [d["spk_id"] for d in boot["peer_devices"]] == [good["spk_id"]]
            assert boot["peer_devices"][0]["device_id"] == "d1"


# --- messages ------------------------------------------------------------------------------------------
async def test_duplicate_message_id_is_stored_once(devnet_inproc, alice, bob):
    with trio.fail_after(DEADLINE):
        url = devnet_inproc.gateway_url
        async with connect(url, alice.token, "d1", "default", identity=alice.identity) as c:
            send = {"to": bob.aid, "payload": {"type": "text", "text": "hi"}, "message_id": "m-dup-1"}
            first = (await c.signed_call("message.send", send))["result"]
            second = (await c.signed_call("message.send", dict(send, payload={"type": "text", "text": "other"})))["result"]
            assert first["status"] == "delivered" and second["status"] == "duplicate"
            assert second["seq"] == first["seq"] and second["message_id"] == "m-dup-1"
        async with connect(url, bob.token, "d1", "default", identity=bob.identity) as c:
            page = (await c.signed_call("message.v2.pull", pull_params(alice.aid)))["result"]
            assert [(m["message_id"], m["legacy_v1"]["payload"]["text"]) for m in page["messages"]] == [("m-dup-1", "hi")]
            assert page["head_seq"] == page["covered_through_seq"] == first["seq"]


# --- slot rules -----------------------------------------------------------------------------------------
async def test_second_long_connection_on_a_slot_kicks_the_first(devnet_inproc, alice):
    with trio.fail_after(DEADLINE):
        url = devnet_inproc.gateway_url
        async with connect(url, alice.token, "d1", "svc/a") as first, \
                connect(url, alice.token, "d2", "svc/a") as other_device, \
                connect(url, alice.token, "d1", "tools") as other_slot, \
                connect(url, alice.token, "d1", "svc/x", kind="short") as short:
            assert not first.events and await first.ping()  # none of those displaced it
            async with connect(url, alice.token, "d1", "svc:b") as second:  # same isolation key "svc"
                kick = await first.next_frame(lambda f: f.get("method") == "event/gateway.disconnect")
                assert kick["params"]["code"] == 4015
                assert await first.closed_code() == 4015
                assert await second.ping()
                for c in (other_device, other_slot, short):
                    assert await c.ping() and not c.events


async def test_refuse_policy(start_devnet):
    with trio.fail_after(DEADLINE):
        info = await start_devnet(slot_policy="refuse")
        url = info.gateway_url
        acct = await new_account(url, fresh_aid("dana"), root_ca=info.root_ca)
        async with connect(url, acct.token, "d1", "svc/a") as first:
            async with open_raw(url) as second:
                reply = await second.authenticate(acct.token, "d1", "svc:b")
                assert err_code(reply) == rpc.AUTH_FAILED
                assert "long_connection_already_exists" in reply["error"]["message"]
                assert reply["error"].get("data", {}).get("retryable") is True
                assert await second.closed_code() == 4001
            assert await first.ping() and not first.events
            async with connect(url, acct.token, "d2", "svc/a") as other_device:
                assert await other_device.ping()


async def test_eleventh_short_connection_is_refused(devnet_inproc, alice):
    with trio.fail_after(DEADLINE):
        url = devnet_inproc.gateway_url
        async with trio.open_nursery() as nursery:
            ready, release = trio.Semaphore(0), trio.Event()

            async def hold(slot: str) -> None:
                async with connect(url, alice.token, "d1", slot, kind="short") as c:
                    ready.release()
                    await release.wait()
                    assert await c.ping()

            for i in range(10):
                nursery.start_soon(hold, f"bulk/{i}")  # ten shorts on isolation key "bulk"
            for _ in range(10):
                await ready.acquire()
            async with open_raw(url) as eleventh:
                reply = await eleventh.authenticate(alice.token, "d1", "bulk:more", kind="short")
                assert err_code(reply) == rpc.RATE_LIMITED and "slot_conflict" in reply["error"]["message"]
                assert await eleventh.closed_code() in (1008, 4001)
            for slot, device, kind in (("other", "d1", "short"), ("bulk", "d2", "short"), ("bulk", "d1", "long")):
                async with connect(url, alice.token, device, slot, kind=kind) as c:
                    assert await c.ping()
            release.set()
        # with the ten gone, a short on that slot is accepted again
        async with connect(url, alice.token, "d1", "bulk", kind="short") as c:
            assert await c.ping()


async def test_delivery_mode_conflict(devnet_inproc, alice):
    with trio.fail_after(DEADLINE):
        url = devnet_inproc.gateway_url
        async with connect(url, alice.token, "d1", "default") as first:
            async with open_raw(url) as second:
                reply = await second.authenticate(alice.token, "d2", "default",
                                                  delivery_mode={"mode": "queue", "routing": "round_robin"})
                assert "delivery_mode_conflict" in reply["error"]["message"]
                assert await second.closed_code() == 4001
            assert await first.ping() and not first.events


# --- HTTP side endpoints ---------------------------------------------------------------------------------
def _card(account, heading: str) -> bytes:
    """`account`'s agent.md with body `heading`, signed with its key (what the devnet accepts)."""
    text = agent_md.default_document(account.aid) + f"\n{heading}\n"
    return agent_md.sign(text, account.identity.key, account.identity.cert).encode()


async def test_agent_md_etags(devnet_inproc, alice, bob):
    with trio.fail_after(DEADLINE):
        url = http_base(devnet_inproc.gateway_url) + "/agent.md"
        host = {"Host": alice.aid}
        auth = dict(host, Authorization=f"Bearer {alice.token}")
        v1, v2 = _card(alice, "alice v1"), _card(alice, "alice v2")
        assert (await http("GET", url, headers=host)).status == 404
        for token in (bob.token, "dat_nope", ""):  # another AID's token, a bad one, none
            headers = dict(host, Authorization=f"Bearer {token}", **{"If-None-Match": "*"})
            r = await http("PUT", url, headers=headers, body=v1)
            assert r.status == 401
        r = await http("PUT", url, headers=dict(auth, **{"If-None-Match": "*"}), body=v1)
        assert r.status == 200
        etag1 = r.json()["etag"]
        assert etag1 == '"' + hashlib.sha256(v1).hexdigest() + '"' and r.json()["last_modified"]  # fastaun's in_sync
        assert (await http("PUT", url, headers=dict(auth, **{"If-None-Match": "*"}), body=v2)).status == 412
        r = await http("GET", url, headers=host)
        assert (r.status, r.body, r.headers["etag"]) == (200, v1, etag1)
        r = await http("HEAD", url, headers=host)
        assert (r.status, r.body, r.headers["etag"]) == (200, b"", etag1)
        assert (await http("GET", url, headers=dict(host, **{"If-None-Match": etag1}))).status == 304
        assert (await http("HEAD", url, headers=dict(host, **{"If-None-Match": etag1}))).status == 304
        assert (await http("GET", url, headers=dict(host, **{"If-None-Match": '"other"'}))).status == 200
        assert (await http("PUT", url, headers=dict(auth, **{"If-Match": '"stale"'}), body=v2)).status == 412
        r = await http("PUT", url, headers=dict(auth, **{"If-Match": etag1}), body=v2)
        assert r.status == 200 and r.json()["etag"] != etag1
        assert (await http("GET", url, headers=host)).body == v2
        assert (await http("GET", url, headers={"Host": bob.aid})).status == 404  # per-AID documents


async def test_agent_md_uploads_are_verified_as_the_name_service_does(devnet_inproc, alice, bob):
    """PUT /agent.md: schema, sizes and the signature with the AID's current certificate; what
    fails is refused (400 invalid_agent_md / 413 agent_md_too_large, with the reason) and the
    published card stays."""
    with trio.fail_after(DEADLINE):
        url = http_base(devnet_inproc.gateway_url) + "/agent.md"
        auth = {"Host": alice.aid, "Authorization": f"Bearer {alice.token}"}
        good = _card(alice, "published")
        assert (await http("PUT", url, headers=auth, body=good)).status == 200
        payload, _, block = good.decode().partition(agent_md.MARKER)
        block = agent_md.MARKER + block
        unsigned = agent_md.default_document(alice.aid).encode()
        forged = payload + "\n".join([
            agent_md.MARKER, f"cert_fingerprint: {bob.identity.fingerprint}", f"timestamp: {int(time.time())}",
            f"signature: {pki.b64e(pki.sign_for_key(bob.identity.key, payload.encode()))}", "-->"])
        cases = [
            (payload.replace("published", "tampered") + block, 400, "signature.signature", "does not verify"),
            (_card(bob, "bob's").decode(), 400, "aid", f"is not {alice.aid}"),  # another AID's card
            (forged, 400, "signature.cert_fingerprint", "current certificate"),  # signed by bob's key
            (unsigned.decode(), 400, "signature", "no AUN-SIGNATURE"),
            ("# just markdown\n", 400, "front_matter", "front matter"),
            (payload.replace("# alice", "x" * 4100 + "\n# alice") + block, 413, "payload", "larger than 4096"),
            ("x" * 7000, 413, "document", "at most 6144"),
        ]
        for body, status, field, words in cases:
            r = await http("PUT", url, headers=auth, body=body.encode())
            assert r.status == status, (words, r.status, r.body)
            answer = r.json()
            assert answer["error"] == ("agent_md_too_large" if status == 413 else "invalid_agent_md")
            assert words in answer["message"] and answer["field"] == field, answer
        r = await http("GET", url, headers={"Host": alice.aid})
        assert r.body == good  # every refused upload left the published card as it was


async def test_pki_cert_lookup(devnet_inproc, alice):
    with trio.fail_after(DEADLINE):
        base = http_base(devnet_inproc.gateway_url) + "/pki/cert/"
        pem = pki.cert_pem(alice.identity.cert)
        r = await http("GET", base + alice.aid)
        assert r.status == 200 and pki.load_cert_pem(r.body) == alice.identity.cert
        r = await http("HEAD", base + alice.aid)
        assert r.status == 200 and r.body == b""
        der_hex = alice.identity.cert.fingerprint(hashes.SHA256()).hex()
        spki_hex = hashlib.sha256(pki.spki_der(alice.identity.cert.public_key())).hexdigest()
        for fp in (der_hex, der_hex[:16], spki_hex, spki_hex[:16], spki_hex.upper()):
            r = await http("GET", f"{base}{alice.aid}?cert_fingerprint=sha256:{fp}")
            assert r.status == 200 and r.body.decode() == pem, fp
        assert (await http("GET", f"{base}{alice.aid}?cert_fingerprint=sha256:{'0' * 64}")).status == 404
        assert (await http("GET", f"{base}{alice.aid}?cert_fingerprint=sha256:abc")).status == 400
        assert (await http("GET", base + fresh_aid("nobody"))).status == 404
        assert (await http("HEAD", base + fresh_aid("nobody"))).status == 404


async def test_pki_crl_and_ocsp(devnet_inproc, alice):
    with trio.fail_after(DEADLINE):
        base = http_base(devnet_inproc.gateway_url)
        chain = pki.split_pem_bundle((await http("GET", base + "/pki/chain")).body.decode())
        issuer, root = chain
        assert root == pki.load_cert_pem(devnet_inproc.root_ca.read_bytes())
        pki.verify_chain(alice.identity.cert, chain, [root])
        crl = x509.load_pem_x509_crl(json.loads((await http("GET", base + "/pki/crl.json")).body)["crl_pem"].encode())
        assert crl.issuer == issuer.subject and crl.is_signature_valid(issuer.public_key())
        assert crl.get_revoked_certificate_by_serial_number(alice.identity.cert.serial_number) is None
        serial = format(alice.identity.cert.serial_number, "x")
        r = (await http("GET", f"{base}/pki/ocsp/{serial}")).json()
        assert r["status"] == "good"
        resp = ocsp.load_der_ocsp_response(pki.b64d(r["ocsp_response"]))
        assert resp.response_status == ocsp.OCSPResponseStatus.SUCCESSFUL
        assert resp.certificate_status == ocsp.OCSPCertStatus.GOOD
        assert resp.serial_number == alice.identity.cert.serial_number
        issuer.public_key().verify(resp.signature, resp.tbs_response_bytes, ec.ECDSA(resp.signature_hash_algorithm))
        assert resp.issuer_key_hash == hashlib.sha256(
            issuer.public_key().public_bytes(serialization.Encoding.X962,
                                             serialization.PublicFormat.UncompressedPoint)).digest()
        assert (await http("GET", f"{base}/pki/ocsp/{'f' * 30}")).json()["status"] == "unknown"
        assert (await http("GET", f"{base}/health")).status == 200


# --- regressions: inputs that used to kill the connection with 1011 instead of an error reply ---------
async def test_escaped_lone_surrogate_is_rejected(devnet_inproc):
    """Regression: an escaped lone surrogate reached the handlers and died on .encode('utf-8'): close 1011."""
    with trio.fail_after(DEADLINE):
        async with open_raw(devnet_inproc.gateway_url) as c:
            await c.send_text('{"jsonrpc":"2.0","id":7,"method":"auth.refresh_token",'
                              '"params":{"aid":"alice-x1.aid.test","refresh_token":"\\ud800"}}')
            reply = await c.next_frame(lambda f: "error" in f and f.get("id") in (7, None))
            assert reply["error"]["code"] in (rpc.PARSE_ERROR, rpc.INVALID_REQUEST, rpc.INVALID_PARAMS)
            assert err_code(await c.call("meta.ping", {})) == rpc.SESSION_REQUIRED  # still serving


async def test_overflowing_float_is_rejected(devnet_inproc, alice, bob):
    """Regression: 1e400 parsed to inf, was stored as 'Infinity' and every later pull of that sender died (1011)."""
    with trio.fail_after(DEADLINE):
        url = devnet_inproc.gateway_url
        async with connect(url, alice.token, "d1", "default", identity=alice.identity) as c:
            signed = signing.sign_params("message.send", {"to": bob.aid, "payload": {"type": "text", "x": float("inf")},
                                                          "message_id": "m-inf"},
                                         aid=alice.aid, key=alice.identity.key, cert_fingerprint=alice.identity.fingerprint)
            text = json.dumps({"jsonrpc": "2.0", "id": 1, "method": "message.send", "params": signed})
            await c.send_text(text.replace("Infinity", "1e400"))
            reply = await c.next_frame(lambda f: f.get("id") in (1, None))
            pulled = None
            async with connect(url, bob.token, "d1", "default", identity=bob.identity) as b:
                try:
                    pulled = await b.signed_call("message.v2.pull", pull_params(alice.aid), timeout=5)
                except ConnectionClosed as exc:
                    pulled = {"closed": exc.reason.code}
            assert "error" in reply, reply
            assert "result" in pulled, pulled


async def test_public_key_on_unknown_curve_is_invalid_params(devnet_inproc):
    """cryptography raises UnsupportedAlgorithm (not ValueError) for an unknown curve: still -32602."""
    with trio.fail_after(DEADLINE):
        spki = pki.spki_der(pki.generate_key().public_key())
        bad = spki.replace(bytes.fromhex("2a8648ce3d030107"), bytes.fromhex("2a8648ce3d030109"))
        async with open_raw(devnet_inproc.gateway_url) as c:
            for key in (bad, b"\x30\x03\x02\x01\x00", pki.spki_der(ec.generate_private_key(ec.SECP384R1()).public_key())):
                reply = await c.call("auth.create_aid", {"aid": fresh_aid("curve"), "public_key": pki.b64e(key),
                                                         "curve": "P-256"})
                assert err_code(reply) == rpc.INVALID_PARAMS, reply
            assert err_code(await c.call("meta.ping", {})) == rpc.SESSION_REQUIRED


async def test_deep_payload_near_the_recursion_limit(devnet_inproc, alice, bob):
    """Regression: a payload nested just below the parser's recursion limit was stored, then re-encoding it
    for the push raised RecursionError in the sender's handler (close 1011)."""
    with trio.fail_after(DEADLINE):
        url = devnet_inproc.gateway_url
        a = alice.identity
        async with connect(url, bob.token, "d1", "default") as receiver, \
                connect(url, alice.token, "d1", "default", identity=a) as sender:
            receiver.loads = json.loads  # its pushes nest deeper than a strict parser takes: see the next test
            outcomes = set()
            for depth in [*range(2, 140, 3), *range(800, 1200, 7)]:
                await sender.send_text(deep_send_frame(a, bob.aid, depth, f"m-deep-{depth}", depth))
                try:
                    reply = await sender.next_frame(lambda f: f.get("id") in (depth, None), timeout=5)
                except ConnectionClosed as exc:
                    outcomes.add(f"closed {exc.reason.code}")
                    break
                outcomes.add("stored" if "result" in reply else f"error {reply['error']['code']}")
            assert "stored" in outcomes and all(not o.startswith("closed") for o in outcomes), outcomes
            assert await sender.ping() and await receiver.ping()


def deep_send_frame(a, to: str, depth: int, message_id: str, id: int) -> str:
    """A signed message.send whose payload nests `depth` objects, written by hand (json.dumps can't go deep)."""
    payload = '{"a":' * depth + '{"type":"text"}' + "}" * depth
    body = '{"message_id":"%s","payload":%s,"to":"%s"}' % (message_id, payload, to)
    ts = str(int(time.time()))
    digest = hashlib.sha256(body.encode()).hexdigest()
    sig = {"aid": a.aid, "cert_fingerprint": a.fingerprint, "timestamp": ts, "params_hash": digest,
           "signature": pki.b64e(pki.sign_der(a.key, f"message.send|{a.aid}|{ts}|{digest}".encode()))}
    return '{"jsonrpc":"2.0","id":%d,"method":"message.send","params":%s,"client_signature":%s}}' % (
        id, body[:-1], json.dumps(sig))


async def test_every_accepted_message_is_deliverable_to_a_strict_client(devnet_inproc, alice, bob):
    with trio.fail_after(DEADLINE):
        url = devnet_inproc.gateway_url
        async with connect(url, bob.token, "d1", "default", identity=bob.identity) as receiver, \
                connect(url, alice.token, "d1", "default", identity=alice.identity) as sender:
            receiver.loads = json.loads  # read everything, then judge it with the strict parser
            deepest = None
            for depth in range(rpc.MAX_DEPTH + 2, 0, -1):  # the deepest payload the devnet accepts
                await sender.send_text(deep_send_frame(alice.identity, bob.aid, depth, f"m-depth-{depth}", depth))
                reply = await sender.next_frame(lambda f: f.get("id") in (depth, None))
                if "result" in reply:
                    deepest = depth
                    break
            assert deepest is not None
            push = await receiver.next_frame(lambda f: f.get("params", {}).get("message_id") == f"m-depth-{deepest}")
            page = await receiver.signed_call("message.v2.pull", pull_params(alice.aid))
            for frame in (push, page):
                rpc.loads(json.dumps(frame))  # what aund's client would do with the frame
