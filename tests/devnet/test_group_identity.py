"""Group identities on the devnet (aund/devnet/group_identity.py) with raw clients: named groups,
bind / renew and their refusals, the authoritative certificate endpoint, the group's card (PUT by
the owner, signed by the group key; the owner projection on GET), the admission, dissolution and
owner transfer. fastaun drives the same wire end to end in tests/interop/test_group_identity_fastaun.py."""
from __future__ import annotations

import hashlib
import json
import secrets
import time
from typing import Any
from urllib.parse import quote

import pytest

from aund.aun import codes
from aund.aun import jsonrpc as rpc
from aund.devnet import groups
from aund.identity import agent_md, pki
from tests.devnet.rawclient import CAPABILITIES, http, http_base, open_raw
from tests.devnet.test_groups import code, make_group, open_world

pytestmark = pytest.mark.timeout(60)
DECLARING = {**CAPABILITIES, "agent_md_validation_v1": True}


def keypair() -> tuple[Any, str]:
    key = pki.generate_key()
    return key, pki.public_key_b64(key.public_key())


def proof(key, *parts: str, nonce: str | None = None, issued_ms: int | None = None) -> dict[str, Any]:
    """A {nonce, issued_ms, signature} proof the way the SDK signs one: `parts|nonce|issued_ms`."""
    nonce = nonce or secrets.token_hex(16)
    issued_ms = int(time.time() * 1000) if issued_ms is None else issued_ms
    canonical = "|".join([*parts, nonce, str(issued_ms)])
    return {"nonce": nonce, "issued_ms": issued_ms, "signature": pki.b64e(pki.sign_der(key, canonical.encode()))}


def sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def renew_params(gid: str, old_key, old_b64: str, new_b64: str, **proof_kw: Any) -> dict[str, Any]:
    return {"group_id": gid, "group_aid": gid, "old_public_key": old_b64, "new_public_key": new_b64, "curve": "P-256",
            "renew_proof": proof(old_key, "aun-group-aid-renew-v1", gid, gid, sha(old_b64), sha(new_b64), **proof_kw)}


async def bound_group(w, owner: str = "owner", **params: Any) -> tuple[str, Any, str, dict[str, Any]]:
    """An anonymous group of `owner` with its identity: (gid, group key, its base64, bind result)."""
    gid = await make_group(w, owner, **params)
    key, b64 = keypair()
    bound = await w.ok(owner, "group.bind_group_aid", {"group_id": gid, "public_key": b64, "curve": "P-256"})
    return gid, key, b64, bound


def card(gid: str, owner: str, key, cert, *, fingerprint: str | None = None, co_signer=None) -> bytes:
    """The group's agent.md as fastaun builds it, signed by the group key (and by the owner with `co_signer`)."""
    payload = (f'---\naid: "{gid}"\nname: "Team"\ntype: "group"\nowner: "{owner}"\n'
               f'entity_cert_fingerprint: "{fingerprint or pki.cert_fingerprint(cert)}"\nversion: "1.0.0"\n'
               f'description: "a test group"\n---\n\n# Team\n')
    text = payload + _block(payload, key, cert, gid)
    if co_signer is not None:
        okey, ocert, oaid = co_signer
        text += "\n" + _block(text + "\n", okey, ocert, oaid)
    return text.encode()


def _block(signed: str, key, cert, signer: str) -> str:
    signature = pki.b64e(pki.sign_der(key, signed.encode()))
    return "\n".join([agent_md.MARKER, f"cert_fingerprint: {pki.cert_fingerprint(cert)}",
                      f"public_key_fingerprint: {pki.spki_fingerprint(cert.public_key())}", f"signer_aid: {signer}",
                      f"timestamp: {int(time.time())}", f"signature: {signature}", "-->"])


async def put_card(info, gid: str, token: str, body: bytes, **headers: str):
    return await http("PUT", http_base(info.gateway_url) + "/agent.md", body=body,
                      headers={"Host": gid, "Authorization": f"Bearer {token}", **headers})


async def get_card(info, gid: str):
    return await http("GET", http_base(info.gateway_url) + "/agent.md", headers={"Host": gid, "X-AUN-Ownership-Check": "1"})


async def cert_of(info, aid: str, query: str = ""):
    return await http("GET", http_base(info.gateway_url) + f"/pki/cert/{quote(aid)}{query}")


def projection(reply) -> dict[str, str]:
    return {k: reply.headers.get(k, "") for k in ("x-aun-entity-owner-aid", "x-aun-entity-cert-fingerprint",
                                                  "x-aun-ownership-status", "x-aun-entity-verification-status")}


# --- named groups -----------------------------------------------------------------------------------
async def test_named_create_issues_the_group_certificate_and_refuses_a_taken_name(devnet_inproc):
    info = devnet_inproc
    async with open_world(info) as w:
        for name in ("owner", "other"):
            await w.add(name)
        key, b64 = keypair()
        name = f"team-{secrets.token_hex(3)}"
        created = await w.ok("owner", "group.create", {"group_name": name, "public_key": b64, "curve": "P-256"})
        gid = f"{name}.aid.test"
        group, aid_cert = created["group"], created["aid_cert"]
        assert (group["group_id"], group["group_aid"], group["owner_aid"]) == (gid, gid, w.aid("owner"))
        assert group["name"] == name  # no display name given: the group name
        cert = pki.load_cert_pem(aid_cert["cert"])
        assert pki.cert_aid(cert) == gid and pki.spki_der(cert.public_key()) == pki.spki_der(key.public_key())
        assert aid_cert["key_purpose"] == "group_identity" and aid_cert["curve"] == "P-256"
        root = pki.load_cert_pem(info.root_ca.read_bytes())
        pki.verify_chain(cert, [pki.load_cert_pem(p) for p in aid_cert["ca_chain"]], [root])
        again = await w.ok("owner", "group.create", {"group_name": name.upper(), "public_key": b64})  # the SDK's retry
        assert again["aid_cert"]["cert"] == aid_cert["cert"]
        _, other_b64 = keypair()
        for who, pub in (("other", b64), ("other", other_b64), ("owner", other_b64)):
            reply = await w.call(who, "group.create", {"group_name": name, "public_key": pub})
            assert code(reply) == groups.GROUP_STATE_INVALID and "already taken" in reply["error"]["message"], reply
        taken_by_agent = w.aid("other").split(".")[0]  # an agent AID of that name exists
        reply = await w.call("owner", "group.create", {"group_name": taken_by_agent, "public_key": other_b64})
        assert code(reply) == groups.GROUP_STATE_INVALID, reply
        for bad in ({"group_name": name + "x"}, {"public_key": b64}, {"group_name": "g-abcd", "public_key": b64},
                    {"group_name": "ab", "public_key": b64}, {"group_name": "12345", "public_key": b64},
                    {"group_name": "okname", "public_key": "bm90IGEga2V5"},
                    {"group_name": "okname", "public_key": b64, "curve": "P-384"},
                    {"group_name": "okname", "public_key": b64, "group_aid": "other.aid.test"}):
            assert code(await w.call("owner", "group.create", bad)) == rpc.INVALID_PARAMS, bad


# --- bind and renew ---------------------------------------------------------------------------------
async def test_bind_is_idempotent_for_the_same_key_and_refused_otherwise(devnet_inproc):
    async with open_world(devnet_inproc) as w:
        for name in ("owner", "alice", "carol"):
            await w.add(name)
        gid = await make_group(w, members=("alice",))
        _, b64 = keypair()
        assert code(await w.call("alice", "group.bind_group_aid", {"group_id": gid, "public_key": b64})) \
            == groups.ROLE_INSUFFICIENT
        assert code(await w.call("carol", "group.bind_group_aid", {"group_id": gid, "public_key": b64})) \
            == groups.NOT_MEMBER
        bound = await w.ok("owner", "group.bind_group_aid", {"group_id": gid, "public_key": b64, "curve": "P-256"})
        assert bound["status"] == "bound" and bound["group"]["group_aid"] == gid
        again = await w.ok("owner", "group.bind_group_aid", {"group_id": gid, "public_key": b64})
        assert again["status"] == "already_bound" and again["aid_cert"]["cert"] == bound["aid_cert"]["cert"]
        _, other = keypair()
        reply = await w.call("owner", "group.bind_group_aid", {"group_id": gid, "public_key": other})
        assert code(reply) == rpc.CONFLICT and reply["error"]["data"]["code"] == "group_aid_already_bound_different_key"
        for bad in ({"group_id": gid}, {"group_id": gid, "public_key": 5}, {"group_id": gid, "public_key": "!!"},
                    {"group_id": gid, "public_key": b64, "group_aid": "g-other1.aid.test"}, {"public_key": b64}):
            assert code(await w.call("owner", "group.bind_group_aid", bad)) == rpc.INVALID_PARAMS, bad
        assert code(await w.call("owner", "group.bind_group_aid", {"group_id": "g-nosuch1.aid.test",
                                                                    "public_key": b64})) == groups.GROUP_NOT_FOUND


async def test_renew_checks_its_proof_and_keeps_the_old_certificate_revoked_in_history(devnet_inproc):
    info = devnet_inproc
    async with open_world(info) as w:
        for name in ("owner", "alice"):
            await w.add(name)
        gid, key, b64, bound = await bound_group(w, members=("alice",))
        old_cert = pki.load_cert_pem(bound["aid_cert"]["cert"])
        new_key, new_b64 = keypair()
        stranger, _ = keypair()
        now = int(time.time() * 1000)
        cases = [
            (renew_params(gid, stranger, b64, new_b64), rpc.CLIENT_SIGNATURE_INVALID, "does not verify"),  # bad proof
            (renew_params(gid, key, b64, new_b64, issued_ms=now - 301_000), rpc.CLIENT_SIGNATURE_INVALID, "window"),
            (renew_params(gid, key, b64, new_b64, issued_ms=now + 301_000), rpc.CLIENT_SIGNATURE_INVALID, "window"),
            (renew_params(gid, key, new_b64, b64), rpc.CONFLICT, "old_public_key"),  # wrong old key
            (renew_params(gid, key, b64, b64), rpc.INVALID_PARAMS, "differ"),
            (dict(renew_params(gid, key, b64, new_b64), renew_proof="x"), rpc.INVALID_PARAMS, "renew_proof"),
            (dict(renew_params(gid, key, b64, new_b64), renew_proof={"nonce": "short", "issued_ms": now,
                                                                      "signature": "AA=="}), rpc.INVALID_PARAMS, "nonce"),
        ]
        for params, expected, words in cases:
            reply = await w.call("owner", "group.renew_group_aid", params)
            assert code(reply) == expected and words in reply["error"]["message"], (words, reply)
        params = renew_params(gid, key, b64, new_b64)
        assert code(await w.call("alice", "group.renew_group_aid", params)) == groups.ROLE_INSUFFICIENT
        renewed = await w.ok("owner", "group.renew_group_aid", params)
        new_cert = pki.load_cert_pem(renewed["aid_cert"]["cert"])
        assert renewed["old_cert_revoked"] is True and renewed["status"] == "renewed"
        assert pki.spki_der(new_cert.public_key()) == pki.spki_der(new_key.public_key())
        replay = await w.call("owner", "group.renew_group_aid", dict(renew_params(gid, new_key, new_b64, b64),
                                                                      renew_proof=proof(
            new_key, "aun-group-aid-renew-v1", gid, gid, sha(new_b64), sha(b64), nonce=params["renew_proof"]["nonce"])))
        assert code(replay) == rpc.CLIENT_SIGNATURE_INVALID and "already used" in replay["error"]["message"], replay
        current = await cert_of(info, gid, "?consistency=authoritative&key_purpose=group_identity")
        assert current.status == 200 and pki.load_cert_pem(current.body) == new_cert
        assert current.headers["x-aun-cert-lifecycle-state"] == "active_signing"
        old = await cert_of(info, gid, f"?cert_fingerprint={pki.cert_fingerprint(old_cert)}&consistency=authoritative")
        assert old.status == 200 and old.headers["x-aun-cert-lifecycle-state"] == "revoked"
        ocsp = (await http("GET", http_base(info.gateway_url) + f"/pki/ocsp/{format(old_cert.serial_number, 'x')}")).json()
        assert ocsp["status"] == "revoked"
        no_identity = await make_group(w)
        assert code(await w.call("owner", "group.renew_group_aid", renew_params(no_identity, key, b64, new_b64))) \
            == groups.GROUP_STATE_INVALID


# --- /pki/cert --------------------------------------------------------------------------------------
async def test_the_authoritative_certificate_endpoint_answers_the_lifecycle_headers(devnet_inproc):
    info = devnet_inproc
    async with open_world(info) as w:
        await w.add("owner")
        gid, _, _, bound = await bound_group(w)
        account = w.accounts["owner"]
        fp = account.identity.fingerprint
        agent = await cert_of(info, account.aid, f"?cert_fingerprint={fp}&consistency=authoritative")
        assert agent.status == 200 and agent.headers["x-aun-cert-consistency"] == "authoritative"
        assert agent.headers["x-aun-cert-fingerprint"] == fp and agent.headers["x-aun-cert-key-purpose"] == "signing"
        assert agent.headers["x-aun-cert-lifecycle-state"] == "active_signing"
        observed = agent.headers["x-aun-cert-observed-at"]
        assert observed.endswith("Z") and abs(time.mktime(time.strptime(observed[:19], "%Y-%m-%dT%H:%M:%S"))
                                              - time.mktime(time.gmtime())) < 30
        assert (await cert_of(info, account.aid, "?consistency=authoritative&key_purpose=group_identity")).status == 404
        group = await cert_of(info, gid, "?consistency=authoritative&key_purpose=group_identity")
        assert group.status == 200 and group.headers["x-aun-cert-key-purpose"] == "group_identity"
        assert group.body.decode() == bound["aid_cert"]["cert"]
        plain = await cert_of(info, gid)
        assert plain.status == 200 and "x-aun-cert-consistency" not in plain.headers
        for query in ("?consistency=eventual", "?key_purpose=org_identity", "?cert_fingerprint=sha256:zz"):
            assert (await cert_of(info, gid, query)).status == 400, query


# --- the group's card -------------------------------------------------------------------------------
async def test_the_card_is_put_by_the_owner_signed_by_the_group_and_projected_on_get(devnet_inproc):
    info = devnet_inproc
    async with open_world(info) as w:
        for name in ("owner", "alice"):
            await w.add(name)
        gid, key, _, bound = await bound_group(w, members=("alice",))
        cert = pki.load_cert_pem(bound["aid_cert"]["cert"])
        owner, alice = w.accounts["owner"], w.accounts["alice"]
        expected = {"x-aun-entity-owner-aid": owner.aid, "x-aun-entity-cert-fingerprint": pki.cert_fingerprint(cert),
                    "x-aun-ownership-status": "not_applicable", "x-aun-entity-verification-status": "current"}
        missing = await get_card(info, gid)
        assert missing.status == 404 and projection(missing) == expected and "etag" not in missing.headers
        body = card(gid, owner.aid, key, cert)
        other_key, _ = keypair()
        refusals = [
            (alice.token, body, 403, "not_group_owner"),                      # a member is not the owner
            ("nope", body, 401, None),
            (owner.token, card(gid, alice.aid, key, cert), 409, agent_md.GENERATION),     # another owner named
            (owner.token, card(gid, owner.aid, key, cert, fingerprint="sha256:" + "ab" * 32), 409,
             agent_md.GENERATION),                                            # wrong certificate generation
            (owner.token, card(gid, owner.aid, other_key, cert), 400, agent_md.INVALID),  # not the group key
            (owner.token, card(gid, owner.aid, owner.identity.key, owner.identity.cert), 409, agent_md.GENERATION),
            (owner.token, agent_md.sign(agent_md.default_document(gid), key, cert).encode(), 400, agent_md.INVALID),
        ]
        for token, doc, status, error in refusals:
            reply = await put_card(info, gid, token, doc, **{"If-None-Match": "*"})
            assert reply.status == status, (status, error, reply.status, reply.body[:300])
            if error:
                assert reply.json()["error"] == error, reply.json()
        assert (await get_card(info, gid)).status == 404  # nothing was stored
        put = await put_card(info, gid, owner.token, body, **{"If-None-Match": "*"})
        assert put.status == 200, put.body
        got = await get_card(info, gid)
        assert got.status == 200 and got.body == body and projection(got) == expected
        assert got.headers["etag"] == '"' + hashlib.sha256(body).hexdigest() + '"'
        co_signed = card(gid, owner.aid, key, cert, co_signer=(owner.identity.key, owner.identity.cert, owner.aid))
        assert (await put_card(info, gid, owner.token, co_signed, **{"If-Match": got.headers["etag"]})).status == 200
        forged = card(gid, owner.aid, key, cert, co_signer=(alice.identity.key, alice.identity.cert, owner.aid))
        assert (await put_card(info, gid, owner.token, forged)).status == 400  # an owner block not by the owner
        plain = await http("GET", http_base(info.gateway_url) + "/agent.md", headers={"Host": gid})
        assert plain.status == 200 and "x-aun-entity-owner-aid" not in plain.headers


# --- admission, dissolution, transfer --------------------------------------------------------------
async def test_admission_needs_the_group_certificate_then_its_card(start_devnet):
    info = await start_devnet(group_identity_check=True, agent_md_check=False, group_card_grace=0.0)
    async with open_world(info) as w:
        await w.add("owner")
        gid = await make_group(w)
        lenient = await w.call("owner", "group.get_members", {"group_id": gid})  # does not declare: served
        assert "result" in lenient, lenient
        owner = w.accounts["owner"]
        async with open_raw(info.gateway_url) as c:
            assert (await c.authenticate(owner.token, "d2", "main", capabilities=DECLARING))["result"]["status"] == "ok"
            c.identity = owner.identity
            refused = await c.call("group.get_members", {"group_id": gid})
            assert code(refused) == codes.AGENT_MD_REQUIRED
            assert refused["error"]["message"] == f"valid group identity certificate is required for {gid}"
            assert "result" in await c.call("group.get_info", {"group_id": gid})  # exempt: reading what it is
            key, b64 = keypair()
            bound = await c.signed_call("group.bind_group_aid", {"group_id": gid, "public_key": b64})
            assert "result" in bound, bound
            refused = await c.call("group.get_members", {"group_id": gid})
            assert refused["error"]["message"] == f"valid group agent.md is required for {gid}"
            cert = pki.load_cert_pem(bound["result"]["aid_cert"]["cert"])
            assert (await put_card(info, gid, owner.token, card(gid, owner.aid, key, cert))).status == 200
            assert "result" in await c.call("group.get_members", {"group_id": gid})


async def test_dissolve_revokes_and_transfer_moves_the_projection_and_rekeys(devnet_inproc):
    info = devnet_inproc
    async with open_world(info) as w:
        for name in ("owner", "alice"):
            await w.add(name)
        gid, key, _, bound = await bound_group(w, members=("alice",))
        owner, alice = w.accounts["owner"], w.accounts["alice"]
        cert = pki.load_cert_pem(bound["aid_cert"]["cert"])
        assert (await put_card(info, gid, owner.token, card(gid, owner.aid, key, cert))).status == 200
        reply = await w.call("owner", "group.transfer_owner", {"group_id": gid, "new_owner": alice.aid})
        assert code(reply) == rpc.INVALID_PARAMS and "transfer_auth" in reply["error"]["message"]  # the group key's consent
        auth = proof(key, "aun-group-owner-transfer-v1", gid, gid, alice.aid)
        await w.ok("owner", "group.transfer_owner", {"group_id": gid, "group_aid": gid, "new_owner": alice.aid,
                                                     "transfer_auth": auth})
        new_key, new_b64 = keypair()
        accept = proof(alice.identity.key, "aun-group-owner-transfer-accept-v1", gid, gid, alice.aid, sha(new_b64))
        wrong = proof(owner.identity.key, "aun-group-owner-transfer-accept-v1", gid, gid, alice.aid, sha(new_b64))
        reply = await w.call("alice", "group.complete_transfer", {"group_id": gid, "group_aid": gid,
                                                                  "public_key": new_b64, "transfer_accept": wrong})
        assert code(reply) == rpc.CLIENT_SIGNATURE_INVALID, reply
        done = await w.ok("alice", "group.complete_transfer", {"group_id": gid, "group_aid": gid, "public_key": new_b64,
                                                               "curve": "P-256", "transfer_accept": accept})
        new_cert = pki.load_cert_pem(done["aid_cert"]["cert"])
        assert pki.spki_der(new_cert.public_key()) == pki.spki_der(new_key.public_key())
        got = await get_card(info, gid)  # the stored card names the old owner and certificate
        assert projection(got) == {"x-aun-entity-owner-aid": alice.aid,
                                   "x-aun-entity-cert-fingerprint": pki.cert_fingerprint(new_cert),
                                   "x-aun-ownership-status": "not_applicable",
                                   "x-aun-entity-verification-status": "stale"}
        assert (await put_card(info, gid, owner.token, card(gid, alice.aid, new_key, new_cert))).status == 403
        assert (await put_card(info, gid, alice.token, card(gid, alice.aid, new_key, new_cert))).status == 200
        assert projection(await get_card(info, gid))["x-aun-entity-verification-status"] == "current"
        await w.ok("alice", "group.dissolve", {"group_id": gid})
        serial = format(new_cert.serial_number, "x")
        assert (await http("GET", http_base(info.gateway_url) + f"/pki/ocsp/{serial}")).json()["status"] == "revoked"
        dissolved = await get_card(info, gid)
        assert projection(dissolved)["x-aun-entity-verification-status"] == "dissolved"
        reply = await put_card(info, gid, alice.token, card(gid, alice.aid, new_key, new_cert))
        assert reply.status == 403 and reply.json()["error"] == "group_dissolved"
        assert code(await w.call("alice", "group.bind_group_aid", {"group_id": gid, "public_key": new_b64})) \
            == groups.GROUP_STATE_INVALID
        status = await cert_of(info, gid, "?consistency=authoritative&key_purpose=group_identity")
        assert status.headers["x-aun-cert-lifecycle-state"] == "revoked"
        assert json.loads((await http("GET", http_base(info.gateway_url) + "/health")).body)["status"] == "ok"


# --- fuzz ---------------------------------------------------------------------------------------------
FUZZ_EXAMPLES = 300


async def test_fuzz_group_identity_params_and_cards(devnet_inproc):
    """Random and mutated params of the group identity RPCs and mutated cards / certificate queries:
    a JSON-RPC error or a result, an HTTP 4xx or 2xx, never a crash (the connection stays up)."""
    import trio
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    info = devnet_inproc
    async with open_world(info) as w:
        for name in ("owner", "alice"):
            await w.add(name)
        gid, key, b64, bound = await bound_group(w, members=("alice",))
        cert = pki.load_cert_pem(bound["aid_cert"]["cert"])
        owner = w.accounts["owner"]
        _, new_b64 = keypair()
        good = {
            "group.create": {"group_name": "fuzzteam", "public_key": new_b64, "curve": "P-256", "name": "F"},
            "group.bind_group_aid": {"group_id": gid, "public_key": b64, "curve": "P-256"},
            "group.renew_group_aid": renew_params(gid, key, b64, new_b64),
            "group.transfer_owner": {"group_id": gid, "new_owner": w.aid("alice"),
                                     "transfer_auth": proof(key, "aun-group-owner-transfer-v1", gid, gid, w.aid("alice"))},
            "group.complete_transfer": {"group_id": gid, "public_key": new_b64, "transfer_accept": {}},
        }
        body = card(gid, owner.aid, key, cert).decode()
        scalars = st.one_of(st.none(), st.booleans(), st.integers(-(2**53 - 1), 2**53 - 1),
                            st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=40),
                            st.sampled_from([gid, b64, new_b64, "P-384", "", "g-x.aid.test", owner.aid]))
        values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                               st.dictionaries(st.text(max_size=10), inner, max_size=4)),
                              max_leaves=8)

        @st.composite
        def rpc_case(draw):
            method = draw(st.sampled_from(sorted(good)))
            params = dict(good[method])
            for k in draw(st.lists(st.sampled_from(sorted({k for p in good.values() for k in p}) + ["nonce", "x"]),
                                   max_size=3)):
                params[k] = draw(values)
            if draw(st.booleans()) and isinstance(params.get("renew_proof"), dict):
                params["renew_proof"] = {k: draw(values) if draw(st.booleans()) else v
                                         for k, v in params["renew_proof"].items()}
            return ("rpc", method, params)

        @st.composite
        def http_case(draw):
            if draw(st.booleans()):
                at = draw(st.integers(0, len(body)))
                cut = draw(st.integers(0, 40))
                mutated = body[:at] + draw(st.text(max_size=20)) + body[at + cut:]
                return ("put", mutated.encode("utf-8", "surrogatepass"))
            query = draw(st.dictionaries(st.sampled_from(["cert_fingerprint", "consistency", "key_purpose", "x"]),
                                         st.one_of(st.text(alphabet="abcdef0123456789:sha-_", max_size=70),
                                                   st.sampled_from(["authoritative", "group_identity", "signing"])),
                                         max_size=3))
            return ("cert", "&".join(f"{k}={quote(v)}" for k, v in query.items()))

        seen = {"n": 0}

        async def example(case) -> None:
            seen["n"] += 1
            if case[0] == "rpc":
                reply = await w.call("owner", case[1], case[2])
                assert ("result" in reply) != ("error" in reply), reply
                if "error" in reply:
                    assert isinstance(reply["error"]["code"], int) and reply["error"]["message"], reply
            elif case[0] == "put":
                reply = await put_card(info, gid, owner.token, case[1])
                assert reply.status in (200, 400, 403, 409, 412, 413), (reply.status, reply.body[:200])
            else:
                reply = await cert_of(info, gid, "?" + case[1])
                assert reply.status in (200, 400, 404), (reply.status, reply.body[:200])
            assert await w.conns["owner"].ping()

        def run_hypothesis() -> None:
            @settings(max_examples=FUZZ_EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
            @given(case=st.one_of(rpc_case(), http_case()))
            def fuzz(case):
                trio.from_thread.run(example, case)

            fuzz()

        with trio.fail_after(50):
            await trio.to_thread.run_sync(run_hypothesis)
        assert seen["n"] >= FUZZ_EXAMPLES
        assert await w.conns["alice"].ping()
