"""Group moderation on the devnet (aund/devnet/group_moderation.py) with raw clients: suspend /
resume, block / unblock, member statuses and invite codes - who may call, what each refuses and
with which code, the events - plus a fuzz of their params. fastaun and aund run them end to end
in tests/interop/test_group_moderation_fastaun.py."""
from __future__ import annotations

import string
from typing import Any

import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from aund.aun import codes, signing
from aund.aun import jsonrpc as rpc
from aund.devnet import groups
from tests.devnet.test_groups import code, group_prekey, make_group, open_world, send

pytestmark = pytest.mark.timeout(90)
TEXT = {"type": "text", "text": "hi"}


def actions(w, who: str) -> list[str]:
    return [e["action"] for e in w.events(who, "group.changed")]


async def plain(w, who: str, gid: str) -> dict[str, Any]:
    return await w.call(who, "group.send", {"group_id": gid, "payload": TEXT})


async def test_suspend_lets_only_owner_and_admins_speak_and_admits_nobody(devnet_inproc):
    async with open_world(devnet_inproc) as w:
        for name in ("owner", "admin", "bob", "carol"):
            await w.add(name)
        gid = await make_group(w, members=("admin", "bob"), visibility="public", join_mode="open")
        await w.ok("owner", "group.set_role", {"group_id": gid, "aid": w.aid("admin"), "role": "admin"})
        assert code(await w.call("bob", "group.suspend", {"group_id": gid})) == groups.ROLE_INSUFFICIENT
        assert code(await w.call("carol", "group.suspend", {"group_id": gid})) == groups.NOT_MEMBER
        assert code(await w.call("bob", "group.suspend", {})) == rpc.INVALID_PARAMS
        out = await w.ok("admin", "group.suspend", {"group_id": gid})
        assert out["status"] == "suspended" and out["group"]["status"] == "suspended"
        assert (await w.ok("owner", "group.suspend", {"group_id": gid}))["status"] == "unchanged"
        # members may not send (plain, E2EE, thoughts); the owner and admins may
        for reply in (await plain(w, "bob", gid), await send(w, "bob", gid, ["owner", "admin"])):
            assert code(reply) == codes.GROUP_SUSPENDED and "suspended" in reply["error"]["message"], reply
        thought = await w.call("bob", "group.thought.put", {"group_id": gid, "context": {"type": "t", "id": "1"},
                                                            "payload": {}, "encrypted": True})
        assert code(thought) == codes.GROUP_SUSPENDED
        assert "result" in await plain(w, "admin", gid) and "result" in await plain(w, "owner", gid)
        assert "result" in await send(w, "owner", gid, ["admin", "bob"])
        # nobody joins: request, add, invite, invite code
        assert code(await w.call("carol", "group.request_join", {"group_id": gid})) == codes.GROUP_SUSPENDED
        assert code(await w.call("owner", "group.add_member", {"group_id": gid, "aid": w.aid("carol")})) \
            == codes.GROUP_SUSPENDED
        assert code(await w.call("owner", "group.invite_member", {"group_id": gid, "invitee_aid": w.aid("carol")})) \
            == codes.GROUP_SUSPENDED
        assert code(await w.call("owner", "group.create_invite_code", {"group_id": gid})) == codes.GROUP_SUSPENDED
        # reads go on
        assert (await w.ok("bob", "group.get_info", {"group_id": gid}))["status"] == "suspended"
        assert code(await w.call("bob", "group.resume", {"group_id": gid})) == groups.ROLE_INSUFFICIENT
        assert (await w.ok("owner", "group.resume", {"group_id": gid}))["status"] == "active"
        assert (await w.ok("owner", "group.resume", {"group_id": gid}))["status"] == "unchanged"
        assert "result" in await plain(w, "bob", gid)
        assert (await w.ok("carol", "group.request_join", {"group_id": gid}))["status"] == "joined"
        await w.drain("bob")
        changed = [e for e in w.events("bob", "group.changed") if e["action"] in ("suspended", "resumed")]
        assert [(e["action"], e["status"], e["actor_aid"]) for e in changed] == [
            ("suspended", "suspended", w.aid("admin")), ("resumed", "active", w.aid("owner"))]
        # a dissolved group is neither suspended nor resumed
        await w.ok("owner", "group.dissolve", {"group_id": gid})
        assert code(await w.call("owner", "group.suspend", {"group_id": gid})) == groups.GROUP_STATE_INVALID


async def test_a_blocked_member_sends_but_receives_nothing_until_unblocked(devnet_inproc):
    async with open_world(devnet_inproc) as w:
        for name in ("owner", "admin", "admin2", "bob", "carol", "dave"):
            await w.add(name)
        gid = await make_group(w, members=("admin", "admin2", "bob", "carol"), visibility="public", join_mode="open")
        for a in ("admin", "admin2"):
            await w.ok("owner", "group.set_role", {"group_id": gid, "aid": w.aid(a), "role": "admin"})
        for name in ("owner", "bob", "carol"):
            await w.ok(name, "group.v2.put_group_pk", group_prekey(w.accounts[name].identity.key, gid))

        def who(boot: dict[str, Any]) -> list[str]:
            return sorted({d["aid"] for d in boot["devices"]})

        before = await w.ok("owner", "group.v2.bootstrap", {"group_id": gid})
        assert w.aid("bob") in who(before)
        # who may block whom
        refusals = [("bob", "carol", groups.ROLE_INSUFFICIENT), ("admin", "admin2", groups.ROLE_INSUFFICIENT),
                    ("admin", "owner", groups.ROLE_INSUFFICIENT), ("owner", "dave", groups.NOT_MEMBER),
                    ("dave", "bob", groups.NOT_MEMBER)]
        for actor, subject, expected in refusals:
            reply = await w.call(actor, "group.block", {"group_id": gid, "subject": w.aid(subject)})
            assert code(reply) == expected, (actor, subject, reply)
        assert code(await w.call("owner", "group.block", {"group_id": gid})) == rpc.INVALID_PARAMS
        out = await w.ok("admin", "group.block", {"group_id": gid, "aid": w.aid("bob"), "reason": "quiet"})
        assert (out["block"]["subject"], out["block"]["blocked_by"], out["block"]["reason"]) == (
            w.aid("bob"), w.aid("admin"), "quiet")
        again = await w.ok("owner", "group.block", {"group_id": gid, "subject": w.aid("bob")})
        assert again["block"]["blocked_by"] == w.aid("admin")  # already blocked: the same block
        await w.ok("carol", "group.block", {"group_id": gid, "subject": w.aid("carol")})  # herself
        await w.ok("owner", "group.block", {"group_id": gid, "subject": w.aid("admin2")})  # the owner: an admin
        listed = await w.ok("admin", "group.get_blocklist", {"group_id": gid})
        assert sorted(b["subject"] for b in listed["items"]) == sorted(w.aid(a) for a in ("bob", "carol", "admin2"))
        assert listed["total"] == 3
        assert code(await w.call("bob", "group.get_blocklist", {"group_id": gid})) == groups.ROLE_INSUFFICIENT
        # no wraps: the bootstrap leaves bob out, a wrap for him is stale
        boot = await w.ok("owner", "group.v2.bootstrap", {"group_id": gid})
        assert who(boot) == [w.aid("owner")]
        stale = await send(w, "owner", gid, ["admin", "bob"])
        assert code(stale) == codes.RECIPIENTS_STALE and stale["error"]["data"]["stale_aids"] == [w.aid("bob")]
        assert "result" in await send(w, "owner", gid, ["admin"])
        # no pulls, no history, no pushes of messages; sends still go out
        for method, params in (("group.v2.pull", {"group_id": gid}), ("group.history", {"group_id": gid})):
            reply = await w.call("bob", method, params)
            assert code(reply) == groups.ROLE_INSUFFICIENT and "member is blocked" in reply["error"]["message"]
        w.conns["bob"].frames.clear()
        assert "result" in await plain(w, "owner", gid)
        await w.drain("bob")
        assert w.events("bob", "group.message_created") == []
        assert "result" in await plain(w, "bob", gid) and "result" in await send(w, "bob", gid, ["owner"])
        # unblocking: admins only plain members, anyone itself
        assert code(await w.call("bob", "group.unblock", {"group_id": gid, "subject": w.aid("carol")})) \
            == groups.ROLE_INSUFFICIENT
        assert code(await w.call("admin", "group.unblock", {"group_id": gid, "subject": w.aid("admin2")})) \
            == groups.ROLE_INSUFFICIENT
        out = await w.ok("bob", "group.unblock", {"group_id": gid, "subject": w.aid("bob")})
        assert out["status"] == "removed"
        assert (await w.ok("bob", "group.unblock", {"group_id": gid, "aid": w.aid("bob")}))["status"] == "not_blocked"
        assert "result" in await w.call("bob", "group.v2.pull", {"group_id": gid})
        assert w.aid("bob") in who(await w.ok("owner", "group.v2.bootstrap", {"group_id": gid}))
        await plain(w, "owner", gid)
        await w.drain("bob")
        assert len(w.events("bob", "group.message_created")) == 1
        await w.drain("owner")
        blocks = [(e["action"], e["aid"]) for e in w.events("owner", "group.changed")
                  if e["action"] in ("member_blocked", "member_unblocked")]
        assert blocks == [("member_blocked", w.aid("bob")), ("member_blocked", w.aid("carol")),
                          ("member_blocked", w.aid("admin2")), ("member_unblocked", w.aid("bob"))]


async def test_member_statuses_are_reported_by_each_member_for_itself(devnet_inproc):
    async with open_world(devnet_inproc) as w:
        for name in ("owner", "bob", "carol"):
            await w.add(name)
        gid = await make_group(w, members=("bob",))
        for params in ({"group_id": gid, "online_status": "online"}, {"group_id": gid, "work_status": "busy"},
                       {"group_id": gid, "online_status": "x" * 65, "work_status": "busy"},
                       {"group_id": gid, "online_status": 1, "work_status": "busy"}):
            assert code(await w.call("bob", "group.report_status", params)) == rpc.INVALID_PARAMS, params
        assert code(await w.call("carol", "group.report_status", {"group_id": gid, "online_status": "online",
                                                                  "work_status": "idle"})) == groups.NOT_MEMBER
        out = await w.ok("bob", "group.report_status", {"group_id": gid, "online_status": "online",
                                                        "work_status": "busy", "aid": w.aid("owner")})
        assert (out["status"]["aid"], out["status"]["online_status"], out["status"]["work_status"]) == (
            w.aid("bob"), "online", "busy")  # only its own: an `aid` param is not someone else's status
        await plain(w, "owner", gid)
        items = {i["aid"]: i for i in (await w.ok("bob", "group.get_member_statuses", {"group_id": gid}))["items"]}
        assert set(items) == {w.aid("owner"), w.aid("bob")}
        assert items[w.aid("owner")]["online_status"] is None and items[w.aid("owner")]["last_payload_type"] == "text"
        assert items[w.aid("bob")]["work_status"] == "busy" and items[w.aid("bob")]["last_message_at"] is None
        assert code(await w.call("carol", "group.get_member_statuses", {"group_id": gid})) == groups.NOT_MEMBER


async def test_invite_codes_admit_until_used_up_expired_or_revoked(devnet_inproc, monkeypatch):
    async with open_world(devnet_inproc) as w:
        for name in ("owner", "bob", "carol", "dave", "erin", "mallory"):
            await w.add(name)
        gid = await make_group(w, members=("bob",), join_mode="approval")
        assert code(await w.call("bob", "group.create_invite_code", {"group_id": gid})) == groups.ROLE_INSUFFICIENT
        for bad in ({"max_uses": 0}, {"max_uses": -3}, {"max_uses": True}, {"expires_in_seconds": 0},
                    {"code": "no spaces"}, {"code": "ab"}, {"code": 7}):
            reply = await w.call("owner", "group.create_invite_code", {"group_id": gid, **bad})
            assert code(reply) == rpc.INVALID_PARAMS, (bad, reply)
        one = (await w.ok("owner", "group.create_invite_code", {"group_id": gid}))["invite_code"]
        assert one["code"].startswith("ic-") and (one["max_uses"], one["used_count"], one["status"]) == (1, 0, "active")
        assert 7 * 86400_000 - 60_000 < one["expires_at"] - one["created_at"] <= 7 * 86400_000
        two = (await w.ok("owner", "group.create_invite_code", {"group_id": gid, "code": "Team-Two",
                                                                "max_uses": 2}))["invite_code"]
        assert two["code"] == "team-two"
        assert code(await w.call("owner", "group.create_invite_code", {"group_id": gid, "code": "team-two"})) \
            == codes.ALREADY_EXISTS
        # signed as the SDK signs it: unsigned or tampered is refused
        unsigned = await w.conns["carol"].call("group.use_invite_code", {"code": one["code"]})
        assert code(unsigned) == rpc.CLIENT_SIGNATURE_INVALID
        tampered = signing.sign_params("group.use_invite_code", {"code": one["code"]}, aid=w.aid("carol"),
                                       key=w.accounts["carol"].identity.key,
                                       cert_fingerprint=w.accounts["carol"].identity.fingerprint)
        tampered["code"] = two["code"]
        assert code(await w.conns["carol"].call("group.use_invite_code", tampered)) == rpc.CLIENT_SIGNATURE_INVALID
        # carol joins the approval group with it (upper case too), pushing the join to the members
        joined = await w.ok("carol", "group.use_invite_code", {"code": one["code"].upper()})
        assert joined["status"] == "joined" and joined["member"]["aid"] == w.aid("carol")
        assert (joined["invite_code"]["used_count"], joined["invite_code"]["status"]) == (1, "used_up")
        await w.drain("bob")
        used = [e for e in w.events("bob", "group.changed") if e["action"] == "invite_code_used"]
        assert [(e["joined_aid"], e["inviter_aid"]) for e in used] == [(w.aid("carol"), w.aid("owner"))]
        assert all("code" not in e for e in w.events("bob", "group.changed"))  # members do not learn codes
        assert "result" in await w.call("carol", "group.get_members", {"group_id": gid})
        refusals = [("dave", one["code"], groups.INVITE_INVALID, "used up"),
                    ("dave", "nope-nope", groups.INVITE_INVALID, "not found"),
                    ("carol", two["code"], groups.ALREADY_MEMBER, "already")]
        for who, c, expected, words in refusals:
            reply = await w.call(who, "group.use_invite_code", {"code": c})
            assert code(reply) == expected and words in reply["error"]["message"], (who, c, reply)
        assert code(await w.call("dave", "group.use_invite_code", {})) == rpc.INVALID_PARAMS
        # a banned AID may not come in by a code (and does not use it up)
        await w.ok("owner", "group.ban", {"group_id": gid, "subject": w.aid("mallory")})
        assert code(await w.call("mallory", "group.use_invite_code", {"code": two["code"]})) == groups.JOIN_REJECTED
        # suspended: no admission by code either
        await w.ok("owner", "group.suspend", {"group_id": gid})
        assert code(await w.call("dave", "group.use_invite_code", {"code": two["code"]})) == codes.GROUP_SUSPENDED
        await w.ok("owner", "group.resume", {"group_id": gid})
        assert (await w.ok("dave", "group.use_invite_code", {"code": two["code"]}))["invite_code"]["used_count"] == 1
        # revoked (owner/admin only), expired
        assert code(await w.call("bob", "group.revoke_invite_code", {"group_id": gid, "code": two["code"]})) \
            == groups.ROLE_INSUFFICIENT
        out = await w.ok("owner", "group.revoke_invite_code", {"group_id": gid, "code": two["code"]})
        assert out == {"group_id": gid, "group_aid": gid, "code": two["code"], "status": "revoked"}
        assert code(await w.call("owner", "group.revoke_invite_code", {"group_id": gid, "code": "nope-nope"})) \
            == groups.INVITE_INVALID
        reply = await w.call("erin", "group.use_invite_code", {"code": two["code"]})
        assert code(reply) == groups.INVITE_INVALID and "revoked" in reply["error"]["message"]
        short = (await w.ok("owner", "group.create_invite_code", {"group_id": gid, "expires_in_seconds": 5}))
        real_now = groups.now_ms
        monkeypatch.setattr(groups, "now_ms", lambda: real_now() + 6000)
        reply = await w.call("erin", "group.use_invite_code", {"code": short["invite_code"]["code"]})
        assert code(reply) == groups.INVITE_INVALID and "expired" in reply["error"]["message"]
        monkeypatch.setattr(groups, "now_ms", real_now)
        listed = await w.ok("owner", "group.list_invite_codes", {"group_id": gid})
        assert [(i["code"], i["status"]) for i in listed["items"]] == [
            (one["code"], "used_up"), (two["code"], "revoked"), (short["invite_code"]["code"], "active")]
        assert [i["code"] for i in (await w.ok("owner", "group.list_invite_codes",
                                               {"group_id": gid, "status": "revoked"}))["items"]] == [two["code"]]
        assert code(await w.call("owner", "group.list_invite_codes", {"group_id": gid, "status": "odd"})) \
            == rpc.INVALID_PARAMS
        assert code(await w.call("carol", "group.list_invite_codes", {"group_id": gid})) == groups.ROLE_INSUFFICIENT
        await w.drain("owner")
        kinds = actions(w, "owner")
        assert kinds.count("invite_code_created") == 3 and kinds.count("invite_code_used") == 2
        assert kinds.count("invite_code_revoked") == 1


# --- fuzz of the new params ----------------------------------------------------------------------
MODERATION_METHODS = ["group.suspend", "group.resume", "group.block", "group.unblock", "group.get_blocklist",
                      "group.report_status", "group.get_member_statuses", "group.create_invite_code",
                      "group.list_invite_codes", "group.use_invite_code", "group.revoke_invite_code"]
KEYS = ["group_id", "group_aid", "subject", "aid", "reason", "online_status", "work_status", "code", "max_uses",
        "expires_in_seconds", "status", "member_type"]
scalars = st.one_of(st.none(), st.booleans(), st.integers(-(2**53 - 1), 2**53 - 1),
                    st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=80),
                    st.text(alphabet=string.ascii_lowercase + string.digits + "-_", min_size=1, max_size=70))
values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                       st.dictionaries(st.text(max_size=6), inner, max_size=3)),
                      max_leaves=8)


async def test_fuzzed_moderation_params_get_json_rpc_errors_never_a_crash(devnet_inproc):
    async with open_world(devnet_inproc) as w:
        for name in ("owner", "bob", "watch"):
            await w.add(name)
        gid = await make_group(w, members=("bob", "watch"), visibility="public", join_mode="open")
        plausible = [gid, gid.upper(), w.aid("bob"), w.aid("owner"), "ic-0000000000", 0, 1, -1, 10**6, ""]
        seen: dict[str, int] = {}

        async def example(who: str, method: str, params: dict[str, Any], signed: bool) -> None:
            with trio.fail_after(10):
                c = w.conns[who]
                reply = await (c.signed_call(method, params) if signed else c.call(method, params))
                assert ("result" in reply) != ("error" in reply), reply
                if "error" in reply:
                    err = reply["error"]
                    assert isinstance(err.get("code"), int) and isinstance(err.get("message"), str), reply
                    assert err["code"] != rpc.INTERNAL_ERROR, (method, params, reply)
                    seen[method] = seen.get(method, 0) + 1
                assert await c.ping() and await w.conns["watch"].ping()

        body = st.dictionaries(st.sampled_from(KEYS), st.one_of(values, st.sampled_from(plausible)), max_size=6)

        def run() -> None:
            @settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
            @given(who=st.sampled_from(["owner", "bob"]), method=st.sampled_from(MODERATION_METHODS), params=body,
                   signed=st.sampled_from([True, True, False]))
            def fuzz(who, method, params, signed):
                trio.from_thread.run(example, who, method, params, signed)

            fuzz()

        with trio.fail_after(80):
            await trio.to_thread.run_sync(run)
        assert sum(seen.values()) > 100  # most fuzzed bodies are refused
        assert (await w.ok("watch", "group.get_info", {"group_id": gid, "required": ["owner_aid"]}))["found"]
