"""GroupKeys / GroupSync decisions that need no gateway: the signed-state check a sender makes
before trusting a bootstrap, the receive-side bindings of a group row, and which pushed rows may
be consumed inline. Keys are generated here; peer keys come from a stub instead of /pki/cert."""
from __future__ import annotations

import json
from types import SimpleNamespace
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from aund.aun.e2ee import Target, encrypt_group, snapshot_json, state_commitment, state_sign_input
from aund.aun.groups import GroupKeys, GroupSync
from aund.aun.messaging import P2PKeys
from aund.devnet.gateway import per_device_envelope
from aund.errors import E2EEError
from aund.identity import pki

GID = "g-0123456789.aid.test"
ALICE, BOB, CAROL, MALLORY = "alice.aid.test", "bob.aid.test", "carol.aid.test", "mallory.aid.test"


class StubE2EE:
    """What GroupKeys uses of its P2PKeys, with peer keys from a dict."""

    _verified_target = P2PKeys._verified_target

    def __init__(self, aid: str, keys: dict[str, ec.EllipticCurvePrivateKey]) -> None:
        self.aid, self.device_id = aid, "dev-" + aid.split(".")[0]
        self.identity = SimpleNamespace(private_key=keys[aid])
        self.store = None
        self.keys = keys

    async def peer_ik(self, gateway: str, aid: str, fingerprint: str = "") -> ec.EllipticCurvePublicKey:
        if aid not in self.keys:
            raise E2EEError(f"no certificate for {aid}", data={"reason": "sender_key_unavailable"})
        return self.keys[aid].public_key()

    def _spk_lookup(self, spk_id: str) -> Any:
        return None


@pytest.fixture
def keys() -> dict[str, ec.EllipticCurvePrivateKey]:
    return {aid: ec.generate_private_key(ec.SECP256R1()) for aid in (ALICE, BOB, CAROL, MALLORY)}


def signed_boot(keys: dict[str, Any], version: int, members: list[str], *, actor: str = ALICE,
                admins: tuple[str, ...] = (ALICE,), devices: list[str] | None = None, signer: str | None = None,
                level: str = "end_to_end") -> dict[str, Any]:
    """A bootstrap as the devnet answers, with a state signed by `signer` (default: the actor)."""
    payload = {"members": [{"aid": a, "devices": []} for a in members], "audit_aids": [],
               "admin_set": {"admin_aids": list(admins), "threshold": 1}, "join_policy_hash": None,
               "recovery_quorum": None, "history_policy": "recent_7_days", "wrap_protocol": "3DH"}
    snapshot = snapshot_json(payload)
    state_hash = state_commitment(GID, version, payload)
    signature = pki.b64e(pki.sign_der(keys[signer or actor], state_sign_input(GID, version, state_hash, snapshot)))
    devs = [{"aid": a, "device_id": "dev-" + a.split(".")[0], "ik_pk": pki.public_key_b64(keys[a].public_key())}
            for a in (devices if devices is not None else members)]
    return {"group_id": GID, "epoch": 2, "devices": devs, "member_aids": members, "state_version": version,
            "state_hash": state_hash, "state_hash_signed": state_hash, "state_chain": "aa" * 32,
            "state_signature": signature, "state_actor_aid": actor, "state_membership_snapshot": snapshot,
            "e2ee_security_level": level}


async def refused(session: GroupKeys, boot: dict[str, Any], reason: str) -> None:
    with pytest.raises(E2EEError) as info:
        await session.verify_state("ws://gw", GID, boot)
    assert info.value.data["reason"] == reason, info.value


async def test_signed_state_is_verified_before_use(keys):
    session = GroupKeys(StubE2EE(BOB, keys))
    boot = signed_boot(keys, 3, [ALICE, BOB, CAROL])
    assert await session.verify_state("ws://gw", GID, boot) == {
        "state_version": 3, "state_hash": boot["state_hash"], "state_chain": "aa" * 32}
    # a signature by someone else, a snapshot that is not the one signed, a missing signature
    await refused(session, signed_boot(keys, 4, [ALICE, BOB], signer=MALLORY), "bad_state_signature")
    forged = signed_boot(keys, 4, [ALICE, BOB])
    forged["state_membership_snapshot"] = forged["state_membership_snapshot"].replace(BOB, MALLORY)
    await refused(session, forged, "bad_state_signature")
    unbound = signed_boot(keys, 4, [ALICE, BOB])  # validly signed, but the hash is not the snapshot's
    unbound["state_hash_signed"] = "cd" * 32
    unbound["state_signature"] = pki.b64e(pki.sign_der(keys[ALICE], state_sign_input(
        GID, 4, "cd" * 32, unbound["state_membership_snapshot"])))
    await refused(session, unbound, "bad_state_signature")
    unsigned = dict(signed_boot(keys, 4, [ALICE, BOB]), state_signature="")
    await refused(session, unsigned, "bad_state_signature")
    # a proposer who signs itself into a state without being in its admin set
    await refused(session, signed_boot(keys, 4, [ALICE, BOB, MALLORY], actor=MALLORY), "bad_state_signature")
    # the server adds a wrap target the signed state does not name
    await refused(session, signed_boot(keys, 4, [ALICE, BOB], devices=[ALICE, BOB, MALLORY]), "wrap_set_unsigned")
    # ... which open (transport-level) groups allow
    open_boot = signed_boot(keys, 4, [ALICE, BOB], devices=[ALICE, BOB, MALLORY], level="transport")
    assert (await session.verify_state("ws://gw", GID, open_boot))["state_version"] == 4
    # and an older signed state (which still named carol) is a rollback
    await refused(session, boot, "state_rollback")
    # state 0: nothing signed yet, every member wraps
    assert (await session.verify_state("ws://gw", "g-other00000.aid.test", {"state_version": 0}))["state_version"] == 0


async def test_bootstrap_targets_skip_our_device_and_mark_self_sync(keys):
    session = GroupKeys(StubE2EE(BOB, keys))
    boot = signed_boot(keys, 1, [ALICE, BOB])
    boot["devices"].append({"aid": BOB, "device_id": "bob-phone", "ik_pk": pki.public_key_b64(keys[BOB].public_key())})

    class Link:
        gateway = "ws://gw"

        async def call(self, method: str, params: dict[str, Any], **kw: Any) -> dict[str, Any]:
            assert method == "group.v2.bootstrap" and params["group_id"] == GID
            return boot

    result = await session.bootstrap(Link(), GID)
    assert result.epoch == 2 and result.commitment["state_version"] == 1
    assert sorted((t.aid, t.device_id, t.role) for t in result.targets) == [
        (ALICE, "dev-alice", "member"), (BOB, "bob-phone", "self_sync")]
    boot["devices"][0]["ik_pk"] = pki.public_key_b64(keys[MALLORY].public_key())  # a substituted identity key
    with pytest.raises(E2EEError):
        await session.bootstrap(Link(), GID, fresh=True)


def row_for(envelope: dict[str, Any], aid: str, device: str, **extra: Any) -> dict[str, Any]:
    own = next(r for r in envelope["recipients"] if r[0] == aid and r[1] == device)
    split = per_device_envelope(envelope, own, device)
    aad = envelope["aad"]
    return {"seq": 5, "message_id": aad["message_id"], "group_id": GID, "from_aid": aad["from"],
            "sender_device_id": aad["from_device"], "version": "v2", "envelope_json": json.dumps(split),
            "t_server": 1, **extra}


@pytest.fixture
def sealed(keys):
    bob_ik = keys[BOB].public_key()
    return encrypt_group(sender_aid=ALICE, sender_device_id="dev-alice", sender_ik_private=keys[ALICE], group_id=GID,
                         epoch=2, targets=[Target(BOB, "dev-bob", "member", "aid_master", bob_ik)],
                         payload={"type": "text", "text": "hi"}, message_id="m-1", timestamp_ms=1,
                         protected_headers={"trace": "t"})


async def test_decode_row_binds_the_row(keys, sealed):
    session = GroupKeys(StubE2EE(BOB, keys))
    event, spk = await session.decode_row("ws://gw", GID, row_for(sealed, BOB, "dev-bob"))
    assert event.kind == "group.message.received" and spk == ""
    assert event.data["payload"] == {"type": "text", "text": "hi"} and event.data["encrypted"] is True
    assert event.data["protected_headers"]["trace"] == "t" and event.data["group_id"] == GID
    assert event.message_id == f"{GID}/m-1" and event.seq == 5 and event.sender == ALICE
    for change, reason in (({"message_id": "m-2"}, "aad_mismatch"),          # a replay under another id
                           ({"sender_device_id": "dev-x"}, "aad_mismatch"),  # another sending device
                           ({"epoch": 3}, "aad_mismatch"),
                           ({"from_aid": CAROL}, "fingerprint_mismatch"),    # claimed by another sender
                           ({"group_id": "g-elsewhere0.aid.test"}, "row_mismatch"),
                           ({"envelope_json": "{"}, "malformed_envelope")):
        event, _ = await session.decode_row("ws://gw", GID, row_for(sealed, BOB, "dev-bob", **change))
        assert event.kind == "message.undecryptable" and event.data["reason"] == reason, change
        assert event.data["group_id"] == GID
    # the same envelope delivered as a message of another group
    event, _ = await session.decode_row("ws://gw", "g-elsewhere0.aid.test",
                                        row_for(sealed, BOB, "dev-bob", group_id="g-elsewhere0.aid.test"))
    assert event.data["reason"] == "aad_mismatch"
    plain = {"seq": 6, "message_id": "gm-1", "group_id": GID, "from_aid": ALICE, "version": "v1",
             "payload": {"type": "text", "text": "clear"}}
    event, _ = await session.decode_row("ws://gw", GID, plain)
    assert event.kind == "group.message.received" and event.data["encrypted"] is False


def push(row: dict[str, Any], **head: Any) -> dict[str, Any]:
    return {"group_id": GID, "seq": row["seq"], "message_id": row["message_id"], "sender_aid": row["from_aid"],
            "sender_device_id": row["sender_device_id"], "target_device_id": "dev-bob", "inline_message": row, **head}


def test_inline_rows_must_agree_with_their_push(keys, sealed):
    link = SimpleNamespace(aid=BOB, config=SimpleNamespace(device_id="dev-bob", slot_id="main"))
    sync = GroupSync(link, None, None)
    row = row_for(sealed, BOB, "dev-bob")
    assert sync._inline_row("group.v2.message_created", GID, 5, push(row)) is row
    for bad in (push(row, message_id="m-other"), push(row, sender_aid=CAROL), push(row, target_device_id="dev-x"),
                push(row, sender_device_id="dev-x"), push(dict(row, seq=6)), push(dict(row, payload={"x": 1})),
                push(dict(row, version="v1"))):
        assert sync._inline_row("group.v2.message_created", GID, 5, bad) is None, bad
    assert sync._inline_row("group.message_created", GID, 5, push(row)) is None  # family must match the row
    assert sync._inline_row("group.v2.message_created", "g-elsewhere0.aid.test", 5, push(row)) is None


def test_own_sends_let_the_ack_move_past_them():
    link = SimpleNamespace(aid=BOB, config=SimpleNamespace(device_id="dev-bob", slot_id="main"))
    sync = GroupSync(link, None, None)
    for seq in (4, 5, 7):
        sync.note_own(GID, seq)
    assert sync._advance(GID, 3) == 5    # 4 and 5 were ours; 6 is someone else's
    assert sync._advance(GID, 6) == 7
    assert sync._own[GID] == set()


def test_refusals_that_stop_a_groups_sync_include_the_sdks_texts():
    from aund.aun.groups import _is_refusal
    from aund.errors import GatewayError

    for message, code in (("member is blocked from receiving g's messages", -33007), ("group is suspended", None),
                          ("blocked members receive nothing", None), ("x", -33003), ("not a member of g", None)):
        assert _is_refusal(GatewayError(message, remote_code=code)), (message, code)
    for message, code in (("rpc timeout", -32004), ("state moved on", -33012), ("internal", -32603)):
        assert not _is_refusal(GatewayError(message, remote_code=code)), (message, code)


async def test_member_blocked_stops_and_member_unblocked_resumes_the_sync():
    class Inbox:
        def __init__(self) -> None:
            self.rows: list[Any] = []

        async def commit(self, aid: str, events: list[Any], **kw: Any) -> list[Any]:
            self.rows += events
            return events

    link = SimpleNamespace(aid=BOB, config=SimpleNamespace(device_id="dev-bob", slot_id="main"))
    dropped: list[str] = []
    session = SimpleNamespace(invalidate=dropped.append, dissolved=set())
    inbox = Inbox()
    sync = GroupSync(link, session, inbox)
    await sync._on_changed(GID, {"action": "member_blocked", "aid": CAROL, "group_id": GID})
    assert GID not in sync._blocked  # someone else's block
    await sync._on_changed(GID, {"action": "member_blocked", "aid": BOB, "group_id": GID})
    assert GID in sync._blocked and dropped[-1] == GID
    await sync._on_changed(GID, {"action": "member_unblocked", "subject": BOB, "aid": BOB, "group_id": GID})
    assert GID not in sync._blocked and sync._recv.receive_nowait() == ("sync", GID, None)
    assert [e.data["action"] for e in inbox.rows] == ["member_blocked", "member_blocked", "member_unblocked"]
