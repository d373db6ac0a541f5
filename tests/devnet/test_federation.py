"""Federation between devnets of different issuers (aund/devnet/federation.py): what the
federation endpoints refuse, a fuzz of their decoders, and a group call whose home is unreachable.

Two in-process devnets on loopback; the end-to-end group and P2P traffic across them, judged by
fastaun, is in tests/system/test_public_shape.py.
"""
from __future__ import annotations

import json
import random
import secrets
from typing import Any

import pytest
import trio

from aund.aun import jsonrpc as rpc
from tests.devnet.rawclient import connect, http, http_base, new_account

pytestmark = pytest.mark.timeout(90)
DEAD = "http://127.0.0.1:9"  # discard port: nothing listens there
ALLOWED = {200, 400, 403, 404, 413}


async def _pair(start_devnet):
    a = await start_devnet(issuer="aid.test", federate={"other.test": DEAD})
    b = await start_devnet(issuer="other.test", federate={"aid.test": DEAD})
    a.devnet.federation["other.test"] = http_base(b.gateway_url)
    b.devnet.federation["aid.test"] = http_base(a.gateway_url)
    return a, b


async def _post(info, path: str, body: Any) -> tuple[int, dict[str, Any]]:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    reply = await http("POST", http_base(info.gateway_url) + path, body=raw,
                       headers={"Content-Type": "application/json"})
    try:
        answer = json.loads(reply.body or b"{}")
    except ValueError:
        answer = {"raw": reply.body[:200]}
    return reply.status, answer


def _group_call(aid: str, method: str, params: dict[str, Any]) -> dict[str, Any]:
    return {"actor": {"aid": aid, "device_id": "d1", "slot_id": ""}, "material": {"cert": None, "devices": []},
            "method": method, "params": params}


async def test_federation_endpoints_refuse_what_is_not_theirs(start_devnet):
    a, _ = await _pair(start_devnet)
    with trio.fail_after(30):
        local = f"x-{secrets.token_hex(3)}.aid.test"
        status, answer = await _post(a, "/federation/v1/group", _group_call(local, "group.get_info",
                                                                            {"group_id": "g-abcd.aid.test"}))
        assert status == 403 and "does not federate" in answer["error"]  # a local AID never comes this way
        foreign = f"y-{secrets.token_hex(3)}.other.test"
        status, answer = await _post(a, "/federation/v1/group", _group_call(foreign, "group.get_info",
                                                                            {"group_id": "g-abcd.third.test"}))
        assert status == 404 and "does not live here" in answer["error"]
        status, answer = await _post(a, "/federation/v1/group", _group_call(foreign, "group.create", {"name": "n"}))
        assert status == 400 and "not a federated group method" in answer["error"]
        status, answer = await _post(a, "/federation/v1/group", _group_call(foreign, "group.get_info",
                                                                            {"group_id": "g-abcd.aid.test"}))
        assert status == 403 and "no current certificate" in answer["error"]  # its devnet vouched for nothing
        status, answer = await _post(a, "/federation/v1/push", {"aid": foreign, "method": "group.changed",
                                                                "params": {"group_id": "g-abcd.other.test"}})
        assert status == 400  # pushes are for local AIDs only
        status, answer = await _post(a, "/federation/v1/push", {"aid": local, "method": "group.changed",
                                                                "params": {"group_id": "g-abcd.third.test"}})
        assert status == 403  # from a group of an issuer we do not federate with
        status, answer = await _post(a, "/federation/v1/push", {"aid": local, "method": "group.changed",
                                                                "params": {"group_id": "g-abcd.other.test"}})
        assert status == 200 and answer == {"pushed": 0}  # nobody online: nothing pushed, nothing kept


def _mutate(rng: random.Random, value: Any, depth: int = 0) -> Any:
    """A random change of a JSON value: drop or retype a key, replace a leaf, or nest deeper."""
    choices = [None, True, 0, -1, 2**70, 1.5, "", "x" * rng.randint(0, 300), [], {}, "g-abcd.other.test",
               "a.aid.test", "inv-00.other.test"]
    if isinstance(value, dict) and value and depth < 4:
        key = rng.choice(sorted(value))
        out = dict(value)
        roll = rng.random()
        if roll < 0.2:
            out.pop(key)
        elif roll < 0.8:
            out[key] = _mutate(rng, value[key], depth + 1)
        else:
            out[rng.choice(["extra", key.upper(), ""])] = rng.choice(choices)
        return out
    return rng.choice(choices) if rng.random() < 0.9 else [value]


async def test_fuzz_federation_decoders(start_devnet):
    """Random bodies and mutations of valid ones: every answer is a 2xx/4xx JSON object, never a
    crash, and the devnet still answers afterwards."""
    a, _ = await _pair(start_devnet)
    rng = random.Random(20261203)
    foreign = f"y-{secrets.token_hex(3)}.other.test"
    seeds = {
        "/federation/v1/group": _group_call(foreign, "group.get_info", {"group_id": "g-abcd.aid.test"}),
        "/federation/v1/push": {"aid": "a.aid.test", "method": "group.changed", "inline": {"": {"seq": 1}},
                                "params": {"group_id": "g-abcd.other.test"}, "skip_device": ""},
        "/federation/v1/deliver": {"to": "a.aid.test", "from": foreign, "sender_device_id": "d", "message_id": "m",
                                   "kind": "plain", "payload": {"type": "text", "text": "t"}},
    }
    with trio.fail_after(60):
        for path, seed in seeds.items():
            for i in range(300):
                body: Any = _mutate(rng, seed) if i % 6 else bytes(rng.getrandbits(8) for _ in range(rng.randint(0, 64)))
                status, answer = await _post(a, path, body)
                assert status in ALLOWED and isinstance(answer, dict), (path, body, status, answer)
        reply = await http("GET", http_base(a.gateway_url) + "/.well-known/aun-gateway")
        assert reply.status == 200


async def test_a_group_call_whose_home_is_unreachable_says_so(start_devnet):
    a = await start_devnet(issuer="aid.test", federate={"other.test": DEAD})
    with trio.fail_after(30):
        account = await new_account(a.gateway_url, f"m-{secrets.token_hex(3)}.aid.test", root_ca=a.root_ca)
        async with connect(a.gateway_url, account.token, "d1", "default", identity=account.identity) as c:
            reply = await c.call("group.get_info", {"group_id": "g-abcd.other.test"})
            assert reply["error"]["code"] == rpc.INTERNAL_ERROR
            assert "home gateway refused or cannot be reached" in reply["error"]["message"]
            mine = await c.call("group.list_my", {})  # one unreachable devnet does not hide our own groups
            assert mine["result"]["items"] == []


def _thought(sender: str, to: str, thought_id: str, **extra: Any) -> dict[str, Any]:
    envelope = {"type": "e2ee.p2p_encrypted", "version": "v2", "aad": {"from": sender, "message_id": thought_id},
                "recipients": []}  # the devnet checks shape and sender, never decrypts
    return {"to": to, "context": {"type": "run", "id": "r1"}, "thought_id": thought_id, "encrypted": True,
            "payload": envelope, **extra}


async def test_p2p_thoughts_plaintext_refused_readers_bounded_and_read_across_issuers(start_devnet):
    a, b = await _pair(start_devnet)
    with trio.fail_after(30):
        alice = await new_account(a.gateway_url, f"ta-{secrets.token_hex(3)}.aid.test", root_ca=a.root_ca)
        carol = await new_account(a.gateway_url, f"tc-{secrets.token_hex(3)}.aid.test", root_ca=a.root_ca)
        bob = await new_account(b.gateway_url, f"tb-{secrets.token_hex(3)}.other.test", root_ca=b.root_ca)
        async with connect(a.gateway_url, alice.token, "d1", "default", identity=alice.identity) as ca, \
                connect(a.gateway_url, carol.token, "d1", "default", identity=carol.identity) as cc, \
                connect(b.gateway_url, bob.token, "d1", "default", identity=bob.identity) as cb:
            plain = dict(_thought(alice.aid, bob.aid, "mt-1"), encrypted=False,
                         payload={"type": "thought", "text": "plain"})
            reply = await ca.signed_call("message.thought.put", plain)
            assert reply["error"]["code"] == rpc.INVALID_PARAMS  # a thought is never stored in plaintext
            forged = _thought(carol.aid, bob.aid, "mt-2")  # aad.from names someone else
            assert (await ca.signed_call("message.thought.put", forged))["error"]["code"] == rpc.INVALID_PARAMS
            put = await ca.signed_call("message.thought.put", _thought(alice.aid, bob.aid, "mt-3"))
            assert put["result"]["stored_count"] == 1 and put["result"]["peer_aid"] == bob.aid
            ctx = {"type": "run", "id": "r1"}
            got = (await cb.call("message.thought.get", {"sender_aid": alice.aid, "context": ctx}))["result"]
            assert got["found"] and got["cross_domain"] is True and got["target_issuer"] == "aid.test"
            assert [t["thought_id"] for t in got["thoughts"]] == ["mt-3"] and got["thoughts"][0]["to"] == bob.aid
            denied = await cc.call("message.thought.get", {"sender_aid": alice.aid, "peer_aid": bob.aid, "context": ctx})
            assert denied["error"]["code"] == rpc.PERMISSION_DENIED  # neither the sender nor the peer
            own = (await ca.call("message.thought.get", {"sender_aid": alice.aid, "peer_aid": bob.aid,
                                                         "context": ctx}))["result"]
            assert own["found"] and "cross_domain" not in own


def test_a_method_two_services_register_is_refused_with_both_names():
    from aund.devnet import gateway

    before = dict(gateway.HANDLERS)
    with pytest.raises(RuntimeError) as info:
        gateway.register({"message.send": lambda conn, params: {}}, "tests.a_second_message_service")
    assert "message.send served twice" in str(info.value) and "tests.a_second_message_service" in str(info.value)
    assert gateway.HANDLERS == before  # nothing replaced
