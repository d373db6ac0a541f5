"""Reference vectors from the official SDK fastaun 0.5.25, for aund's E2EE v2 tests.

Runs in its own process with the interpreter that has ``fastaun`` installed. It imports the SDK
(``aun_core``) and ``cryptography`` (only to move keys around as PEM), and never ``aund``: every
expected value below is produced by the SDK's own functions, so the tests compare aund against
the SDK and not against itself.

Modes:

``gen OUT.json``
    Write canonical-JSON cases, Merkle roots/leaves/proofs, an SPK signature and complete P2P
    envelopes made by ``encrypt_p2p_message`` (3DH, 1DH, mixed multi-device with audit and
    context, per-AID, IK-as-SPK, and a server-style per-device split), together with the private
    keys (PKCS#8 PEM) each receiver needs. Every envelope is also opened with the SDK's
    ``decrypt_message`` before it is written, so a broken vector cannot reach the tests.

``group-gen OUT.json``
    Write group vectors: ``e2ee.group_encrypted`` envelopes made by ``encrypt_group_message``
    (3DH to a group prekey, 1DH, ``self_sync`` and ``audit`` rows, protected headers and context,
    a state commitment; the sv-0 placeholder; a server-style per-device split), each opened with
    the SDK's ``decrypt_message`` before it is written, plus V2 state commitments computed by
    ``compute_state_commitment``.

``decrypt``
    Read ``{"cases": [...], "spk_checks": [...], "canonical": [...]}`` as JSON on stdin, where a
    case is ``{"name", "envelope", "my_aid", "my_device_id", "my_ik_pem", "my_spk_pem"?,
    "sender_ik_b64"}``; open each envelope with the SDK exactly as its client would (fingerprint
    check, key selection, ``decrypt_message``), check SPK signatures with the SDK's primitive and
    canonicalise values; print ``{"cases": [...], "spk_checks": [...], "canonical": [...]}``. Group
    envelopes open the same way (the SDK's ``decrypt_message`` serves both kinds); an optional
    ``"state_commitments": [{"group_id", "state_version", "payload"}]`` is answered with the SDK's
    hex commitments under the same key.

Exit status is 0 unless the script itself is misused or crashes; per-case failures are data.
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
import random
import string
import struct
import sys
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from aun_core.client import AUNClient
from aun_core.v2.crypto.canonical import canonical_json
from aun_core.v2.crypto.ecdh import generate_p256_keypair_object
from aun_core.v2.crypto.ecdsa import ecdsa_sign_raw, ecdsa_verify_raw
from aun_core.v2.crypto.recipients import (
    compute_leaf_hash,
    compute_merkle_proof,
    compute_merkle_root,
    sort_recipients,
    verify_merkle_proof,
)
from aun_core.v2.e2ee.decrypt import decrypt_message
from aun_core.v2.e2ee.encrypt_group import encrypt_group_message
from aun_core.v2.e2ee.encrypt_p2p import encrypt_p2p_message
from aun_core.v2.state.commitment import compute_state_commitment
from aun_core.version import __version__ as SDK_VERSION

SUITE = "P256_HKDF_SHA256_AES_256_GCM"


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def fp(der: bytes) -> str:
    return "sha256:" + hashlib.sha256(der).hexdigest()[:16]


# ------------------------------------------------------------------------------------ keys


class Key:
    """One P-256 key pair in the shapes the SDK and the vectors file want."""

    def __init__(self) -> None:
        pair = generate_p256_keypair_object()
        self.scalar = pair.private_scalar
        self.der = pair.public_der
        self.pem = pair.private_key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        ).decode("ascii")

    @property
    def b64(self) -> str:
        return b64(self.der)

    @property
    def id(self) -> str:
        return fp(self.der)


def scalar_from_pem(pem: str) -> bytes:
    key = serialization.load_pem_private_key(pem.encode("ascii"), password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    return key.private_numbers().private_value.to_bytes(32, "big")


# ------------------------------------------------------------------------------- canonical

FIXED_CANONICAL: list[Any] = [
    {},
    [],
    {"b": 1, "a": 2, "A": 3, "_": 4, "aa": 5, "": 6},
    {"z": {"y": {"x": [3, 2, 1]}}, "a": [{"d": 1, "c": 2}]},
    ["quote\"", "back\\slash", "\b\f\n\r\t", "\x00\x01\x1f\x7f", "\u2028\u2029", "é世界🎉", "/"],
    {"é": 1, "e": 2, "\U0001d11e": 3, "\uffff": 4, "\u00ff": 5},
    [True, False, None, 0, -1, 1, 9007199254740991, -9007199254740991],
    [0.0, -0.0, 1.0, -2.0, 1.5, -1.5, 0.1, 1e-7, -1.25e-7, 1.7976931348623157e308 / 1e300, 5e-324,
     123456.789, 2.5e15, 1e15 + 0.5, 3.0e-5, 9007199254740991.0, 1e-100, 0.000123],
    {"text": "hello", "type": "text", "n": 1.5},
    "plain string",
    42,
    None,
]

ERROR_CANONICAL: list[Any] = [
    9007199254740992,
    -9007199254740992,
    [2**63],
    float("nan"),
    [float("inf")],
    {"x": float("-inf")},
    1e16,
    "\ud800",
    {"k": "lone \udfff"},
]


def random_string(rng: random.Random) -> str:
    pools = [
        string.ascii_letters + string.digits,
        "".join(chr(c) for c in range(0, 0x30)),
        "éüßøñ中文字符🎉𝄞\u2028\u00a0\ufeff\uffff",
    ]
    return "".join(rng.choice(rng.choice(pools)) for _ in range(rng.randint(0, 8)))


def random_float(rng: random.Random) -> float:
    choice = rng.randint(0, 3)
    if choice == 0:
        return rng.uniform(-1, 1) * 10 ** rng.randint(-30, 15)
    if choice == 1:
        return float(rng.randint(-(2**53) + 1, 2**53 - 1))
    if choice == 2:
        return round(rng.uniform(-1000, 1000), rng.randint(0, 6))
    while True:  # arbitrary finite, non-integral-or-in-range bit patterns
        value = struct.unpack("<d", rng.getrandbits(64).to_bytes(8, "little"))[0]
        if math.isfinite(value) and (not value.is_integer() or abs(value) < 2**53):
            return value


def random_value(rng: random.Random, depth: int = 0) -> Any:
    kind = rng.randint(0, 7 if depth < 4 else 5)
    if kind == 0:
        return None
    if kind == 1:
        return rng.random() < 0.5
    if kind == 2:
        return rng.randint(-(2**53) + 1, 2**53 - 1) if rng.random() < 0.5 else rng.randint(-1000, 1000)
    if kind == 3:
        return random_float(rng)
    if kind in (4, 5):
        return random_string(rng)
    if kind == 6:
        return [random_value(rng, depth + 1) for _ in range(rng.randint(0, 4))]
    return {random_string(rng): random_value(rng, depth + 1) for _ in range(rng.randint(0, 5))}


def canonical_cases(rng: random.Random) -> list[dict[str, Any]]:
    cases: list[dict[str, Any]] = []
    for value in FIXED_CANONICAL + [random_value(rng) for _ in range(400)]:
        cases.append({"input": value, "output": canonical_json(value).decode("utf-8")})
    for value in ERROR_CANONICAL:
        try:
            canonical_json(value)
        except (TypeError, ValueError) as exc:
            cases.append({"input": value, "error": type(exc).__name__})
        else:  # pragma: no cover - would mean the SDK changed its rules
            raise SystemExit(f"SDK canonical_json accepted {value!r}")
    return cases


# ---------------------------------------------------------------------------------- merkle


def merkle_cases(rng: random.Random) -> list[dict[str, Any]]:
    out = []
    for count in range(1, 10):
        rows = []
        for index in range(count):
            key = Key()
            spk = rng.random() < 0.5
            rows.append([
                f"user{rng.randint(0, 3)}.aid.test",
                rng.choice(["", f"dev-{index}", "phone", "laptop"]),
                rng.choice(["peer", "self_sync", "audit"]),
                "peer_device_prekey" if spk else "aid_master",
                key.id,
                Key().id if spk else "",
                b64(rng.randbytes(12)),
                b64(rng.randbytes(48)),
            ])
        rows = sort_recipients(rows)
        root = compute_merkle_root(rows)
        leaves = [compute_leaf_hash(row) for row in rows]
        proofs = [compute_merkle_proof(rows, index) for index in range(count)]
        assert all(verify_merkle_proof(leaves[i], proofs[i], root) for i in range(count))
        out.append({"rows": rows, "leaves": [leaf.hex() for leaf in leaves], "root": root, "proofs": proofs})
    return out


# ------------------------------------------------------------------------------------- spk


def spk_vector() -> dict[str, Any]:
    ik, spk = Key(), Key()
    timestamp = 1735689600
    # The exact bytes v2/session.py signs when it publishes a prekey.
    signature = ecdsa_sign_raw(ik.scalar, spk.der + spk.id.encode() + str(timestamp).encode())
    return {
        "ik_private_pem": ik.pem,
        "ik_public_b64": ik.b64,
        "spk_public_b64": spk.b64,
        "spk_id": spk.id,
        "timestamp": timestamp,
        "signature_b64": b64(signature),
    }


# ------------------------------------------------------------------------------- envelopes


def target(aid: str, device: str, role: str, ik: Key, spk: Key | None, key_source: str | None = None) -> dict[str, Any]:
    return {
        "aid": aid,
        "device_id": device,
        "role": role,
        "key_source": key_source or ("peer_device_prekey" if spk else "aid_master"),
        "ik_pk_der": ik.der,
        "spk_pk_der": spk.der if spk else None,
        "spk_id": spk.id if spk else "",
    }


def receiver(aid: str, device: str, ik: Key, spk: Key | None) -> dict[str, Any]:
    return {
        "aid": aid,
        "device_id": device,
        "ik_private_pem": ik.pem,
        "spk_private_pem": spk.pem if spk else None,
        "spk_id": spk.id if spk else "",
    }


def sdk_open(envelope: dict[str, Any], rcv: dict[str, Any], sender_der: bytes) -> Any:
    """The SDK client's decrypt path for one receiver (key choice as V2Session.get_decrypt_keys)."""
    if not AUNClient._v2_pub_der_matches_fingerprint(sender_der, envelope.get("sender_cert_fingerprint")):
        raise ValueError("sender fingerprint mismatch")
    if "recipient" in envelope:
        wanted = envelope["recipient"].get("spk_id", "")
    else:
        wanted = ""
        for row in envelope["recipients"]:
            if row[0] == rcv["my_aid"] and row[1] in (rcv["my_device_id"], ""):
                wanted = row[5]
                break
    ik = scalar_from_pem(rcv["my_ik_pem"])
    spk: bytes | None = None
    if wanted:
        if rcv.get("my_spk_pem") and rcv.get("my_spk_id", wanted) == wanted:
            spk = scalar_from_pem(rcv["my_spk_pem"])
        elif wanted == fp(_public_der_from_scalar(ik)):
            spk = ik
        else:
            raise ValueError(f"spk_missing: spk_id={wanted}")
    payload = decrypt_message(envelope, rcv["my_aid"], rcv["my_device_id"], ik, spk, sender_der)
    if payload is None:
        raise ValueError("recipient_not_found_or_envelope_verification_failed")
    return payload


def _public_der_from_scalar(scalar: bytes) -> bytes:
    key = ec.derive_private_key(int.from_bytes(scalar, "big"), ec.SECP256R1())
    return key.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def without_auth(value: Any) -> dict[str, Any]:
    return {k: v for k, v in value.items() if k != "_auth"} if isinstance(value, dict) else {}


def envelope_cases() -> tuple[dict[str, Any], list[dict[str, Any]]]:
    alice, alice_dev = Key(), "alice-laptop"
    bob, bob_phone_spk = Key(), Key()
    alice_tablet_spk = Key()
    carol = Key()
    sender = {"aid": "alice.aid.test", "device_id": alice_dev, "ik_priv": alice.scalar, "ik_pub_der": alice.der}
    keys = {
        "alice": {"aid": "alice.aid.test", "ik_private_pem": alice.pem, "ik_public_b64": alice.b64},
        "bob": {"aid": "bob.aid.test", "ik_private_pem": bob.pem, "ik_public_b64": bob.b64,
                "phone_spk_private_pem": bob_phone_spk.pem, "phone_spk_id": bob_phone_spk.id},
        "carol": {"aid": "carol.aid.test", "ik_private_pem": carol.pem, "ik_public_b64": carol.b64},
    }
    rich_payload = {
        "type": "text",
        "text": "héllo 世界 🎉 \n\t\"quoted\"",
        "n": 1.5,
        "big": 9007199254740991,
        "tiny": 1e-7,
        "nested": {"b": [1, 2, {"z": None}], "a": True},
    }
    specs: list[dict[str, Any]] = [
        {
            "name": "3dh_single",
            "targets": [target("bob.aid.test", "phone", "peer", bob, bob_phone_spk)],
            "audit": [],
            "payload": rich_payload,
            "headers": {"X-Trace-Id": "abc-123", " Priority ": 5, "tags": ["a", "b"], "empty": None},
            "context": None,
            "receivers": [receiver("bob.aid.test", "phone", bob, bob_phone_spk)],
        },
        {
            "name": "1dh_single",
            "targets": [target("bob.aid.test", "laptop", "peer", bob, None)],
            "audit": [],
            "payload": {"text": "no type here", "list": [1, "two", 3.25]},
            "headers": None,
            "context": None,
            "receivers": [receiver("bob.aid.test", "laptop", bob, None)],
        },
        {
            "name": "multi_mixed",
            "targets": [
                target("bob.aid.test", "phone", "peer", bob, bob_phone_spk),
                target("bob.aid.test", "laptop", "peer", bob, None),
                target("alice.aid.test", "alice-tablet", "self_sync", alice, alice_tablet_spk),
            ],
            "audit": [target("carol.aid.test", "", "audit", carol, None)],
            "payload": {"type": "event", "body": {"k": [True, False, None]}},
            "headers": {"payload_type": "custom/override", "trace": "t-1"},
            "context": {"type": "run", "id": "run-1", "step": 3},
            "receivers": [
                receiver("bob.aid.test", "phone", bob, bob_phone_spk),
                receiver("bob.aid.test", "laptop", bob, None),
                receiver("alice.aid.test", "alice-tablet", alice, alice_tablet_spk),
                receiver("carol.aid.test", "carol-desk", carol, None),
            ],
        },
        {
            "name": "per_aid",
            "targets": [target("bob.aid.test", "", "peer", bob, None)],
            "audit": [],
            "payload": {"type": "text", "text": "to every bob device"},
            "headers": {"a": "1"},
            "context": None,
            "receivers": [receiver("bob.aid.test", "any-device", bob, None)],
        },
        {
            "name": "ik_as_spk",
            "targets": [target("bob.aid.test", "tv", "peer", bob, bob)],
            "audit": [],
            "payload": {"type": "text", "text": "IK doubles as SPK"},
            "headers": None,
            "context": None,
            "receivers": [receiver("bob.aid.test", "tv", bob, None) | {"spk_id": bob.id}],
        },
    ]
    out: list[dict[str, Any]] = []
    for index, spec in enumerate(specs):
        envelope = encrypt_p2p_message(
            sender,
            {"targets": spec["targets"], "audit_recipients": spec["audit"]},
            spec["payload"],
            message_id=f"m-vector-{index}",
            timestamp=1735689600123 + index,
            protected_headers=spec["headers"],
            context=spec["context"],
        )
        envelope["need_render"] = True
        out.append(_finish(spec["name"], envelope, spec, alice))
        if spec["name"] == "multi_mixed":
            # What a gateway stores for bob/phone when it splits the envelope per device.
            rows = envelope["recipients"]
            index_mine = next(i for i, row in enumerate(rows) if row[:2] == ["bob.aid.test", "phone"])
            row = rows[index_mine]
            split = {k: v for k, v in envelope.items() if k != "recipients"}
            split["recipient"] = dict(zip(
                ("aid", "device_id", "role", "key_source", "fp", "spk_id", "wrap_nonce", "wrapped_key"), row
            ))
            split["merkle_proof"] = compute_merkle_proof(rows, index_mine)
            spec_split = dict(spec, receivers=[spec["receivers"][0]])
            out.append(_finish("per_device_split", split, spec_split, alice))
    return keys, out


def _finish(name: str, envelope: dict[str, Any], spec: dict[str, Any], sender: Key) -> dict[str, Any]:
    receivers = []
    for rcv in spec["receivers"]:
        request = {
            "my_aid": rcv["aid"], "my_device_id": rcv["device_id"], "my_ik_pem": rcv["ik_private_pem"],
            "my_spk_pem": rcv["spk_private_pem"], "my_spk_id": rcv["spk_id"],
        }
        payload = sdk_open(envelope, request, sender.der)
        if payload != spec["payload"]:  # pragma: no cover - the SDK disagrees with itself
            raise SystemExit(f"{name}: SDK round trip changed the payload")
        receivers.append(rcv)
    return {
        "name": name,
        "envelope": envelope,
        "payload": spec["payload"],
        "protected_headers": without_auth(envelope.get("protected_headers")),
        "context": without_auth(envelope.get("context")) or None,
        "sender_aid": "alice.aid.test",
        "sender_ik_b64": b64(sender.der),
        "receivers": receivers,
    }


def generate(path: str) -> None:
    rng = random.Random(0xA0D)
    keys, envelopes = envelope_cases()
    vectors = {
        "sdk": "fastaun",
        "sdk_version": SDK_VERSION,
        "suite": SUITE,
        "canonical": canonical_cases(rng),
        "merkle": merkle_cases(rng),
        "spk": spk_vector(),
        "keys": keys,
        "envelopes": envelopes,
    }
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(vectors, handle, ensure_ascii=True)


# ------------------------------------------------------------------------------- group


GROUP_ID = "g-0123456789.aid.test"


def group_envelope_cases() -> tuple[dict[str, Any], list[dict[str, Any]]]:
    alice, bob, carol = Key(), Key(), Key()
    bob_group_spk, alice_tablet_spk = Key(), Key()
    sender = {"aid": "alice.aid.test", "device_id": "alice-laptop", "ik_priv": alice.scalar, "ik_pub_der": alice.der}
    keys = {
        "alice": {"aid": "alice.aid.test", "ik_private_pem": alice.pem, "ik_public_b64": alice.b64},
        "bob": {"aid": "bob.aid.test", "ik_private_pem": bob.pem, "ik_public_b64": bob.b64,
                "phone_group_spk_private_pem": bob_group_spk.pem, "phone_group_spk_id": bob_group_spk.id},
        "carol": {"aid": "carol.aid.test", "ik_private_pem": carol.pem, "ik_public_b64": carol.b64},
    }
    commitment = {"state_version": 3, "state_hash": "ab" * 32, "state_chain": "cd" * 32}
    specs: list[dict[str, Any]] = [
        {
            "name": "group_multi",
            "targets": [
                target("bob.aid.test", "phone", "member", bob, bob_group_spk, "group_device_prekey"),
                target("bob.aid.test", "laptop", "member", bob, None),
                target("alice.aid.test", "alice-tablet", "self_sync", alice, alice_tablet_spk),
                target("carol.aid.test", "", "audit", carol, None),
            ],
            "epoch": 7,
            "state_commitment": commitment,
            "payload": {"type": "text", "text": "héllo group 🎉", "n": 1.5, "deep": {"b": [1, None], "a": True}},
            "headers": {"X-Trace-Id": "g-1", "tags": ["x"]},
            "context": {"type": "run", "id": "run-7"},
            "receivers": [
                receiver("bob.aid.test", "phone", bob, bob_group_spk),
                receiver("bob.aid.test", "laptop", bob, None),
                receiver("alice.aid.test", "alice-tablet", alice, alice_tablet_spk),
                receiver("carol.aid.test", "carol-desk", carol, None),
            ],
        },
        {
            "name": "group_1dh_placeholder_state",
            "targets": [target("bob.aid.test", "laptop", "member", bob, None)],
            "epoch": 1,
            "state_commitment": None,
            "payload": {"text": "no type, no state"},
            "headers": None,
            "context": None,
            "receivers": [receiver("bob.aid.test", "laptop", bob, None)],
        },
    ]
    out: list[dict[str, Any]] = []
    for index, spec in enumerate(specs):
        envelope = encrypt_group_message(
            sender, GROUP_ID, spec["epoch"], spec["targets"], spec["payload"],
            message_id=f"m-group-vector-{index}", timestamp=1735689700123 + index,
            state_commitment=spec["state_commitment"], protected_headers=spec["headers"], context=spec["context"],
        )
        envelope["need_render"] = True
        out.append(_finish(spec["name"], envelope, spec, alice))
        if spec["name"] == "group_multi":
            rows = envelope["recipients"]
            index_mine = next(i for i, row in enumerate(rows) if row[:2] == ["bob.aid.test", "phone"])
            split = {k: v for k, v in envelope.items() if k != "recipients"}
            fields = ("aid", "device_id", "role", "key_source", "fp", "spk_id", "wrap_nonce", "wrapped_key")
            split["recipient"] = dict(zip(fields, rows[index_mine]))
            split["merkle_proof"] = compute_merkle_proof(rows, index_mine)
            split["delivery_device_id"] = "phone"
            out.append(_finish("group_per_device_split", split, dict(spec, receivers=[spec["receivers"][0]]), alice))
    return keys, out


def state_commitment_cases(rng: random.Random) -> list[dict[str, Any]]:
    cases = []
    for index in range(6):
        members = [{"aid": f"m{rng.randint(0, 99)}-{i}.aid.test",
                    "devices": [{"device_id": f"d-{rng.randint(0, 9)}-{j}", "ik_fp": fp(Key().der)}
                                for j in range(rng.randint(0, 3))]}
                   for i in range(rng.randint(1, 5))]
        rng.shuffle(members)
        admins = [m["aid"] for m in members[: rng.randint(1, len(members))]]
        payload = {"members": members, "audit_aids": [f"audit{i}.aid.test" for i in range(rng.randint(0, 2))][::-1],
                   "admin_set": {"admin_aids": admins[::-1], "threshold": 1}, "join_policy_hash": None,
                   "recovery_quorum": None if index % 2 else {"quorum_aids": ["z.aid.test", "a.aid.test"]},
                   "history_policy": "recent_7_days", "wrap_protocol": "3DH", "note": "é世界"}
        group_id, version = f"g-{index:010d}.aid.test", rng.randint(1, 2**32 - 1)
        cases.append({"group_id": group_id, "state_version": version, "payload": payload,
                      "state_hash": compute_state_commitment(group_id, version, payload)})
    return cases


def generate_group(path: str) -> None:
    keys, envelopes = group_envelope_cases()
    vectors = {"sdk": "fastaun", "sdk_version": SDK_VERSION, "group_id": GROUP_ID, "keys": keys,
               "envelopes": envelopes, "state_commitments": state_commitment_cases(random.Random(0x6A0))}
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(vectors, handle, ensure_ascii=True)


# --------------------------------------------------------------------------------- decrypt


def decrypt_requests(request: dict[str, Any]) -> dict[str, Any]:
    cases = []
    for case in request.get("cases", []):
        result: dict[str, Any] = {"name": case.get("name")}
        try:
            sender_der = base64.b64decode(case["sender_ik_b64"])
            envelope = case["envelope"]
            payload = sdk_open(envelope, case, sender_der)
        except Exception as exc:  # noqa: BLE001 - every SDK failure is reported as data
            result.update(ok=False, error=f"{type(exc).__name__}: {exc}")
        else:
            result.update(
                ok=True,
                payload=payload,
                protected_headers=without_auth(envelope.get("protected_headers")),
                context=without_auth(envelope.get("context")) or None,
                aad=envelope.get("aad"),
            )
        cases.append(result)
    spk_checks = []
    for check in request.get("spk_checks", []):
        spk_der = base64.b64decode(check["spk_pk_b64"])
        data = spk_der + check["spk_id"].encode() + str(check["timestamp"]).encode()
        spk_checks.append(
            fp(spk_der) == check["spk_id"]
            and ecdsa_verify_raw(base64.b64decode(check["ik_public_b64"]), base64.b64decode(check["signature_b64"]), data)
        )
    canonical = [canonical_json(value).decode("utf-8") for value in request.get("canonical", [])]
    commitments = [compute_state_commitment(c["group_id"], c["state_version"], c["payload"])
                   for c in request.get("state_commitments", [])]
    return {"cases": cases, "spk_checks": spk_checks, "canonical": canonical, "state_commitments": commitments}


def main(argv: list[str]) -> int:
    if len(argv) == 3 and argv[1] == "gen":
        generate(argv[2])
        return 0
    if len(argv) == 3 and argv[1] == "group-gen":
        generate_group(argv[2])
        return 0
    if len(argv) == 2 and argv[1] == "decrypt":
        request = json.load(sys.stdin)
        json.dump(decrypt_requests(request), sys.stdout, ensure_ascii=True)
        sys.stdout.write("\n")
        return 0
    sys.stderr.write("usage: gen_fastaun_vectors.py gen OUT.json | group-gen OUT.json | decrypt < request.json\n")
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv))
