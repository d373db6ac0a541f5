"""Unit tests of aund.aun.e2ee on its own (no SDK): encodings, helpers, errors and round trips.

Synchronous, in-process, no sleeps. Interop with fastaun lives in test_e2ee_vectors.py.
"""

from __future__ import annotations

import base64
import copy
import json
from typing import Any

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from hypothesis import given, settings
from hypothesis import strategies as st

from aund.aun.e2ee import (
    CONTEXT_DOMAIN,
    HEADERS_DOMAIN,
    E2EEDecryptError,
    E2EEEncryptError,
    Target,
    attach_auth,
    canonical_json,
    canonical_json_str,
    decrypt_p2p,
    encrypt_p2p,
    ik_fingerprint,
    load_public_key_b64,
    merkle_proof,
    normalize_protected_headers,
    public_key_b64,
    public_key_der,
    row_leaf_hash,
    sign_spk,
    spk_id_for,
    spki_sha256,
    verify_auth,
    verify_spk,
)
from aund.aun.e2ee import _envelope as envelope_kernel

CURVE = ec.SECP256R1()
ALICE, BOB = "alice.aid.test", "bob.aid.test"


def new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(CURVE)


class Party:
    def __init__(self, aid: str, device: str, *, with_spk: bool = True) -> None:
        self.aid, self.device = aid, device
        self.ik = new_key()
        self.spk = new_key() if with_spk else None

    def target(self, role: str = "peer", *, device: str | None = None) -> Target:
        device = self.device if device is None else device
        if self.spk is None:
            return Target(self.aid, device, role, "aid_master", self.ik.public_key())
        spk_pub = self.spk.public_key()
        return Target(self.aid, device, role, "peer_device_prekey", self.ik.public_key(), spk_pub, spk_id_for(spk_pub))

    def lookup(self, spk_id: str) -> ec.EllipticCurvePrivateKey | None:
        if self.spk is not None and spk_id == spk_id_for(self.spk.public_key()):
            return self.spk
        return None


def seal(sender: Party, targets: list[Target], payload: dict[str, Any] | None = None, **kwargs: Any) -> dict[str, Any]:
    params: dict[str, Any] = {
        "sender_aid": sender.aid,
        "sender_device_id": sender.device,
        "sender_ik_private": sender.ik,
        "targets": targets,
        "payload": payload if payload is not None else {"type": "text", "text": "hi"},
        "message_id": "m-1",
        "timestamp_ms": 1735689600123,
    }
    params.update(kwargs)
    return encrypt_p2p(**params)


def open_(envelope: dict[str, Any], me: Party, sender: Party, *, device: str | None = None, ik: Any = None, **kwargs: Any):
    return decrypt_p2p(
        envelope,
        my_aid=me.aid,
        my_device_id=me.device if device is None else device,
        my_ik_private=me.ik if ik is None else ik,
        spk_lookup=me.lookup,
        sender_ik_public=sender.ik.public_key(),
        **kwargs,
    )


# ---------------------------------------------------------------------------- canonical JSON

NO_FLOAT_JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**53) + 1, 2**53 - 1) | st.text(),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(), children, max_size=4),
    max_leaves=20,
)


@settings(max_examples=200, deadline=None, database=None)
@given(NO_FLOAT_JSON.filter(lambda v: canonical_ok(v)))
def test_canonical_equals_sorted_compact_json_without_floats(value: Any) -> None:
    # Without floats the rules coincide with the stdlib's sorted, compact, non-ASCII output.
    expected = json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    assert canonical_json(value) == expected
    assert json.loads(canonical_json(value)) == value


def canonical_ok(value: Any) -> bool:
    try:
        json.dumps(value, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


@settings(max_examples=200, deadline=None, database=None)
@given(st.floats(allow_nan=False, allow_infinity=False))
def test_canonical_floats_round_trip_without_exponent(value: float) -> None:
    text = canonical_json_str(value) if abs(value) < 2**53 or not value.is_integer() else None
    if text is None:
        with pytest.raises(ValueError):
            canonical_json(value)
        return
    assert "e" not in text and "E" not in text
    assert float(text) == value
    if value.is_integer():
        assert "." not in text


@pytest.mark.parametrize(
    ("value", "error"),
    [
        (b"bytes", TypeError),
        ({1: "int key"}, TypeError),
        ({1, 2}, TypeError),
        (2**53, ValueError),
        (float("nan"), ValueError),
        ("\udc00", UnicodeEncodeError),
    ],
)
def test_canonical_rejects(value: Any, error: type[Exception]) -> None:
    with pytest.raises(error):
        canonical_json(value)


def test_canonical_depth_limit() -> None:
    deep: Any = 1
    for _ in range(300):
        deep = [deep]
    with pytest.raises(ValueError, match="deep"):
        canonical_json(deep)
    assert canonical_json([[[]]]) == b"[[[]]]"


# --------------------------------------------------------------------------- small helpers


def test_hkdf_matches_rfc5869_implementation() -> None:
    ikm, salt = bytes(range(96)), bytes(range(16))
    for info in (b"AUN-V2-3DH", b"AUN-V2-1DH"):
        reference = HKDF(algorithm=hashes.SHA256(), length=32, salt=salt, info=info).derive(ikm)
        assert envelope_kernel._hkdf32(ikm, salt, info + b"\x01") == reference


def test_key_encodings_and_fingerprints() -> None:
    key = new_key().public_key()
    der = public_key_der(key)
    assert base64.b64decode(public_key_b64(key)) == der
    assert public_key_der(load_public_key_b64(public_key_b64(key))) == der
    assert ik_fingerprint(key) == ik_fingerprint(der) == spk_id_for(key)
    assert ik_fingerprint(key).startswith("sha256:") and len(ik_fingerprint(key)) == 23
    p384 = ec.generate_private_key(ec.SECP384R1()).public_key()
    for bad in (public_key_b64(p384), "!!", base64.b64encode(b"junk").decode(), 5):
        with pytest.raises(ValueError):
            load_public_key_b64(bad)  # type: ignore[arg-type]


def test_spk_sign_and_verify() -> None:
    ik, spk = new_key(), new_key()
    spk_b64, spk_id = public_key_b64(spk.public_key()), spk_id_for(spk.public_key())
    signature = sign_spk(ik, spk.public_key(), 1735689600)
    assert signature == sign_spk(ik, spk.public_key(), 1735689600)  # RFC 6979: deterministic
    assert len(base64.b64decode(signature)) == 64
    assert verify_spk(ik.public_key(), spk_b64, spk_id, signature, 1735689600)
    assert verify_spk(ik.public_key(), spk_b64, spk_id, signature, "1735689600")
    for ts in (1735689601, 1735689600.5, True, None, "17x", "", []):
        assert not verify_spk(ik.public_key(), spk_b64, spk_id, signature, ts)
    assert not verify_spk(ik.public_key(), spk_b64, spk_id, "not base64", 1735689600)
    assert not verify_spk(ik.public_key(), "AAAA", spk_id, signature, 1735689600)
    assert not verify_spk(ik.public_key(), spk_b64, spk_id, signature[:-4], 1735689600)
    assert not verify_spk(new_key().public_key(), spk_b64, spk_id, signature, 1735689600)
    # The IK published as its own SPK is accepted without a signature, as the SDK does.
    ik_b64 = public_key_b64(ik.public_key())
    assert verify_spk(ik.public_key(), ik_b64, spk_id_for(ik.public_key()), "", None)
    with pytest.raises(TypeError):
        sign_spk(ik, spk.public_key(), True)  # type: ignore[arg-type]


def test_normalize_protected_headers() -> None:
    payload = {"type": "text"}
    headers = normalize_protected_headers({" X-Trace ": 5, "a": None, "obj": {"b": 1, "a": [1.0]}}, payload)
    assert headers == {
        "x-trace": "5", "a": "", "obj": '{"a":[1],"b":1}', "payload_type": "text",
        "sdk_lang": "python", "sdk_version": "0.5.25",
    }
    assert normalize_protected_headers(headers, payload) == headers
    assert normalize_protected_headers(None, {"type": None}) == {"sdk_lang": "python", "sdk_version": "0.5.25"}
    assert normalize_protected_headers({"payload_type": "x"}, payload)["payload_type"] == "x"
    assert normalize_protected_headers({}, payload, sdk_lang="aund", sdk_version="1")["sdk_lang"] == "aund"
    for bad in ({"_auth": "x"}, {"has space": 1}, {"": 1}, {"ü": 1}, {"k": float("nan")}, ["not", "a", "map"]):
        with pytest.raises(E2EEEncryptError) as info:
            normalize_protected_headers(bad, payload)  # type: ignore[arg-type]
        assert info.value.reason_code == "invalid_header"


def test_metadata_auth_round_trip() -> None:
    master = bytes(range(32))
    sealed = attach_auth({"a": "1", "_auth": "old"}, master_key=master, domain=HEADERS_DOMAIN)
    assert set(sealed) == {"a", "_auth"} and sealed["_auth"]["alg"] == "HMAC-SHA256"
    assert verify_auth(sealed, master_key=master, domain=HEADERS_DOMAIN) == {"a": "1"}
    assert attach_auth({}, master_key=master, domain=HEADERS_DOMAIN) == {}
    assert verify_auth(None, master_key=master, domain=HEADERS_DOMAIN) == {}
    assert verify_auth({"_auth": {}}, master_key=master, domain=HEADERS_DOMAIN) == {}
    with pytest.raises(E2EEDecryptError) as info:
        verify_auth(sealed, master_key=master, domain=CONTEXT_DOMAIN)  # domains are separated
    assert info.value.reason_code == "context_mac_invalid"
    with pytest.raises(E2EEDecryptError) as info:
        verify_auth(sealed, master_key=bytes(32), domain=HEADERS_DOMAIN)
    assert info.value.reason_code == "header_mac_invalid"


# ------------------------------------------------------------------------------ round trips


def test_round_trip_3dh_and_1dh() -> None:
    alice, bob, dave = Party(ALICE, "laptop"), Party(BOB, "phone"), Party("dave.aid.test", "pc", with_spk=False)
    digest = spki_sha256(alice.ik.public_key())
    env = seal(alice, [bob.target()], protected_headers={"trace": "t"}, sender_ik_digest=digest)
    assert env["sender_cert_fingerprint"] == ik_fingerprint(alice.ik.public_key())
    with pytest.raises(E2EEDecryptError) as info:
        open_(env, bob, alice, sender_ik_digest=bytes(32))
    assert info.value.reason_code == "fingerprint_mismatch"
    result = open_(env, bob, alice, expected_from=ALICE, expected_to=BOB, expected_from_device="laptop",
                   expected_message_id="m-1", sender_ik_digest=digest)
    assert result.payload == {"type": "text", "text": "hi"}
    assert result.wrap_protocol == "3DH" and env["aad"]["wrap_protocol"] == "3DH"
    assert result.spk_id_used == spk_id_for(bob.spk.public_key())
    assert result.protected_headers["trace"] == "t" and result.role == "peer" and result.context is None
    assert env["need_render"] is True and env["payload_type"] == "text"

    env = seal(alice, [dave.target()], payload={"k": [1, 2]}, need_render=None)
    result = open_(env, dave, alice)
    assert result.payload == {"k": [1, 2]} and result.wrap_protocol == "1DH" and result.spk_id_used == ""
    assert env["recipients"][0][3:6] == ["aid_master", ik_fingerprint(dave.ik.public_key()), ""]
    assert "need_render" not in env and "payload_type" not in env


def test_round_trip_multi_device_sorted_rows() -> None:
    alice, bob = Party(ALICE, "laptop"), Party(BOB, "phone")
    bob_laptop = Target(BOB, "laptop", "peer", "aid_master", bob.ik.public_key())
    alice_tablet = Party(ALICE, "tablet")
    alice_tablet.ik = alice.ik  # one IK per AID, shared by its devices
    carol = Party("carol.aid.test", "desk", with_spk=False)
    targets = [bob.target(), bob_laptop, alice_tablet.target("self_sync"), carol.target("audit", device="")]
    env = seal(alice, targets, context={"type": "run", "id": "r"})
    assert env["aad"]["to"] == BOB and env["aad"]["wrap_protocol"] == "1DH+3DH"
    keys = [tuple(row[:3]) for row in env["recipients"]]
    assert keys == sorted(keys)
    assert open_(env, bob, alice, expected_to=BOB).context == {"type": "run", "id": "r"}
    assert open_(env, bob, alice, device="laptop").wrap_protocol == "1DH"
    assert open_(env, alice_tablet, alice, expected_to=BOB).role == "self_sync"
    assert open_(env, carol, alice, device="anything", expected_to=BOB).role == "audit"

    # A gateway's per-device split of the same envelope opens with its proof.
    index = keys.index((BOB, "phone", "peer"))
    split = {k: v for k, v in env.items() if k != "recipients"}
    split["recipient"] = dict(zip(("aid", "device_id", "role", "key_source", "fp", "spk_id", "wrap_nonce", "wrapped_key"), env["recipients"][index]))
    split["merkle_proof"] = merkle_proof([row_leaf_hash(row) for row in env["recipients"]], index)
    assert open_(split, bob, alice, require_merkle_proof=True).payload == {"type": "text", "text": "hi"}


def test_ik_alias_spk_and_to_override() -> None:
    alice, bob = Party(ALICE, "laptop"), Party(BOB, "tv", with_spk=False)
    ik_pub = bob.ik.public_key()
    target = Target(BOB, "tv", "peer", "peer_device_prekey", ik_pub, ik_pub, spk_id_for(ik_pub))
    env = seal(alice, [target], to_aid="someone.aid.test")
    assert env["aad"]["to"] == "someone.aid.test"
    result = open_(env, bob, alice)  # lookup finds nothing: the IK serves as the SPK
    assert result.wrap_protocol == "3DH" and result.spk_id_used == spk_id_for(ik_pub)


def test_prekey_ignored_without_prekey_key_source() -> None:
    alice, bob = Party(ALICE, "laptop"), Party(BOB, "phone")
    spk_pub = bob.spk.public_key()
    target = Target(BOB, "phone", "peer", "aid_master", bob.ik.public_key(), spk_pub, spk_id_for(spk_pub))
    env = seal(alice, [target])
    assert env["recipients"][0][3] == "aid_master" and env["recipients"][0][5] == ""
    assert open_(env, bob, alice).wrap_protocol == "1DH"


def test_self_sync_row_requires_our_own_sender() -> None:
    mallory, bob = Party("mallory.aid.test", "x"), Party(BOB, "phone")
    env = seal(mallory, [bob.target("self_sync")], to_aid="carol.aid.test")
    assert open_(env, bob, mallory).role == "self_sync"  # SDK behaviour without expectations
    with pytest.raises(E2EEDecryptError) as info:
        open_(env, bob, mallory, expected_to=BOB)
    assert info.value.reason_code == "aad_mismatch"


def test_row_selection_prefers_exact_device() -> None:
    alice, bob = Party(ALICE, "laptop"), Party(BOB, "phone")
    per_aid = Target(BOB, "", "peer", "aid_master", bob.ik.public_key())
    env = seal(alice, [per_aid, bob.target()])
    assert open_(env, bob, alice).wrap_protocol == "3DH"
    assert open_(env, bob, alice, device="other").wrap_protocol == "1DH"


@pytest.mark.parametrize(
    ("kwargs", "reason"),
    [
        ({"targets": []}, "no_targets"),
        ({"payload": ["not", "an", "object"]}, "invalid_payload"),
        ({"payload": {"n": float("nan")}}, "invalid_payload"),
        ({"payload": {"n": 2**60}}, "invalid_payload"),
        ({"message_id": b"bytes"}, "invalid_payload"),
        ({"timestamp_ms": True}, "invalid_payload"),
        ({"timestamp_ms": 2**60}, "invalid_payload"),
        ({"context": ["x"]}, "invalid_payload"),
        ({"context": {"v": {1, 2}}}, "invalid_payload"),
        ({"protected_headers": {"Bad Key": 1}}, "invalid_header"),
        ({"targets": ["not a Target"]}, "invalid_target"),
    ],
)
def test_encrypt_errors(kwargs: dict[str, Any], reason: str) -> None:
    alice, bob = Party(ALICE, "laptop"), Party(BOB, "phone")
    params = {"targets": [bob.target()], **kwargs}
    with pytest.raises(E2EEEncryptError) as info:
        seal(alice, **params)
    assert info.value.reason_code == reason


def test_duplicate_and_invalid_targets() -> None:
    alice, bob = Party(ALICE, "laptop"), Party(BOB, "phone")
    with pytest.raises(E2EEEncryptError) as info:
        seal(alice, [bob.target(), bob.target()])
    assert info.value.reason_code == "duplicate_target"
    p384 = ec.generate_private_key(ec.SECP384R1()).public_key()
    for args in [(BOB, "d", "peer", "aid_master", p384), (BOB, 1, "peer", "aid_master", bob.ik.public_key()),
                 (BOB, "d", "peer", "aid_master", bob.ik.public_key(), p384, "sha256:x")]:
        with pytest.raises(E2EEEncryptError) as info:
            Target(*args)  # type: ignore[arg-type]
        assert info.value.reason_code == "invalid_target"


def test_envelope_survives_json_transport() -> None:
    alice, bob = Party(ALICE, "laptop"), Party(BOB, "phone")
    env = seal(alice, [bob.target()], payload={"type": "text", "text": "é\u2028🎉", "f": 0.1})
    wire = json.loads(json.dumps(env, ensure_ascii=False, separators=(",", ":")))
    assert open_(wire, bob, alice).payload == {"type": "text", "text": "é\u2028🎉", "f": 0.1}
    again = copy.deepcopy(wire)
    again["nonce"] = base64.b64encode(b"\x00" * 12).decode()  # the body nonce is bound by GCM, not the signature
    with pytest.raises(E2EEDecryptError) as info:
        open_(again, bob, alice)
    assert info.value.reason_code == "body_decrypt_failed"
