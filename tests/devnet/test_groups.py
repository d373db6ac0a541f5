"""The devnet's group service (aund/devnet/groups.py) over real loopback sockets, with raw clients.

Envelopes here are structurally real (sorted recipient rows, Merkle digest, RAW sender signature
over ciphertext || tag || canonical AAD || digest) but carry dummy ciphertext: the service never
decrypts, it checks structure, membership and signatures. fastaun exercises the crypto end to end
in tests/interop/test_devnet_groups_fastaun.py.
"""
from __future__ import annotations

import base64
import hashlib
import json
import secrets
import time
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any

import pytest
import trio

from aund.aun import jsonrpc as rpc
from aund.aun import signing
from aund.aun.e2ee import merkle
from aund.aun.e2ee.canonical import canonical_json
from aund.devnet import groups
from aund.identity import pki
from tests.devnet.rawclient import Account, RawClient, connect, fresh_aid, new_account

DEADLINE = 20
pytestmark = pytest.mark.timeout(60)


def code(reply: dict) -> int | None:
    return reply.get("error", {}).get("code")


class World:
    """Registered accounts and their open connections: `w.call("alice", method, params)`."""

    def __init__(self, info: Any, stack: AsyncExitStack) -> None:
        self.info, self.stack = info, stack
        self.accounts: dict[str, Account] = {}
        self.conns: dict[str, RawClient] = {}

    async def add(self, name: str, device: str = "d1", *, conn_name: str | None = None) -> RawClient:
        if name not in self.accounts:
            self.accounts[name] = await new_account(self.info.gateway_url, fresh_aid(name), root_ca=self.info.root_ca)
        acct = self.accounts[name]
        c = await self.stack.enter_async_context(
            connect(self.info.gateway_url, acct.token, device, "default", identity=acct.identity))
        self.conns[conn_name or name] = c
        return c

    def aid(self, name: str) -> str:
        return self.accounts[name].aid

    async def call(self, who: str, method: str, params: dict[str, Any]) -> dict[str, Any]:
        c = self.conns[who]
        if method in signing.SIGNED_METHODS:
            return await c.signed_call(method, params)
        return await c.call(method, params)

    async def ok(self, who: str, method: str, params: dict[str, Any]) -> dict[str, Any]:
        reply = await self.call(who, method, params)
        assert "result" in reply, (who, method, reply)
        return reply["result"]

    def events(self, who: str, method: str) -> list[dict[str, Any]]:
        c = self.conns[who]
        return [f["params"] for f in c.frames if f.get("method") == "event/" + method]

    async def drain(self, who: str) -> None:
        """Read whatever the server already queued (a ping round trip flushes the outbox)."""
        await self.conns[who].ping()


@asynccontextmanager
async def open_world(info: Any) -> AsyncIterator[World]:
    """Connections are opened and closed inside the test's own task (they hold nurseries)."""
    with trio.fail_after(DEADLINE):
        async with AsyncExitStack() as stack:
            yield World(info, stack)


async def make_group(w: World, owner: str = "owner", members: tuple[str, ...] = (), **params: Any) -> str:
    result = await w.ok(owner, "group.create", {"name": "test group", **params})
    gid = result["group"]["group_id"]
    for m in members:
        await w.ok(owner, "group.add_member", {"group_id": gid, "aid": w.aid(m)})
    return gid


def envelope(sender: Account, gid: str, message_id: str, recipients: list[tuple[str, str]], *, epoch: int = 1,
             device: str = "d1") -> dict[str, Any]:
    """A structurally valid e2ee.group_encrypted envelope (dummy ciphertext, real digest and signature)."""
    rows = sorted([[aid, dev, "member", "aid_master", "sha256:" + "0" * 16, "", pki.b64e(secrets.token_bytes(12)),
                    pki.b64e(secrets.token_bytes(48))] for aid, dev in recipients], key=lambda r: (r[0], r[1], r[2]))
    aad = {"from": sender.aid, "from_device": device, "group_id": gid, "epoch": epoch, "message_id": message_id,
           "timestamp": int(time.time() * 1000), "suite": "P256_HKDF_SHA256_AES_256_GCM", "wrap_protocol": "1DH",
           "state_commitment": {"state_version": 0, "state_hash": "", "state_chain": ""}}
    ciphertext, tag = secrets.token_bytes(32), secrets.token_bytes(16)
    digest = merkle.recipients_digest(rows) if rows else hashlib.sha256(b"").hexdigest()
    sig = pki.sign_raw(sender.identity.key, ciphertext + tag + canonical_json(aad) + bytes.fromhex(digest))
    return {"type": "e2ee.group_encrypted", "version": "v2", "suite": "P256_HKDF_SHA256_AES_256_GCM",
            "group_id": gid, "epoch": epoch, "nonce": pki.b64e(secrets.token_bytes(12)),
            "ciphertext": pki.b64e(ciphertext), "tag": pki.b64e(tag), "sender_signature": pki.b64e(sig),
            "sender_cert_fingerprint": "sha256:" + "0" * 16, "sender_session_pk": pki.b64e(b"\x04" * 65),
            "recipients_digest": digest, "recipients": rows, "aad": aad}


async def send(w: World, who: str, gid: str, recipients: list[str], *, message_id: str | None = None,
               env: dict | None = None, **kw: Any) -> dict[str, Any]:
    message_id = message_id or "m-" + secrets.token_hex(8)
    env = env or envelope(w.accounts[who], gid, message_id, [(w.aid(r), "d1") for r in recipients], **kw)
    return await w.call(who, "group.v2.send", {"group_id": gid, "message_id": message_id, "envelope": env,
                                               "need_render": True, "device_id": "d1", "slot_id": "default"})


def group_prekey(key: Any, gid: str) -> dict[str, Any]:
    spk = pki.generate_key()
    der = pki.spki_der(spk.public_key())
    spk_id = "sha256:" + hashlib.sha256(der).hexdigest()[:16]
    ts = int(time.time())
    return {"group_id": gid, "key_source": "group_device_prekey", "spk_id": spk_id, "spk_pk": pki.b64e(der),
            "spk_signature": pki.b64e(pki.sign_raw(key, der + spk_id.encode() + str(ts).encode())),
            "spk_timestamp": ts}


def snapshot_for(gid: str, aids: list[str], admins: list[str]) -> str:
    payload = {"members": [{"aid": a, "devices": []} for a in aids], "audit_aids": [],
               "admin_set": {"admin_aids": sorted(admins), "threshold": 1}, "join_policy_hash": None,
               "recovery_quorum": None, "history_policy": "recent_7_days", "wrap_protocol": "3DH"}
    return json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


async def propose(w: World, who: str, gid: str, aids: list[str], *, version: int | None = None,
                  bad_signature: bool = False) -> dict[str, Any]:
    state = await w.ok(who, "group.get_state", {"group_id": gid})
    version = state["state_version"] + 1 if version is None else version
    snapshot = snapshot_for(gid, aids, [w.aid("owner")])
    state_hash = groups.state_commitment(gid, version, json.loads(snapshot))
    data = groups.state_sign_input(gid, version, state_hash, snapshot)
    signer = w.accounts["alice" if bad_signature else who].identity.key
    return await w.call(who, "group.v2.propose_state", {
        "group_id": gid, "state_version": version, "key_epoch": state["key_epoch"], "state_hash": state_hash,
        "prev_state_hash": state["state_hash"], "membership_snapshot": snapshot,
        "signature": pki.b64e(pki.sign_der(signer, data)), "reason": "membership_changed", "auto_confirm_seconds": 30})


# --- pure helpers ---------------------------------------------------------------------------------------
def test_group_id_forms_normalise_to_one_canonical_id():
    for raw in ("g-abc123", "g-abc123.aid.test", "G-ABC123@aid.test", "group.aid.test/g-abc123", " g-abc123 "):
        assert groups.normalize_group_id(raw, "aid.test") == "g-abc123.aid.test"
    for bad in ("", "ab", "-abc.aid.test", "x" * 70, 5, None, "1234.aid.test"):
        with pytest.raises(groups.RpcError):
            groups.normalize_group_id(bad, "aid.test")


def test_state_commitment_is_order_independent_and_version_bound():
    a = {"members": [{"aid": "b", "devices": [{"device_id": "2"}, {"device_id": "1"}]}, {"aid": "a", "devices": []}],
         "audit_aids": ["y", "x"], "admin_set": {"admin_aids": ["b", "a"], "threshold": 1}}
    b = {"members": [{"aid": "a", "devices": []}, {"aid": "b", "devices": [{"device_id": "1"}, {"device_id": "2"}]}],
         "audit_aids": ["x", "y"], "admin_set": {"admin_aids": ["a", "b"], "threshold": 1}}
    assert groups.state_commitment("g-x1234.t", 3, a) == groups.state_commitment("g-x1234.t", 3, b)
    assert groups.state_commitment("g-x1234.t", 3, a) != groups.state_commitment("g-x1234.t", 4, a)
    assert groups.state_commitment("g-x1234.t", 3, a) != groups.state_commitment("g-y1234.t", 3, a)
    assert a["members"][0]["aid"] == "b"  # the caller's payload is not reordered in place


# --- membership -------------------------------------------------------------------------------------------
async def test_membership_rules_and_permission_errors(devnet_inproc):
    async with open_world(devnet_inproc) as w:
        for name in ("owner", "alice", "bob", "carol"):
            await w.add(name)
        gid = await make_group(w, members=("alice",))
        # only the owner adds; a second add is refused; unknown AIDs are refused
        cases = [("alice", gid, w.aid("bob"), groups.ROLE_INSUFFICIENT), ("carol", gid, w.aid("bob"), groups.NOT_MEMBER),
                 ("owner", gid, w.aid("alice"), groups.ALREADY_MEMBER), ("owner", gid, fresh_aid("ghost"), rpc.NOT_FOUND),
                 ("owner", "g-nothere", w.aid("bob"), groups.GROUP_NOT_FOUND)]
        for who, group_id, aid, expected in cases:
            reply = await w.call(who, "group.add_member", {"group_id": group_id, "aid": aid})
            assert code(reply) == expected, (who, group_id, aid, reply)
        await w.ok("owner", "group.add_member", {"group_id": gid, "aid": w.aid("bob")})
        # non-members see nothing; members see everyone
        for method in ("group.get_members", "group.get_state", "group.v2.bootstrap", "group.v2.pull",
                       "group.pull_events"):
            assert code(await w.call("carol", method, {"group_id": gid})) == groups.NOT_MEMBER, method
        members = (await w.ok("bob", "group.get_members", {"group_id": gid}))["members"]
        assert {m["aid"]: m["role"] for m in members} == {w.aid("owner"): "owner", w.aid("alice"): "member",
                                                          w.aid("bob"): "member"}
        # members cannot kick, nobody kicks the owner, the owner cannot leave
        for who, aid in (("alice", w.aid("bob")), ("owner", w.aid("owner"))):
            assert code(await w.call(who, "group.kick", {"group_id": gid, "aid": aid})) == groups.ROLE_INSUFFICIENT
        assert code(await w.call("owner", "group.leave", {"group_id": gid})) == groups.GROUP_STATE_INVALID
        assert code(await w.call("owner", "group.kick", {"group_id": gid, "aid": w.aid("carol")})) == groups.NOT_MEMBER
        removed = await w.ok("owner", "group.remove_member", {"group_id": gid, "aid": w.aid("bob")})
        assert removed["removed_aid"] == w.aid("bob")
        assert (await w.ok("alice", "group.leave", {"group_id": gid}))["left_aid"] == w.aid("alice")
        members = (await w.ok("owner", "group.get_members", {"group_id": gid}))["members"]
        assert [m["aid"] for m in members] == [w.aid("owner")]
        # group.list_my is real data, with the caller's role
        listed = await w.ok("owner", "group.list_my", {})
        assert [(g["group_id"], g["role"]) for g in listed["items"]] == [(gid, "owner")] and listed["total"] == 1
        assert (await w.ok("alice", "group.list_my", {}))["items"] == []


async def test_events_are_pushed_and_pullable_within_the_membership_window(devnet_inproc):
    async with open_world(devnet_inproc) as w:
        for name in ("owner", "alice", "bob"):
            await w.add(name)
        gid = await make_group(w, members=("alice",))           # events 1 (upsert), 2 (alice added)
        await w.ok("owner", "group.add_member", {"group_id": gid, "aid": w.aid("bob")})  # 3
        await w.ok("owner", "group.kick", {"group_id": gid, "aid": w.aid("alice")})        # 4
        for who in ("owner", "alice", "bob"):
            await w.drain(who)
        owner_seen = [(e["event_seq"], e["action"]) for e in w.events("owner", "group.changed")]
        assert owner_seen == [(1, "upsert"), (2, "member_added"), (3, "member_added"), (4, "member_removed")]
        alice_seen = [(e["event_seq"], e["action"]) for e in w.events("alice", "group.changed")]
        assert alice_seen == [(2, "member_added"), (3, "member_added"), (4, "member_removed")]
        assert w.events("alice", "group.changed")[-1]["removed_aid"] == w.aid("alice")
        # bob's window starts at his own admission; alice's (removed) ends at her removal
        bob_pull = await w.ok("bob", "group.pull_events", {"group_id": gid, "after_event_seq": 0})
        assert [e["event_seq"] for e in bob_pull["events"]] == [3, 4]
        assert bob_pull["earliest_available_event_seq"] == 3 and bob_pull["cursor"]["join_seq"] == 2
        alice_pull = await w.ok("alice", "group.pull_events", {"group_id": gid, "after_event_seq": 0})
        assert [e["event_seq"] for e in alice_pull["events"]] == [2, 3, 4] and alice_pull["latest_event_seq"] == 4
        ack = await w.ok("alice", "group.ack_events", {"group_id": gid, "event_seq": 99})
        assert ack["ack_seq"] == 4  # clamped to the end of her window
        await w.ok("owner", "group.add_member", {"group_id": gid, "aid": w.aid("alice")})  # 5
        await w.drain("bob")
        assert [e["event_seq"] for e in w.events("bob", "group.changed")] == [3, 4, 5]
        readmitted = await w.ok("alice", "group.pull_events", {"group_id": gid, "after_event_seq": 0})
        assert [e["event_seq"] for e in readmitted["events"]] == [5]  # a fresh membership, a fresh window


async def test_join_requests_and_invites(devnet_inproc):
    async with open_world(devnet_inproc) as w:
        for name in ("owner", "alice", "bob", "carol"):
            await w.add(name)
        gid = await make_group(w, members=("alice",), join_question="why?")
        assert (await w.ok("bob", "group.request_join", {"group_id": gid}))["status"] == "question_required"
        pending = await w.ok("bob", "group.request_join", {"group_id": gid, "answer": "because", "message": "hi"})
        assert pending["status"] == "pending" and pending["request"]["aid"] == w.aid("bob")
        assert code(await w.call("alice", "group.list_join_requests", {"group_id": gid})) == groups.ROLE_INSUFFICIENT
        assert code(await w.call("alice", "group.review_join_request", {"group_id": gid, "aid": w.aid("bob")})) \
            == groups.ROLE_INSUFFICIENT
        listed = await w.ok("owner", "group.list_join_requests", {"group_id": gid})
        assert [r["aid"] for r in listed["items"]] == [w.aid("bob")]
        approved = await w.ok("owner", "group.review_join_request",
                              {"group_id": gid, "aid": w.aid("bob"), "approve": True})
        assert approved["status"] == "approved" and approved["member"]["role"] == "member"
        assert code(await w.call("owner", "group.review_join_request", {"group_id": gid, "aid": w.aid("bob")})) \
            == groups.GROUP_STATE_INVALID  # nothing pending any more
        await w.drain("bob")
        assert any(e["action"] == "join_approved" and e.get("event_seq") for e in w.events("bob", "group.changed"))
        # rejection: the applicant hears of it, without an event_seq (it cannot pull the group's events)
        await w.ok("carol", "group.request_join", {"group_id": gid, "answer": "x"})
        rejected = await w.ok("owner", "group.review_join_request", {"group_id": gid, "aid": w.aid("carol"),
                                                                     "approve": False, "reason": "no"})
        assert rejected["status"] == "rejected" and rejected["request"]["rejection_reason"] == "no"
        await w.drain("carol")
        carol_events = w.events("carol", "group.changed")
        assert [e["action"] for e in carol_events] == ["join_rejected"] and "event_seq" not in carol_events[0]
        assert code(await w.call("carol", "group.get_members", {"group_id": gid})) == groups.NOT_MEMBER
        # invite: a private group takes invites from owner/admin only; list_my_invites is real data
        assert code(await w.call("alice", "group.invite_member", {"group_id": gid, "aid": w.aid("carol")})) \
            == groups.ROLE_INSUFFICIENT
        invite = (await w.ok("owner", "group.invite_member",
                             {"group_id": gid, "invitee_aid": w.aid("carol")}))["invite"]
        again = (await w.ok("owner", "group.invite_member", {"group_id": gid, "invitee_aid": w.aid("carol")}))["invite"]
        assert again["invite_id"] == invite["invite_id"]  # idempotent per (group, invitee, inviter)
        await w.drain("carol")
        assert [e["invite_id"] for e in w.events("carol", "group.invite_created")] == [invite["invite_id"]]
        mine = await w.ok("carol", "group.list_my_invites", {"page": 1, "size": 200})
        assert [(i["group_id"], i["invite_ids"], i["status"]) for i in mine["items"]] == \
            [(gid, [invite["invite_id"]], "pending")]
        assert (await w.ok("bob", "group.list_my_invites", {}))["items"] == []
        wrong_invitee = await w.call("bob", "group.accept_invite", {"invite_id": invite["invite_id"]})
        assert code(wrong_invitee) == groups.INVITE_INVALID
        accepted = await w.ok("carol", "group.accept_invite", {"invite_id": invite["invite_id"]})
        assert accepted["status"] == "accepted" and accepted["member"]["aid"] == w.aid("carol")
        assert (await w.ok("carol", "group.list_my_invites", {}))["items"] == []
        # an open group admits on request
        open_gid = await make_group(w, visibility="public")
        assert (await w.ok("bob", "group.request_join", {"group_id": open_gid}))["status"] == "joined"


# --- messages ----------------------------------------------------------------------------------------------
async def test_sends_get_per_group_seqs_pushes_and_pulls_per_device(devnet_inproc):
    async with open_world(devnet_inproc) as w:
        for name in ("owner", "alice", "bob"):
            await w.add(name)
        await w.add("alice", "d2", conn_name="alice2")
        gid = await make_group(w, members=("alice", "bob"))
        other = await make_group(w, members=("alice",))
        # alice has two devices; bob's wrap is aid-scoped (device "")
        seqs = []
        for i in range(5):
            mid = f"m-{i}"
            env = envelope(w.accounts["owner"], gid, mid, [(w.aid("alice"), "d1"), (w.aid("alice"), "d2"),
                                                           (w.aid("bob"), "")])
            r = await send(w, "owner", gid, [], message_id=mid, env=env)
            seqs.append(r["result"]["seq"])
        assert seqs == [1, 2, 3, 4, 5]
        assert (await send(w, "alice", other, ["owner"]))["result"]["seq"] == 1  # seqs are per group
        dup = await send(w, "owner", gid, [], message_id="m-0", env=envelope(
            w.accounts["owner"], gid, "m-0", [(w.aid("alice"), "d1"), (w.aid("bob"), "")]))
        assert dup["result"]["status"] == "duplicate" and dup["result"]["seq"] == 1
        for who, device in (("alice", "d1"), ("alice2", "d2"), ("bob", "d1")):
            await w.drain(who)
            pushes = [p for p in w.events(who, "group.v2.message_created") if p["group_id"] == gid]
            assert [p["seq"] for p in pushes] == [1, 2, 3, 4, 5], who
            row = pushes[0]["inline_message"]
            split = json.loads(row["envelope_json"])
            assert row["version"] == "v2" and row["seq"] == 1 and row["message_id"] == "m-0"
            assert pushes[0]["target_device_id"] == device and split["delivery_device_id"] == device
            assert "recipients" not in split and split["recipient"]["aid"] == w.conns[who].identity.aid
            leaf = merkle.row_leaf_hash([split["recipient"][k] for k in ("aid", "device_id", "role", "key_source",
                                                                          "fp", "spk_id", "wrap_nonce", "wrapped_key")])
            assert merkle.verify_merkle_proof(leaf, split["merkle_proof"], split["recipients_digest"])
        await w.drain("owner")
        assert [p for p in w.events("owner", "group.v2.message_created") if p["group_id"] == gid] == []  # own sends
        # forward pull: pages, has_more, per-device rows
        page = await w.ok("alice", "group.v2.pull", {"group_id": gid, "after_seq": 0, "limit": 2})
        assert [m["seq"] for m in page["messages"]] == [1, 2] and page["has_more"] is True
        assert page["latest_message_seq"] == 5 and page["cursor"]["current_seq"] == 0
        page = await w.ok("alice", "group.v2.pull", {"group_id": gid, "after_seq": 2, "limit": 50,
                                                     "ack_up_to_seq": 2})
        assert [m["seq"] for m in page["messages"]] == [3, 4, 5] and page["has_more"] is False
        assert page["cursor"]["current_seq"] == 2  # the piggy-backed ack moved the cursor first
        # the sender has no wrap for its own device: its pull skips its own messages (and pages past them)
        own = await w.ok("owner", "group.v2.pull", {"group_id": gid, "after_seq": 0, "limit": 2})
        assert own["messages"] == [] and own["has_more"] is False and own["latest_message_seq"] == 5
        # tail: the newest window ending at the head
        tail = await w.ok("bob", "group.v2.pull", {"group_id": gid, "window_mode": "tail", "after_seq": 0, "limit": 2})
        assert (tail["window_start_seq"], tail["head_seq"], tail["covered_through_seq"]) == (4, 5, 5)
        assert [m["seq"] for m in tail["messages"]] == [4, 5]
        assert code(await w.call("bob", "group.v2.pull", {"group_id": gid, "window_mode": "tail",
                                                          "ack_up_to_seq": 1})) == rpc.INVALID_PARAMS
        # acks: per (aid, device, slot key), monotonic, clamped to the head
        assert (await w.ok("alice", "group.v2.ack", {"group_id": gid, "up_to_seq": 4}))["ack_seq"] == 4
        assert (await w.ok("alice", "group.v2.ack", {"group_id": gid, "up_to_seq": 3}))["ack_seq"] == 4
        assert (await w.ok("alice", "group.v2.ack", {"group_id": gid, "up_to_seq": 99}))["ack_seq"] == 5
        cursor = (await w.ok("alice2", "group.v2.pull", {"group_id": gid, "after_seq": 5}))["cursor"]
        assert cursor["current_seq"] == 0 and cursor["latest_seq"] == 5  # d2 has its own cursor
        # the cursor belongs to the connection: another device's cursor cannot be moved
        assert code(await w.call("alice", "group.v2.ack", {"group_id": gid, "up_to_seq": 1, "device_id": "d2"})) \
            == rpc.INVALID_PARAMS


async def test_envelopes_are_checked_against_the_group(devnet_inproc):
    async with open_world(devnet_inproc) as w:
        for name in ("owner", "alice", "bob", "carol"):
            await w.add(name)
        gid = await make_group(w, members=("alice", "bob"))
        await w.ok("bob", "group.v2.put_group_pk", group_prekey(w.accounts["bob"].identity.key, gid))
        owner = w.accounts["owner"]
        assert code(await send(w, "owner", gid, ["alice", "bob"], epoch=7)) == groups.EPOCH_STALE
        assert code(await send(w, "owner", gid, ["alice", "bob", "carol"])) == groups.RECIPIENTS_STALE  # not a member
        missing = await send(w, "owner", gid, ["alice"])  # bob has a device key: he must be wrapped
        assert code(missing) == groups.RECIPIENTS_STALE and missing["error"]["data"]["missing_aids"] == [w.aid("bob")]
        env = envelope(owner, gid, "m-x", [(w.aid("alice"), "d1"), (w.aid("bob"), "d1")])
        env["recipients_digest"] = "0" * 64
        assert code(await send(w, "owner", gid, [], message_id="m-x", env=env)) == rpc.INVALID_PARAMS
        env = envelope(owner, gid, "m-y", [(w.aid("alice"), "d1"), (w.aid("bob"), "d1")])
        env["aad"]["timestamp"] += 1  # the signature covers the AAD
        assert code(await send(w, "owner", gid, [], message_id="m-y", env=env)) == rpc.INVALID_PARAMS
        env = envelope(owner, gid, "m-z", [(w.aid("alice"), "d1"), (w.aid("bob"), "d1")])
        assert code(await send(w, "owner", gid, [], message_id="m-other", env=env)) == rpc.INVALID_PARAMS
        env = envelope(w.accounts["alice"], gid, "m-w", [(w.aid("owner"), "d1"), (w.aid("bob"), "d1")])
        assert code(await send(w, "owner", gid, [], message_id="m-w", env=env)) == rpc.INVALID_PARAMS  # aad.from
        assert code(await send(w, "carol", gid, ["owner"])) == groups.NOT_MEMBER
        # group methods the SDK signs are refused unsigned
        unsigned = await w.conns["alice"].call("group.v2.pull", {"group_id": gid, "after_seq": 0})
        assert code(unsigned) == rpc.CLIENT_SIGNATURE_INVALID
        assert (await send(w, "owner", gid, ["alice", "bob"]))["result"]["seq"] == 1


async def test_removed_member_is_locked_out_of_new_messages(devnet_inproc):
    async with open_world(devnet_inproc) as w:
        for name in ("owner", "alice", "bob"):
            await w.add(name)
        gid = await make_group(w, members=("alice", "bob"))
        await send(w, "owner", gid, ["alice", "bob"])
        epoch = (await w.ok("owner", "group.v2.bootstrap", {"group_id": gid}))["epoch"]
        await w.ok("owner", "group.kick", {"group_id": gid, "aid": w.aid("bob")})
        boot = await w.ok("owner", "group.v2.bootstrap", {"group_id": gid})
        assert boot["epoch"] == epoch + 1 and w.aid("bob") not in boot["member_aids"]
        assert w.aid("bob") not in {d["aid"] for d in boot["devices"]}
        # a sender still holding the old member set is refused twice over
        assert code(await send(w, "owner", gid, ["alice", "bob"], epoch=epoch)) == groups.EPOCH_STALE
        assert code(await send(w, "owner", gid, ["alice", "bob"], epoch=epoch + 1)) == groups.RECIPIENTS_STALE
        assert (await send(w, "owner", gid, ["alice"], epoch=epoch + 1))["result"]["seq"] == 2
        await w.drain("bob")
        assert [p["seq"] for p in w.events("bob", "group.v2.message_created")] == [1]
        for method, params in (("group.v2.pull", {"after_seq": 0}), ("group.v2.ack", {"up_to_seq": 2}),
                               ("group.v2.bootstrap", {}), ("group.get_members", {})):
            assert code(await w.call("bob", method, {"group_id": gid, **params})) == groups.NOT_MEMBER, method
        alice_rows = (await w.ok("alice", "group.v2.pull", {"group_id": gid, "after_seq": 0}))["messages"]
        assert [m["seq"] for m in alice_rows] == [1, 2]
        # readmitted, bob reads from his new admission on only
        await w.ok("owner", "group.add_member", {"group_id": gid, "aid": w.aid("bob")})
        await send(w, "owner", gid, ["alice", "bob"], epoch=epoch + 1)
        page = await w.ok("bob", "group.v2.pull", {"group_id": gid, "after_seq": 0})
        assert [m["seq"] for m in page["messages"]] == [3]
        assert page["earliest_available_message_seq"] == 3 and page["cursor"]["join_seq"] == 2


async def test_plain_group_messages_reach_all_members(devnet_inproc):
    async with open_world(devnet_inproc) as w:
        for name in ("owner", "alice"):
            await w.add(name)
        gid = await make_group(w, members=("alice",))
        sent = await w.ok("owner", "group.send", {"group_id": gid, "payload": {"type": "text", "text": "hi"}})
        assert sent["seq"] == 1 and sent["message_id"].startswith("gm-")
        await w.drain("alice")
        push = w.events("alice", "group.message_created")[0]
        assert push["inline_message"]["version"] == "v1" and push["inline_message"]["payload"]["text"] == "hi"
        rows = (await w.ok("alice", "group.v2.pull", {"group_id": gid, "after_seq": 0}))["messages"]
        assert [(r["seq"], r["payload"]["text"], r["encrypted"]) for r in rows] == [(1, "hi", False)]
        smuggled = await w.call("owner", "group.send", {"group_id": gid, "payload": {"type": "e2ee.group_encrypted"}})
        assert code(smuggled) == rpc.INVALID_PARAMS


# --- state chain, prekeys, bootstrap ------------------------------------------------------------------------
async def test_state_proposals_gate_new_members_into_the_wrap_set(devnet_inproc):
    async with open_world(devnet_inproc) as w:
        for name in ("owner", "alice", "bob"):
            await w.add(name)
        gid = await make_group(w, members=("alice",))
        for name in ("owner", "alice"):
            await w.ok(name, "group.v2.put_group_pk", group_prekey(w.accounts[name].identity.key, gid))
        boot = await w.ok("owner", "group.v2.bootstrap", {"group_id": gid})  # nothing signed yet: everyone
        assert boot["state_version"] == 0 and {d["aid"] for d in boot["devices"]} == {w.aid("owner"), w.aid("alice")}
        assert all(d["key_source"] == "group_device_prekey" for d in boot["devices"])
        assert code(await propose(w, "alice", gid, [w.aid("owner"), w.aid("alice")])) == groups.ROLE_INSUFFICIENT
        assert code(await propose(w, "owner", gid, [w.aid("owner")])) == groups.STATE_CONFLICT  # not the members
        members = [w.aid("owner"), w.aid("alice")]
        assert code(await propose(w, "owner", gid, members, version=5)) == groups.STATE_CONFLICT
        assert code(await propose(w, "owner", gid, [w.aid("owner"), w.aid("alice")], bad_signature=True)) \
            == rpc.INVALID_PARAMS
        proposal = (await propose(w, "owner", gid, [w.aid("owner"), w.aid("alice")]))["result"]
        assert (await w.ok("alice", "group.v2.get_proposal", {"group_id": gid}))["proposal"]["proposal_id"] \
            == proposal["proposal_id"]
        confirmed = await w.ok("owner", "group.v2.confirm_state",
                               {"group_id": gid, "proposal_id": proposal["proposal_id"]})
        assert confirmed["state_version"] == 1
        await w.drain("alice")
        assert [e["state_version"] for e in w.events("alice", "group.v2.state_confirmed")] == [1]
        state = await w.ok("alice", "group.get_state", {"group_id": gid})
        assert state["state_hash"] == groups.state_commitment(gid, 1, json.loads(state["membership_snapshot"]))
        # bob is added but not yet in a signed state: a member, not a wrap target
        await w.ok("owner", "group.add_member", {"group_id": gid, "aid": w.aid("bob")})
        boot = await w.ok("owner", "group.v2.bootstrap", {"group_id": gid})
        assert boot["pending_adds"] == [w.aid("bob")] and w.aid("bob") in boot["member_aids"]
        assert w.aid("bob") not in {d["aid"] for d in boot["devices"]}
        assert boot["state_signature"] and boot["state_actor_aid"] == w.aid("owner")
        signed = groups.state_sign_input(gid, 1, boot["state_hash_signed"], boot["state_membership_snapshot"])
        assert pki.verify_signature(w.accounts["owner"].identity.cert.public_key(), base64.b64decode(boot["state_signature"]),
                              signed)
        chain_before = boot["state_chain"]
        proposal = (await propose(w, "owner", gid, [w.aid("owner"), w.aid("alice"), w.aid("bob")]))["result"]
        await w.ok("owner", "group.v2.confirm_state", {"group_id": gid, "proposal_id": proposal["proposal_id"]})
        boot = await w.ok("owner", "group.v2.bootstrap", {"group_id": gid})
        assert boot["pending_adds"] == [] and boot["state_version"] == 2 and boot["state_chain"] != chain_before
        # a proposal overtaken by a membership change cannot be confirmed
        stale = (await propose(w, "owner", gid, [w.aid("owner"), w.aid("alice"), w.aid("bob")]))["result"]
        await w.ok("owner", "group.kick", {"group_id": gid, "aid": w.aid("bob")})
        assert code(await w.call("owner", "group.v2.confirm_state", {"group_id": gid,
                                                                    "proposal_id": stale["proposal_id"]})) \
            == groups.STATE_CONFLICT
        assert (await w.ok("owner", "group.get_state", {"group_id": gid}))["state_version"] == 2


async def test_group_prekeys_are_verified_and_members_only(devnet_inproc):
    async with open_world(devnet_inproc) as w:
        for name in ("owner", "alice"):
            await w.add(name)
        gid = await make_group(w)
        good = group_prekey(w.accounts["owner"].identity.key, gid)
        outsider = group_prekey(w.accounts["alice"].identity.key, gid)
        assert code(await w.call("alice", "group.v2.put_group_pk", outsider)) == groups.NOT_MEMBER
        forged = dict(good, spk_signature=pki.b64e(pki.sign_raw(w.accounts["alice"].identity.key, b"x")))
        assert code(await w.call("owner", "group.v2.put_group_pk", forged)) == rpc.E2EE_PREKEY_INVALID
        assert code(await w.call("owner", "group.v2.put_group_pk", dict(good, spk_id="sha256:" + "0" * 16))) \
            == rpc.E2EE_PREKEY_INVALID
        assert (await w.ok("owner", "group.v2.put_group_pk", good))["spk_id"] == good["spk_id"]
        devices = (await w.ok("owner", "group.v2.bootstrap", {"group_id": gid}))["devices"]
        assert [(d["device_id"], d["spk_id"], d["key_source"]) for d in devices] == \
            [("d1", good["spk_id"], "group_device_prekey")]
        ik = pki.spki_der(w.accounts["owner"].identity.cert.public_key())
        assert devices[0]["ik_pk"] == pki.b64e(ik)


async def test_thoughts_are_member_only_and_keep_the_latest_head(devnet_inproc):
    async with open_world(devnet_inproc) as w:
        for name in ("owner", "alice", "bob"):
            await w.add(name)
        gid = await make_group(w, members=("alice",))
        ctx = {"type": "run", "id": "r1"}

        async def put(thought_id: str) -> dict:
            env = envelope(w.accounts["owner"], gid, thought_id, [(w.aid("alice"), "d1")])
            return await w.call("owner", "group.thought.put", {"group_id": gid, "payload": env, "encrypted": True,
                                                               "thought_id": thought_id, "timestamp": 1,
                                                               "context": ctx})
        assert (await put("gt-1"))["result"]["stored_count"] == 1
        assert (await put("gt-2"))["result"]["stored_count"] == 2
        got = await w.ok("alice", "group.thought.get", {"group_id": gid, "sender_aid": w.aid("owner"), "context": ctx})
        assert got["found"] is True and [t["thought_id"] for t in got["thoughts"]] == ["gt-1", "gt-2"]
        assert got["thoughts"][0]["payload"]["recipients"]  # stored verbatim: readers need the full wrap set
        none = await w.ok("alice", "group.thought.get", {"group_id": gid, "sender_aid": w.aid("owner"),
                                                         "context": {"type": "run", "id": "other"}})
        assert none["found"] is False and none["thoughts"] == []
        assert code(await w.call("bob", "group.thought.get", {"group_id": gid, "sender_aid": w.aid("owner"),
                                                              "context": ctx})) == groups.NOT_MEMBER
        empty = envelope(w.accounts["owner"], gid, "gt-3", [])
        assert code(await w.call("owner", "group.thought.put", {"group_id": gid, "payload": empty, "encrypted": True,
                                                                "thought_id": "gt-3", "context": ctx})) \
            == rpc.INVALID_PARAMS
