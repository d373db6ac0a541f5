"""Group administration on the devnet (aund/devnet/group_admin.py) with raw clients: who may do
what, the refusals and their codes, the signed group.index checks. fastaun and aund run the same
calls end to end in tests/interop/test_group_admin_fastaun.py."""
from __future__ import annotations

import hashlib
import time

import pytest

from aund.aun import jsonrpc as rpc
from aund.aun.e2ee.canonical import canonical_json
from aund.devnet import groups
from aund.identity import pki
from tests.devnet.test_groups import code, make_group, open_world, send

pytestmark = pytest.mark.timeout(60)


def signed_index(w, who: str, gid: str, settings: dict, *, signer: str | None = None) -> dict:
    """A group.index the way the SDK builds one (entries sorted by key, meta signed over meta + entries)."""
    now = int(time.time() * 1000)
    entries = sorted(({"key": k, "source": "db", "etag": '"sha256:' + hashlib.sha256(canonical_json(v)).hexdigest() + '"', "last_modified": now}
                      for k, v in settings.items()), key=lambda e: e["key"])
    body = b"".join(canonical_json(e) + b"\n" for e in entries)
    digest = "sha256:" + hashlib.sha256(body).hexdigest()
    meta = {"type": "index_meta", "group_aid": gid, "etag": f'"{digest}"', "last_modified": now,
            "schema": "aun.group.index.v1", "body_hash": digest, "signed_by": w.aid(who),
            "sig_alg": "ECDSA-P256-SHA256"}
    key = w.accounts[signer or who].identity.key
    meta["signature"] = pki.b64e(pki.sign_der(key, canonical_json(meta) + b"\n" + body))
    return {"body": (canonical_json(meta) + b"\n" + body).decode()}


async def test_roles_only_the_owner_sets_them_and_an_admin_may_step_down(devnet_inproc):
    async with open_world(devnet_inproc) as w:
        for name in ("owner", "alice", "bob", "carol"):
            await w.add(name)
        gid = await make_group(w, members=("alice", "bob"))
        cases = [("alice", w.aid("bob"), "admin", groups.ROLE_INSUFFICIENT),     # a member sets no roles
                 ("owner", w.aid("owner"), "member", groups.ROLE_INSUFFICIENT),  # the owner's role: only by transfer
                 ("owner", w.aid("alice"), "owner", rpc.INVALID_PARAMS),
                 ("owner", w.aid("carol"), "admin", groups.NOT_MEMBER),
                 ("carol", w.aid("alice"), "admin", groups.NOT_MEMBER)]
        for who, aid, role, expected in cases:
            reply = await w.call(who, "group.set_role", {"group_id": gid, "aid": aid, "role": role})
            assert code(reply) == expected, (who, aid, role, reply)
        out = await w.ok("owner", "group.set_role", {"group_id": gid, "aid": w.aid("alice"), "role": "admin"})
        assert (out["old_role"], out["new_role"]) == ("member", "admin")
        await w.drain("bob")
        pushed = [e for e in w.events("bob", "group.changed") if e["action"] == "role_changed"]
        assert [(e["aid"], e["old_role"], e["new_role"]) for e in pushed] == [(w.aid("alice"), "member", "admin")]
        assert code(await w.call("alice", "group.set_role", {"group_id": gid, "aid": w.aid("bob"),
                                                             "role": "admin"})) == groups.ROLE_INSUFFICIENT
        admins = await w.ok("bob", "group.get_admins", {"group_id": gid})
        assert {a["aid"]: a["role"] for a in admins["admins"]} == {w.aid("owner"): "owner", w.aid("alice"): "admin"}
        await w.ok("alice", "group.set_role", {"group_id": gid, "aid": w.aid("alice"), "role": "member"})
        admins = await w.ok("bob", "group.get_admins", {"group_id": gid})
        assert [a["aid"] for a in admins["admins"]] == [w.aid("owner")]


async def test_bans_stop_sends_and_rejoins_until_lifted(devnet_inproc):
    async with open_world(devnet_inproc) as w:
        for name in ("owner", "alice", "bob", "carol"):
            await w.add(name)
        gid = await make_group(w, members=("alice", "bob", "carol"), visibility="public", join_mode="open")
        await w.ok("owner", "group.set_role", {"group_id": gid, "aid": w.aid("alice"), "role": "admin"})
        await w.ok("owner", "group.set_role", {"group_id": gid, "aid": w.aid("carol"), "role": "admin"})
        assert code(await w.call("alice", "group.ban", {"group_id": gid, "subject": w.aid("carol")})) \
            == groups.ROLE_INSUFFICIENT  # an admin bans no admin
        assert code(await w.call("alice", "group.ban", {"group_id": gid, "subject": w.aid("owner")})) \
            == groups.ROLE_INSUFFICIENT
        assert code(await w.call("bob", "group.ban", {"group_id": gid, "subject": w.aid("alice")})) \
            == groups.ROLE_INSUFFICIENT
        assert code(await w.call("alice", "group.ban", {"group_id": gid})) == rpc.INVALID_PARAMS
        ban = await w.ok("alice", "group.ban", {"group_id": gid, "aid": w.aid("bob"), "reason": "spam"})
        assert (ban["ban"]["subject"], ban["ban"]["reason"], ban["ban"]["expires_at"]) == (w.aid("bob"), "spam", 0)
        # still a member, but every send is refused
        assert code(await send(w, "bob", gid, ["owner", "alice", "carol"])) == groups.ROLE_INSUFFICIENT
        plain = await w.call("bob", "group.send", {"group_id": gid, "payload": {"type": "text", "text": "x"}})
        assert code(plain) == groups.ROLE_INSUFFICIENT and "banned" in plain["error"]["message"]
        assert "result" in await w.call("bob", "group.get_members", {"group_id": gid})
        await w.ok("owner", "group.kick", {"group_id": gid, "aid": w.aid("bob")})
        assert code(await w.call("bob", "group.request_join", {"group_id": gid})) == groups.JOIN_REJECTED
        assert code(await w.call("owner", "group.add_member", {"group_id": gid, "aid": w.aid("bob")})) \
            == groups.JOIN_REJECTED
        # the owner bans an admin: demoted with it; a ban already expired is not in force
        await w.ok("owner", "group.ban", {"group_id": gid, "subject": w.aid("carol")})
        roles = {m["aid"]: m["role"] for m in (await w.ok("owner", "group.get_members", {"group_id": gid}))["members"]}
        assert roles[w.aid("carol")] == "member"
        await w.ok("owner", "group.ban", {"group_id": gid, "subject": w.aid("carol"),
                                          "expires_at": int(time.time() * 1000) - 1})
        assert "result" in await w.call("carol", "group.send", {"group_id": gid, "payload": {"type": "text"}})
        listed = await w.ok("alice", "group.get_banlist", {"group_id": gid})
        assert [b["subject"] for b in listed["items"]] == [w.aid("bob")]
        assert code(await w.call("carol", "group.get_banlist", {"group_id": gid})) == groups.ROLE_INSUFFICIENT
        # lifted: bob joins the open group again
        assert (await w.ok("alice", "group.unban", {"group_id": gid, "subject": w.aid("bob")}))["status"] == "removed"
        assert (await w.ok("alice", "group.unban", {"group_id": gid, "subject": w.aid("bob")}))["status"] \
            == "not_banned"
        assert (await w.ok("bob", "group.request_join", {"group_id": gid}))["status"] == "joined"
        await w.drain("owner")
        actions = [e["action"] for e in w.events("owner", "group.changed")]
        assert actions.count("member_banned") == 3 and actions.count("member_unbanned") == 1


async def test_settings_and_the_signed_group_index(devnet_inproc):
    async with open_world(devnet_inproc) as w:
        for name in ("owner", "alice", "bob"):
            await w.add(name)
        gid = await make_group(w, members=("alice", "bob"))
        await w.ok("owner", "group.set_role", {"group_id": gid, "aid": w.aid("alice"), "role": "admin"})
        bad = [({"colour": "red"}, "unknown setting"), ({"mention_mode": "loud"}, "mention_mode"),
               ({"announcement.content": "x"}, "group.index"), ({"join.mode": "anyone"}, "join.mode"),
               ({"visibility": "secret"}, "visibility")]
        for settings, words in bad:
            reply = await w.call("alice", "group.set_settings", {"group_id": gid, "settings": settings})
            assert code(reply) == rpc.INVALID_PARAMS and words in reply["error"]["message"], (settings, reply)
        assert code(await w.call("bob", "group.set_settings", {"group_id": gid, "settings": {}})) \
            == groups.ROLE_INSUFFICIENT
        out = await w.ok("alice", "group.set_settings", {"group_id": gid, "settings": {
            "mention_mode": "mention-only", "name": "renamed", "join_mode": "closed"}})
        assert out["updated_keys"] == ["join.mode", "mention_mode", "name"]
        # indexed settings: signed by the caller, CAS on the index etag
        ann = {"announcement.content": "hello"}
        forged = signed_index(w, "alice", gid, ann, signer="bob")
        reply = await w.call("alice", "group.set_settings", {"group_id": gid, "settings": {**ann, "group.index": forged},
                                                             "expected_index_etag": ""})
        assert code(reply) == rpc.INVALID_PARAMS and "signature" in reply["error"]["message"]
        mismatch = signed_index(w, "alice", gid, {"announcement.content": "other"})
        reply = await w.call("alice", "group.set_settings", {"group_id": gid, "expected_index_etag": "",
                                                             "settings": {**ann, "group.index": mismatch}})
        assert code(reply) == rpc.INVALID_PARAMS and "does not match" in reply["error"]["message"]
        index = signed_index(w, "alice", gid, ann)
        out = await w.ok("alice", "group.set_settings", {"group_id": gid, "expected_index_etag": "",
                                                         "settings": {**ann, "group.index": index}})
        etag = out["_meta"]["group_indexes"][gid]["etag"]
        assert out["updated_keys"] == ["announcement.content", "group.index"]
        stale = signed_index(w, "owner", gid, {"rules.content": "be nice"})
        reply = await w.call("owner", "group.set_settings", {"group_id": gid, "expected_index_etag": "",
                                                             "settings": {"rules.content": "be nice",
                                                                          "group.index": stale}})
        assert code(reply) == groups.STATE_CONFLICT and "etag conflict" in reply["error"]["message"]
        got = await w.ok("bob", "group.get_settings", {"group_id": gid})
        values = {s["key"]: s["value"] for s in got["settings"]}
        assert values["announcement.content"] == "hello" and values["group.index"] == index
        assert (values["name"], values["mention_mode"], values["join.mode"]) == ("renamed", "mention-only", "closed")
        assert got["_meta"]["group_indexes"][gid]["etag"] == etag
        got = await w.ok("bob", "group.get_settings", {"group_id": gid, "keys": ["join_mode", "nothing.content"]})
        assert [s["key"] for s in got["settings"]] == ["join.mode"]
        await w.drain("bob")
        actions = [e["action"] for e in w.events("bob", "group.changed")]
        assert "announcement_updated" in actions and "join_requirements_updated" in actions and "update" in actions
        # group.update: admins only, no service-managed metadata
        assert code(await w.call("bob", "group.update", {"group_id": gid, "name": "x"})) == groups.ROLE_INSUFFICIENT
        reply = await w.call("alice", "group.update", {"group_id": gid, "metadata": {"transfer_history": []}})
        assert code(reply) == rpc.INVALID_PARAMS
        out = await w.ok("alice", "group.update", {"group_id": gid, "description": "d", "metadata": {"k": 1}})
        assert out["group"]["description"] == "d" and out["updated_keys"] == ["description", "metadata"]


async def test_owner_transfer_and_dissolution(devnet_inproc):
    async with open_world(devnet_inproc) as w:
        for name in ("owner", "alice", "bob", "carol"):
            await w.add(name)
        gid = await make_group(w, members=("alice", "bob"))
        cases = [("alice", {"new_owner": w.aid("bob")}, groups.ROLE_INSUFFICIENT),
                 ("owner", {"new_owner": w.aid("carol")}, groups.NOT_MEMBER),
                 ("owner", {"new_owner": w.aid("owner")}, rpc.INVALID_PARAMS),
                 ("owner", {}, rpc.INVALID_PARAMS)]
        for who, params, expected in cases:
            assert code(await w.call(who, "group.transfer_owner", {"group_id": gid, **params})) == expected, params
        assert code(await w.call("alice", "group.complete_transfer", {"group_id": gid})) == groups.GROUP_STATE_INVALID
        pending = await w.ok("owner", "group.transfer_owner", {"group_id": gid, "new_owner": w.aid("alice")})
        assert pending["status"] == "pending_rekey" and pending["pending_owner_transfer"]["new_owner"] == w.aid("alice")
        assert code(await w.call("bob", "group.complete_transfer", {"group_id": gid})) == groups.ROLE_INSUFFICIENT
        done = await w.ok("alice", "group.complete_transfer", {"group_id": gid})
        assert (done["status"], done["old_owner"], done["new_owner"]) == ("transferred", w.aid("owner"), w.aid("alice"))
        roles = {m["aid"]: m["role"] for m in (await w.ok("bob", "group.get_members", {"group_id": gid}))["members"]}
        assert roles == {w.aid("alice"): "owner", w.aid("owner"): "admin", w.aid("bob"): "member"}
        assert (await w.ok("alice", "group.complete_transfer", {"group_id": gid}))["status"] == "transferred"
        await w.drain("bob")
        pushed = [(e["action"], e.get("status")) for e in w.events("bob", "group.changed")]
        assert ("owner_transfer_rekey_pending", "pending_rekey") in pushed and ("owner_transferred", "transferred") \
            in pushed
        # dissolve: the owner only; afterwards reads work, writes are refused
        assert code(await w.call("owner", "group.dissolve", {"group_id": gid})) == groups.ROLE_INSUFFICIENT
        assert (await w.ok("alice", "group.dissolve", {"group_id": gid}))["status"] == "dissolved"
        for who, method, params in (("bob", "group.send", {"payload": {"type": "text"}}),
                                    ("alice", "group.add_member", {"aid": w.aid("carol")}),
                                    ("alice", "group.set_settings", {"settings": {}}),
                                    ("alice", "group.dissolve", {}),
                                    ("bob", "group.v2.bootstrap", {})):
            reply = await w.call(who, method, {"group_id": gid, **params})
            assert code(reply) == groups.GROUP_STATE_INVALID and "dissolved" in reply["error"]["message"], method
        assert code(await send(w, "bob", gid, ["alice", "owner"])) == groups.GROUP_STATE_INVALID
        assert (await w.ok("bob", "group.get_info", {"group_id": gid}))["status"] == "dissolved"
        events = await w.ok("bob", "group.pull_events", {"group_id": gid, "after_event_seq": 0})
        assert events["events"][-1]["action"] == "dissolved"
        assert "result" in await w.call("bob", "group.get_members", {"group_id": gid})
