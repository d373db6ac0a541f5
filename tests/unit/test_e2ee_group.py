"""Group E2EE v2 (``e2ee.group_encrypted``) and the V2 state commitment, against fastaun 0.5.25.

Vectors come from the SDK's own ``encrypt_group_message`` / ``decrypt_message`` /
``compute_state_commitment`` in a subprocess (``tests/interop/gen_fastaun_vectors.py group-gen``
and ``decrypt``); nothing from fastaun is imported here. Synchronous and sleep-free.
"""

from __future__ import annotations

import base64
import copy
import importlib.util
import json
from typing import Any

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

from tests.sdk_vectors import pem, private_key, run_sdk
from aund.aun.e2ee import (
    DECRYPT_REASON_CODES,
    E2EEDecryptError,
    E2EEEncryptError,
    Target,
    canonical_json,
    decrypt_group,
    decrypt_p2p,
    encrypt_group,
    encrypt_p2p,
    load_public_key_b64,
    public_key_b64,
    recipients_digest,
    snapshot_json,
    spk_id_for,
    state_commitment,
    state_sign_input,
)

pytestmark = [
    pytest.mark.interop,
    pytest.mark.skipif(importlib.util.find_spec("aun_core") is None, reason="fastaun (aun_core) is not installed"),
]

GROUP_ENVELOPES = ("group_multi", "group_per_device_split", "group_1dh_placeholder_state")
ALICE, BOB, CAROL = "alice.aid.test", "bob.aid.test", "carol.aid.test"
GID = "g-0123456789.aid.test"




@pytest.fixture(scope="module")
def vectors(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("fastaun_group") / "group_vectors.json"
    run_sdk("group-gen", str(out), timeout=60)
    return json.loads(out.read_text(encoding="utf-8"))






def vector(vectors: dict[str, Any], name: str) -> dict[str, Any]:
    return next(item for item in vectors["envelopes"] if item["name"] == name)


def open_as(vec: dict[str, Any], receiver: dict[str, Any], envelope: dict[str, Any] | None = None,
            **overrides: Any):
    spk = private_key(receiver["spk_private_pem"])
    env = envelope if envelope is not None else vec["envelope"]
    kwargs: dict[str, Any] = {
        "my_aid": receiver["aid"], "my_device_id": receiver["device_id"],
        "my_ik_private": private_key(receiver["ik_private_pem"]),
        "spk_lookup": lambda wanted: spk if spk is not None and wanted == receiver["spk_id"] else None,
        "sender_ik_public": load_public_key_b64(vec["sender_ik_b64"]),
        "expected_group_id": GID, "expected_from": vec["sender_aid"],
        "expected_from_device": vec["envelope"]["aad"]["from_device"],
        "expected_message_id": vec["envelope"]["aad"]["message_id"],
        "expected_epoch": vec["envelope"]["aad"]["epoch"],
    }
    kwargs.update(overrides)
    return decrypt_group(env, **kwargs)


def expect_reason(reason: str, vec: dict[str, Any], receiver: dict[str, Any], envelope: dict[str, Any] | None = None,
                  **overrides: Any) -> None:
    assert reason in DECRYPT_REASON_CODES
    with pytest.raises(E2EEDecryptError) as info:
        open_as(vec, receiver, envelope, **overrides)
    assert info.value.reason_code == reason, info.value


def b64d(text: str) -> bytes:
    return base64.b64decode(text, validate=True)


def b64e(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def flip_b64(text: str, index: int = 0) -> str:
    raw = bytearray(b64d(text))
    raw[index] ^= 1
    return b64e(bytes(raw))


def resign(envelope: dict[str, Any], sender: ec.EllipticCurvePrivateKey, *, redigest: bool = False) -> dict[str, Any]:
    """Re-seal a mutated envelope as a malicious sender could, to reach the checks behind the signature."""
    if redigest:
        envelope["recipients_digest"] = recipients_digest(envelope["recipients"])
    data = (b64d(envelope["ciphertext"]) + b64d(envelope["tag"]) + canonical_json(envelope["aad"])
            + bytes.fromhex(envelope["recipients_digest"]))
    r, s = decode_dss_signature(sender.sign(data, ec.ECDSA(hashes.SHA256())))
    envelope["sender_signature"] = b64e(r.to_bytes(32, "big") + s.to_bytes(32, "big"))
    return envelope


@pytest.fixture(scope="module")
def alice_key(vectors: dict[str, Any]) -> ec.EllipticCurvePrivateKey:
    key = private_key(vectors["keys"]["alice"]["ik_private_pem"])
    assert key is not None
    return key


@pytest.fixture(scope="module")
def multi(vectors: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    vec = vector(vectors, "group_multi")
    return vec, vec["receivers"][0]  # bob/phone: 3DH to his group prekey


# ----------------------------------------------------------------------------- SDK -> aund


def test_generator_produced_every_group_case(vectors: dict[str, Any]) -> None:
    assert vectors["sdk_version"] == "0.5.25" and vectors["group_id"] == GID
    assert {v["name"] for v in vectors["envelopes"]} == set(GROUP_ENVELOPES)
    assert len(vectors["state_commitments"]) == 6


@pytest.mark.parametrize("name", GROUP_ENVELOPES)
def test_aund_opens_sdk_group_envelope(vectors: dict[str, Any], name: str) -> None:
    vec = vector(vectors, name)
    for receiver in vec["receivers"]:
        result = open_as(vec, receiver)
        assert result.payload == vec["payload"]
        assert result.protected_headers == vec["protected_headers"]
        assert result.context == vec["context"]
        assert result.aad == vec["envelope"]["aad"]
        assert result.spk_id_used == receiver["spk_id"]
        assert result.wrap_protocol == ("3DH" if receiver["spk_id"] else "1DH")
        expected_role = {"alice-tablet": "self_sync", "carol-desk": "audit"}.get(receiver["device_id"], "member")
        assert result.role == expected_role


def test_sdk_group_aad_and_placeholder_commitment(vectors: dict[str, Any]) -> None:
    aad = vector(vectors, "group_multi")["envelope"]["aad"]
    assert aad["state_commitment"] == {"state_version": 3, "state_hash": "ab" * 32, "state_chain": "cd" * 32}
    placeholder = vector(vectors, "group_1dh_placeholder_state")["envelope"]["aad"]["state_commitment"]
    assert placeholder == {"state_version": 0, "state_hash": "", "state_chain": ""}


def test_per_device_split_needs_a_valid_proof(vectors: dict[str, Any]) -> None:
    vec = vector(vectors, "group_per_device_split")
    receiver = vec["receivers"][0]
    assert open_as(vec, receiver, require_merkle_proof=True).payload == vec["payload"]
    env = copy.deepcopy(vec["envelope"])
    env["merkle_proof"][0]["sibling"] = "00" * 32
    expect_reason("merkle_proof_invalid", vec, receiver, env)
    del env["merkle_proof"]
    expect_reason("merkle_proof_invalid", vec, receiver, env, require_merkle_proof=True)
    env = copy.deepcopy(vec["envelope"])
    env["recipient"]["wrapped_key"] = flip_b64(env["recipient"]["wrapped_key"])
    expect_reason("merkle_proof_invalid", vec, receiver, env)


def test_state_commitment_matches_sdk(vectors: dict[str, Any]) -> None:
    for case in vectors["state_commitments"]:
        assert state_commitment(case["group_id"], case["state_version"], case["payload"]) == case["state_hash"]
        shuffled = copy.deepcopy(case["payload"])
        shuffled["members"].reverse()
        assert state_commitment(case["group_id"], case["state_version"], shuffled) == case["state_hash"]
    with pytest.raises(ValueError):
        state_commitment(GID, 2**32, {"members": []})


# ----------------------------------------------------------------------------- aund -> SDK


def test_our_group_envelope_has_the_sdk_shape(vectors: dict[str, Any], alice_key: Any) -> None:
    sdk = vector(vectors, "group_multi")["envelope"]
    bob_ik = load_public_key_b64(vectors["keys"]["bob"]["ik_public_b64"])
    bob_spk = private_key(vectors["keys"]["bob"]["phone_group_spk_private_pem"]).public_key()
    ours = encrypt_group(
        sender_aid=ALICE, sender_device_id=sdk["aad"]["from_device"], sender_ik_private=alice_key, group_id=GID,
        epoch=7, targets=[Target(BOB, "phone", "member", "group_device_prekey", bob_ik, bob_spk, spk_id_for(bob_spk))],
        payload={"type": "text", "text": "x"}, message_id=sdk["aad"]["message_id"],
        timestamp_ms=sdk["aad"]["timestamp"], state_commitment={"state_version": 3, "state_hash": "ab" * 32,
                                                               "state_chain": "cd" * 32},
        protected_headers={"X-Trace-Id": "g-1"}, context={"type": "run", "id": "run-7"})
    assert list(ours) == list(sdk)
    assert list(ours["aad"]) == list(sdk["aad"])
    assert {k: v for k, v in ours["aad"].items() if k != "wrap_protocol"} == \
        {k: v for k, v in sdk["aad"].items() if k != "wrap_protocol"}
    assert ours["aad"]["wrap_protocol"] == "3DH"
    assert ours["recipients"][0][:6] == [BOB, "phone", "member", "group_device_prekey",
                                         sdk["recipients"][1][4], spk_id_for(bob_spk)]
    assert ours["recipients_digest"] == recipients_digest(ours["recipients"])


def test_sdk_opens_aund_group_envelopes() -> None:
    curve = ec.SECP256R1()
    alice, bob, carol = (ec.generate_private_key(curve) for _ in range(3))
    bob_gspk, alice_tablet_spk = ec.generate_private_key(curve), ec.generate_private_key(curve)
    targets = [
        Target(BOB, "phone", "member", "group_device_prekey", bob.public_key(), bob_gspk.public_key(),
               spk_id_for(bob_gspk.public_key())),
        Target(BOB, "laptop", "member", "aid_master", bob.public_key()),
        Target(ALICE, "tablet", "self_sync", "peer_device_prekey", alice.public_key(), alice_tablet_spk.public_key(),
               spk_id_for(alice_tablet_spk.public_key())),
        Target(CAROL, "", "audit", "aid_master", carol.public_key()),
    ]
    payload = {"type": "text", "text": "héllo from aund 🎉", "n": 1.5, "tiny": 1e-7}
    envelope = encrypt_group(
        sender_aid=ALICE, sender_device_id="laptop", sender_ik_private=alice, group_id=GID, epoch=4,
        targets=targets, payload=payload, message_id="m-aund-group-0", timestamp_ms=1735689800000,
        state_commitment={"state_version": 2, "state_hash": "11" * 32, "state_chain": "22" * 32},
        protected_headers={"trace": "from-aund"}, context={"type": "run", "id": "r-1"})
    receivers = [(BOB, "phone", bob, bob_gspk), (BOB, "laptop", bob, None), (ALICE, "tablet", alice, alice_tablet_spk),
                 (CAROL, "desk", carol, None)]
    cases = [{"name": f"{aid}/{device}", "envelope": envelope, "my_aid": aid, "my_device_id": device,
              "my_ik_pem": pem(ik), "my_spk_pem": pem(spk) if spk is not None else None,
              "sender_ik_b64": public_key_b64(alice.public_key())} for aid, device, ik, spk in receivers]
    tampered = copy.deepcopy(cases[0])
    tampered["name"] = "tampered_group_id"
    tampered["envelope"]["aad"]["group_id"] = "g-other00000.aid.test"
    bad_mac = copy.deepcopy(cases[0])
    bad_mac["name"] = "bad_mac"
    bad_mac["envelope"]["protected_headers"]["trace"] = "forged"
    removed = copy.deepcopy(cases[1])
    removed.update(name="not_a_recipient", my_aid="dave.aid.test")
    commitment_inputs = [{"group_id": GID, "state_version": 9, "payload": {
        "members": [{"aid": BOB, "devices": [{"device_id": "z", "ik_fp": "sha256:1"}, {"device_id": "a", "ik_fp": ""}]},
                    {"aid": ALICE, "devices": []}],
        "audit_aids": [], "admin_set": {"admin_aids": [BOB, ALICE], "threshold": 1}, "join_policy_hash": None,
        "recovery_quorum": None, "history_policy": "recent_7_days", "wrap_protocol": "3DH"}}]
    request = {"cases": [*cases, tampered, bad_mac, removed], "state_commitments": commitment_inputs}
    reply = json.loads(run_sdk("decrypt", stdin=json.dumps(request), timeout=60))
    results = reply["cases"]
    assert len(results) == len(cases) + 3
    for result in results[: len(cases)]:
        assert result["ok"], result
        assert result["payload"] == payload
        assert result["context"] == {"type": "run", "id": "r-1"}
        assert result["protected_headers"] == {"trace": "from-aund", "payload_type": "text", "sdk_lang": "python",
                                               "sdk_version": "0.5.25"}
        assert result["aad"]["state_commitment"]["state_version"] == 2
    assert results[-3]["ok"] is False and "signature" in results[-3]["error"]
    assert results[-2]["ok"] is False and "_auth" in results[-2]["error"]
    assert results[-1]["ok"] is False
    c = commitment_inputs[0]
    assert reply["state_commitments"] == [state_commitment(c["group_id"], c["state_version"], c["payload"])]


# -------------------------------------------------------------------------- negative cases


def test_delivery_bindings_are_checked(multi: Any) -> None:
    vec, receiver = multi
    expect_reason("aad_mismatch", vec, receiver, expected_group_id="g-elsewhere0.aid.test")
    expect_reason("aad_mismatch", vec, receiver, expected_from=CAROL)
    expect_reason("aad_mismatch", vec, receiver, expected_from_device="other-device")
    expect_reason("aad_mismatch", vec, receiver, expected_message_id="m-another")
    expect_reason("aad_mismatch", vec, receiver, expected_epoch=8)


def test_head_copies_must_match_the_aad(multi: Any) -> None:
    vec, receiver = multi
    for key, value in (("group_id", "g-elsewhere0.aid.test"), ("epoch", 99)):
        env = copy.deepcopy(vec["envelope"])
        env[key] = value
        expect_reason("aad_mismatch", vec, receiver, env, expected_group_id=None, expected_epoch=None)


def test_replay_into_another_group_fails(multi: Any, alice_key: Any) -> None:
    vec, receiver = multi
    env = copy.deepcopy(vec["envelope"])
    env["aad"]["group_id"] = env["group_id"] = "g-elsewhere0.aid.test"
    expect_reason("bad_signature", vec, receiver, env, expected_group_id=None)
    # re-signed by the sender itself: the AAD feeds the wrap salt, so the old wraps no longer open
    expect_reason("unwrap_failed", vec, receiver, resign(env, alice_key), expected_group_id=None)
    expect_reason("aad_mismatch", vec, receiver, env)


def test_tampering_is_refused(multi: Any, alice_key: Any) -> None:
    vec, receiver = multi
    env = copy.deepcopy(vec["envelope"])
    env["ciphertext"] = flip_b64(env["ciphertext"])
    expect_reason("bad_signature", vec, receiver, env)
    expect_reason("body_decrypt_failed", vec, receiver, resign(env, alice_key))
    env = copy.deepcopy(vec["envelope"])
    env["recipients"][0][7] = flip_b64(env["recipients"][0][7])
    expect_reason("digest_mismatch", vec, receiver, env)
    env = copy.deepcopy(vec["envelope"])
    env["protected_headers"]["x-trace-id"] = "forged"
    expect_reason("header_mac_invalid", vec, receiver, env)
    env = copy.deepcopy(vec["envelope"])
    env["context"]["id"] = "forged"
    expect_reason("context_mac_invalid", vec, receiver, env)


def test_wrong_sender_key_and_missing_spk(vectors: dict[str, Any], multi: Any) -> None:
    vec, receiver = multi
    carol = load_public_key_b64(vectors["keys"]["carol"]["ik_public_b64"])
    expect_reason("fingerprint_mismatch", vec, receiver, sender_ik_public=carol)
    expect_reason("spk_missing", vec, receiver, spk_lookup=lambda _id: None)
    expect_reason("no_recipient_row", vec, receiver, my_aid="dave.aid.test")


def test_self_sync_row_only_for_own_messages(vectors: dict[str, Any]) -> None:
    """A member who is not the sender cannot be handed a self_sync row as if it had sent the message."""
    curve = ec.SECP256R1()
    alice, bob = ec.generate_private_key(curve), ec.generate_private_key(curve)
    env = encrypt_group(sender_aid=ALICE, sender_device_id="laptop", sender_ik_private=alice, group_id=GID, epoch=1,
                        targets=[Target(BOB, "phone", "self_sync", "aid_master", bob.public_key())],
                        payload={"text": "x"}, message_id="m-1", timestamp_ms=1)
    with pytest.raises(E2EEDecryptError) as info:
        decrypt_group(env, my_aid=BOB, my_device_id="phone", my_ik_private=bob, spk_lookup=lambda _id: None,
                      sender_ik_public=alice.public_key())
    assert info.value.reason_code == "aad_mismatch"


def test_malformed_group_fields(multi: Any, alice_key: Any) -> None:
    vec, receiver = multi
    env = copy.deepcopy(vec["envelope"])
    env["aad"]["epoch"] = "7"
    expect_reason("malformed_envelope", vec, receiver, resign(env, alice_key), expected_epoch=None)
    env = copy.deepcopy(vec["envelope"])
    env["aad"]["state_commitment"] = "sv3"
    expect_reason("malformed_envelope", vec, receiver, resign(env, alice_key))
    env = copy.deepcopy(vec["envelope"])
    del env["aad"]["group_id"]
    expect_reason("malformed_envelope", vec, receiver, env)


def test_kinds_do_not_cross(multi: Any) -> None:
    vec, receiver = multi
    bob = private_key(receiver["ik_private_pem"])
    with pytest.raises(E2EEDecryptError) as info:
        decrypt_p2p(vec["envelope"], my_aid=BOB, my_device_id="phone", my_ik_private=bob,
                    spk_lookup=lambda _id: None, sender_ik_public=load_public_key_b64(vec["sender_ik_b64"]))
    assert info.value.reason_code == "unsupported_envelope"
    alice = ec.generate_private_key(ec.SECP256R1())
    p2p = encrypt_p2p(sender_aid=ALICE, sender_device_id="d", sender_ik_private=alice,
                      targets=[Target(BOB, "phone", "peer", "aid_master", bob.public_key())], payload={"a": 1},
                      message_id="m-1", timestamp_ms=1)
    with pytest.raises(E2EEDecryptError) as info:
        decrypt_group(p2p, my_aid=BOB, my_device_id="phone", my_ik_private=bob, spk_lookup=lambda _id: None,
                      sender_ik_public=alice.public_key())
    assert info.value.reason_code == "unsupported_envelope"


def test_encrypt_refuses_bad_input() -> None:
    alice, bob = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    target = Target(BOB, "phone", "member", "aid_master", bob.public_key())
    base = dict(sender_aid=ALICE, sender_device_id="d", sender_ik_private=alice, group_id=GID, epoch=1,
                targets=[target], payload={"a": 1}, message_id="m-1", timestamp_ms=1)
    for change, reason in (({"targets": []}, "no_targets"), ({"epoch": "1"}, "invalid_payload"),
                           ({"epoch": True}, "invalid_payload"), ({"payload": [1]}, "invalid_payload"),
                           ({"targets": [target, target]}, "duplicate_target"),
                           ({"protected_headers": {"_auth": "x"}}, "invalid_header"),
                           ({"state_commitment": {"state_version": "x"}}, "invalid_payload")):
        with pytest.raises(E2EEEncryptError) as info:
            encrypt_group(**{**base, **change})
        assert info.value.reason_code == reason, change


def test_round_trip_and_sign_input_format() -> None:
    alice, bob = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    env = encrypt_group(sender_aid=ALICE, sender_device_id="d", sender_ik_private=alice, group_id=GID, epoch=2,
                        targets=[Target(BOB, "", "member", "aid_master", bob.public_key())],
                        payload={"text": "per-aid wrap"}, message_id="m-2", timestamp_ms=5, need_render=False)
    assert env["need_render"] is False and env["recipients"][0][1] == ""
    result = decrypt_group(env, my_aid=BOB, my_device_id="any", my_ik_private=bob, spk_lookup=lambda _id: None,
                           sender_ik_public=alice.public_key(), expected_group_id=GID, expected_epoch=2)
    assert result.payload == {"text": "per-aid wrap"} and result.role == "member"
    snap = snapshot_json({"members": [{"aid": "é.aid.test", "devices": []}], "b": None})
    assert snap == '{"b":null,"members":[{"aid":"é.aid.test","devices":[]}]}'
    assert state_sign_input(GID, 3, "ab", snap) == (
        '{"group_id":"' + GID + '","membership_snapshot":' + json.dumps(snap, ensure_ascii=False)
        + ',"state_hash":"ab","state_version":3}').encode("utf-8")
