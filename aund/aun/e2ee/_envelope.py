"""The E2EE v2 envelope kernel shared by P2P (p2p.py) and group (group.py) envelopes: key and SPK
helpers, protected-header normalisation and the ``_auth`` MACs, the device targets, and the sealing
and opening of an envelope for a list of recipient rows (protocol 5.2, 5.3, 5.5 and 6). Private to
``aund.aun.e2ee``: the public names are re-exported by p2p.py and the package.

Pure layer: synchronous, no I/O, no trio, no clock and no key storage; imports only the stdlib and
``cryptography``. All randomness comes from ``os.urandom`` (and the library's key generation).
"""

from __future__ import annotations

import hmac
import json
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from hashlib import sha256
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from aund.identity import pki

from .canonical import canonical_json, canonical_json_str
from .errors import E2EEDecryptError, E2EEEncryptError
from .merkle import leaf_hash, merkle_root, row_leaf_hash, verify_merkle_proof

SUITE = "P256_HKDF_SHA256_AES_256_GCM"
ENVELOPE_VERSION = "v2"
KEY_SOURCE_AID_MASTER = "aid_master"
PREKEY_KEY_SOURCES = frozenset({"peer_device_prekey", "group_device_prekey"})
HEADERS_DOMAIN = b"aun-protected-headers-v1"
CONTEXT_DOMAIN = b"aun-protected-context-v1"
#: What the official SDK stamps into every protected header set. aund mirrors it by default so
#: receivers see the same header keys; callers may pass their own values.
SDK_LANG = "python"
SDK_VERSION = "0.5.25"

_SUITE_BYTES = SUITE.encode("ascii")
_INFO_3DH = b"AUN-V2-3DH\x01"  # HKDF info with the expand counter for the single 32-byte block
_INFO_1DH = b"AUN-V2-1DH\x01"
_METADATA_KEY_LABEL = b"aun-envelope-metadata-key-v1"
_CURVE = ec.SECP256R1()
_ECDH = ec.ECDH()
_VERIFY = ec.ECDSA(hashes.SHA256())
_HEADER_KEY = re.compile(r"[a-z0-9_-]+")
_HEX = frozenset("0123456789abcdef")

SpkLookup = Callable[[str], "ec.EllipticCurvePrivateKey | None"]


# --------------------------------------------------------------------------------------------
# Small encodings


_b64 = pki.b64e
_unb64 = pki.b64d
public_key_der = pki.spki_der
public_key_b64 = pki.public_key_b64
load_public_key_der = pki.load_public_key_der
load_public_key_b64 = pki.load_public_key_b64


def _fingerprint_of_der(der: bytes) -> str:
    return "sha256:" + sha256(der).hexdigest()[:16]


def spki_sha256(public_key: ec.EllipticCurvePublicKey) -> bytes:
    """SHA-256 of the SPKI DER: both fingerprint forms (16 and 64 hex) derive from it.

    Callers that cache a peer's IK can cache this digest beside it and pass it to
    :func:`encrypt_p2p`/:func:`decrypt_p2p` to save re-serialising the key per message.
    """
    return sha256(public_key_der(public_key)).digest()


def ik_fingerprint(public_key: ec.EllipticCurvePublicKey | bytes) -> str:
    """``"sha256:" + first 16 hex of SHA256(SPKI DER)``; accepts the key or its DER."""
    der = public_key if isinstance(public_key, bytes) else public_key_der(public_key)
    return _fingerprint_of_der(der)


def spk_id_for(public_key: ec.EllipticCurvePublicKey | bytes) -> str:
    """The ``spk_id`` of a signed prekey: same construction as :func:`ik_fingerprint`."""
    return ik_fingerprint(public_key)


_sign_raw = pki.sign_raw
_verify_raw = pki.verify_raw


def _hkdf32(ikm: bytes, salt: bytes, info_with_counter: bytes) -> bytes:
    # RFC 5869 with L = 32 = HashLen: one extract and a single expand block.
    prk = hmac.digest(salt, ikm, "sha256")
    return hmac.digest(prk, info_with_counter, "sha256")


# --------------------------------------------------------------------------------------------
# Signed prekeys


def _spk_sign_input(spk_der: bytes, spk_id: str, timestamp_text: str) -> bytes:
    return spk_der + spk_id.encode("utf-8") + timestamp_text.encode("ascii")


def sign_spk(ik_private: ec.EllipticCurvePrivateKey, spk_public: ec.EllipticCurvePublicKey, timestamp: int) -> str:
    """Base64 raw (r||s) ECDSA signature by the IK over ``spk_der || spk_id || str(timestamp)``.

    ``timestamp`` is Unix seconds. ``TypeError`` if it is not an ``int``.
    """
    if not isinstance(timestamp, int) or isinstance(timestamp, bool):
        raise TypeError("spk timestamp must be an int (Unix seconds)")
    spk_der = public_key_der(spk_public)
    return _b64(_sign_raw(ik_private, _spk_sign_input(spk_der, _fingerprint_of_der(spk_der), str(timestamp))))


def _spk_timestamp_text(value: Any) -> str | None:
    # Accepted like the SDK: an int, an integral float, or a string of ASCII digits.
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return str(int(value)) if value.is_integer() else None
    if isinstance(value, str):
        text = value.strip()
        if text and text.isascii() and text.isdigit():
            return str(int(text))
    return None


def verify_spk(
    ik_public: ec.EllipticCurvePublicKey,
    spk_pk_b64: str,
    spk_id: str,
    signature_b64: str,
    timestamp: Any,
) -> bool:
    """Check a published prekey as a sender must before wrapping to it. Never raises.

    True iff ``spk_pk_b64`` is a P-256 key whose id is ``spk_id`` and either the SPK *is* the IK
    (the unsigned IK alias the SDK accepts) or ``signature_b64`` is a valid raw signature by
    ``ik_public`` over ``spk_der || spk_id || str(timestamp)``.
    """
    try:
        if not isinstance(spk_id, str) or not isinstance(signature_b64, str):
            return False
        spk_der = _unb64(spk_pk_b64.strip()) if isinstance(spk_pk_b64, str) else b""
        load_public_key_der(spk_der)
        if spk_id != _fingerprint_of_der(spk_der):
            return False
        if spk_der == public_key_der(ik_public):
            return True
        timestamp_text = _spk_timestamp_text(timestamp)
        if timestamp_text is None:
            return False
        signature = _unb64(signature_b64.strip())
    except ValueError:
        return False
    return _verify_raw(ik_public, signature, _spk_sign_input(spk_der, spk_id, timestamp_text))


# --------------------------------------------------------------------------------------------
# protected_headers / context and their _auth MAC


def _payload_type(payload: Mapping[str, Any]) -> str:
    value = payload.get("type")
    return "" if value is None else str(value or "")


def normalize_protected_headers(
    headers: Mapping[str, Any] | None,
    payload: Mapping[str, Any],
    *,
    sdk_lang: str = SDK_LANG,
    sdk_version: str = SDK_VERSION,
) -> dict[str, str]:
    """Header set as the sender MACs it (protocol 6).

    Keys are trimmed and lower-cased and must match ``[a-z0-9_-]+`` (``_auth`` is reserved);
    string values are kept, ``None`` becomes ``""`` and anything else its canonical JSON text.
    ``payload_type`` defaults to ``payload["type"]``; ``sdk_lang``/``sdk_version`` are always set.
    Idempotent. Raises ``E2EEEncryptError("invalid_header")``.
    """
    out: dict[str, str] = {}
    if headers is not None and not isinstance(headers, Mapping):
        raise E2EEEncryptError("invalid_header", "protected headers must be an object")
    if headers:
        for raw_key, value in headers.items():
            key = str(raw_key or "").strip().lower()
            if key == "_auth" or not _HEADER_KEY.fullmatch(key):
                raise E2EEEncryptError("invalid_header", f"protected header key {raw_key!r} is not allowed")
            if value is None:
                out[key] = ""
            elif isinstance(value, str):
                out[key] = value
            else:
                try:
                    out[key] = canonical_json_str(value)
                except (TypeError, ValueError, RecursionError) as exc:
                    raise E2EEEncryptError("invalid_header", f"protected header {key!r}: {exc}") from None
    payload_type = _payload_type(payload)
    if payload_type:
        out.setdefault("payload_type", payload_type)
    out["sdk_lang"] = sdk_lang
    out["sdk_version"] = sdk_version
    return out


def _metadata_key(master_key: bytes) -> bytes:
    return hmac.digest(master_key, _METADATA_KEY_LABEL, "sha256")


def _mac_with(metadata_key: bytes, domain: bytes, body: Mapping[str, Any]) -> bytes:
    return hmac.digest(metadata_key, domain + b"\x00" + canonical_json(body), "sha256")


def protected_mac(master_key: bytes, domain: bytes, body: Mapping[str, Any]) -> bytes:
    """HMAC-SHA256(HMAC-SHA256(master_key, label), domain || 00 || canonical(body)).

    ``body`` must not contain ``_auth``. ``TypeError``/``ValueError`` if it is not canonical-JSON
    encodable.
    """
    return _mac_with(_metadata_key(master_key), domain, body)


def _sealed(metadata_key: bytes, domain: bytes, body: dict[str, Any]) -> dict[str, Any]:
    tag = _mac_with(metadata_key, domain, body)
    sealed = dict(body)
    sealed["_auth"] = {"alg": "HMAC-SHA256", "tag": _b64(tag)}
    return sealed


def attach_auth(body: Mapping[str, Any], *, master_key: bytes, domain: bytes) -> dict[str, Any]:
    """Copy of ``body`` (minus any old ``_auth``) with a fresh ``_auth`` member; ``{}`` if empty."""
    clean = {k: v for k, v in body.items() if k != "_auth"}
    if not clean:
        return {}
    return _sealed(_metadata_key(master_key), domain, clean)


def _check_auth(obj: Any, metadata_key: bytes, domain: bytes, reason: str) -> dict[str, Any]:
    if obj is None:
        return {}
    if not isinstance(obj, dict):
        raise E2EEDecryptError("malformed_envelope", "protected metadata must be an object")
    body = {k: v for k, v in obj.items() if k != "_auth"}
    if not body:
        return {}
    auth = obj.get("_auth")
    if not isinstance(auth, dict) or auth.get("alg") != "HMAC-SHA256":
        raise E2EEDecryptError(reason, "_auth missing or not HMAC-SHA256")
    tag_b64 = auth.get("tag")
    if not isinstance(tag_b64, str) or not tag_b64:
        raise E2EEDecryptError(reason, "_auth tag missing")
    try:
        tag = _unb64(tag_b64)
        expected = _mac_with(metadata_key, domain, body)
    except (ValueError, TypeError, RecursionError):
        raise E2EEDecryptError(reason, "_auth tag or body not decodable") from None
    if not hmac.compare_digest(tag, expected):
        raise E2EEDecryptError(reason, "_auth tag does not verify")
    return body


def verify_auth(obj: Any, *, master_key: bytes, domain: bytes) -> dict[str, Any]:
    """Verify the ``_auth`` member of ``protected_headers``/``context``; return the body without it.

    ``None`` or an object with nothing but ``_auth`` yields ``{}``. Raises ``E2EEDecryptError``:
    ``malformed_envelope`` if ``obj`` is not an object, else ``header_mac_invalid`` (headers
    domain) or ``context_mac_invalid`` (any other domain).
    """
    reason = "header_mac_invalid" if domain == HEADERS_DOMAIN else "context_mac_invalid"
    return _check_auth(obj, _metadata_key(master_key), domain, reason)


# --------------------------------------------------------------------------------------------
# Encrypt


@dataclass(frozen=True, slots=True)
class Target:
    """One recipient device (or, with ``device_id=""``, every device of an AID).

    ``role`` is ``peer``/``member``, ``self_sync`` or ``audit``; ``key_source`` is
    ``peer_device_prekey``/``group_device_prekey`` for a verified SPK, else ``aid_master``.
    The row is 3DH iff ``spk_id`` is set, ``spk_public`` is given and ``key_source`` is a prekey
    source; otherwise it is 1DH to ``ik_public`` with ``key_source="aid_master"`` and no
    ``spk_id``. The SPK must already have been checked with :func:`verify_spk`.
    Raises ``E2EEEncryptError("invalid_target")`` on construction if a field has the wrong type.
    """

    aid: str
    device_id: str
    role: str
    key_source: str
    ik_public: ec.EllipticCurvePublicKey
    spk_public: ec.EllipticCurvePublicKey | None = None
    spk_id: str = ""
    ik_fp: str = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        for name in ("aid", "device_id", "role", "key_source", "spk_id"):
            if not isinstance(getattr(self, name), str):
                raise E2EEEncryptError("invalid_target", f"Target.{name} must be a str")
        if not isinstance(self.ik_public, ec.EllipticCurvePublicKey) or not isinstance(
            self.ik_public.curve, ec.SECP256R1
        ):
            raise E2EEEncryptError("invalid_target", "Target.ik_public must be a P-256 public key")
        if self.spk_public is not None and (
            not isinstance(self.spk_public, ec.EllipticCurvePublicKey) or not isinstance(self.spk_public.curve, ec.SECP256R1)
        ):
            raise E2EEEncryptError("invalid_target", "Target.spk_public must be a P-256 public key")
        object.__setattr__(self, "ik_fp", ik_fingerprint(self.ik_public))

    @property
    def uses_spk(self) -> bool:
        """True if this target gets a 3DH row."""
        return bool(self.spk_id) and self.spk_public is not None and self.key_source in PREKEY_KEY_SOURCES




def _check_seal_inputs(targets: Sequence[Any], payload: Any, timestamp_ms: Any, ids: Sequence[Any]) -> None:
    if not targets:
        raise E2EEEncryptError("no_targets", "no recipient devices")
    if not isinstance(payload, Mapping):
        raise E2EEEncryptError("invalid_payload", "payload must be an object")
    if not isinstance(timestamp_ms, int) or isinstance(timestamp_ms, bool):
        raise E2EEEncryptError("invalid_payload", "timestamp_ms must be an int")
    for value in ids:
        if not isinstance(value, str):
            raise E2EEEncryptError("invalid_payload", "sender ids, message_id and to_aid must be str")
    for target in targets:
        if not isinstance(target, Target):
            raise E2EEEncryptError("invalid_target", "targets must be Target instances")


def _wrap_protocol(targets: Sequence[Target]) -> str:
    """``aad.wrap_protocol``: "1DH", "3DH" or "1DH+3DH" after the rows the targets get."""
    return "+".join(sorted({"3DH" if target.uses_spk else "1DH" for target in targets}))


def _seal_envelope(
    envelope_type: str,
    head: Mapping[str, Any],
    aad_scope: Mapping[str, Any],
    aad_extra: Mapping[str, Any],
    *,
    sender_aid: str,
    sender_device_id: str,
    sender_ik_private: ec.EllipticCurvePrivateKey,
    targets: Sequence[Target],
    payload: Mapping[str, Any],
    message_id: str,
    timestamp_ms: int,
    protected_headers: Mapping[str, Any] | None,
    context: Mapping[str, Any] | None,
    need_render: bool | None,
    sender_ik_digest: bytes | None,
) -> dict[str, Any]:
    """The part of E2EE v2 sealing that P2P and group envelopes share (protocol 5.3).

    The envelope starts ``type, version, suite, msg_type`` then the kind's ``head`` members; the
    AAD is ``from, from_device``, the kind's ``aad_scope`` (P2P ``to``; group ``group_id, epoch``),
    ``message_id, timestamp, suite, wrap_protocol`` and ``aad_extra`` (group
    ``state_commitment``), in the SDK's member order. The caller has checked the inputs with
    :func:`_check_seal_inputs`. Encrypts the canonical payload under a fresh master key, wraps the
    key per target (3DH or 1DH), sorts the rows, signs ``ct || tag || aad || merkle root`` and
    MACs headers and context.
    """
    aad = {"from": sender_aid, "from_device": sender_device_id, **aad_scope, "message_id": message_id,
           "timestamp": timestamp_ms, "suite": SUITE, "wrap_protocol": _wrap_protocol(targets), **aad_extra}
    try:
        aad_bytes = canonical_json(aad)
        plaintext = canonical_json(payload)
    except (TypeError, ValueError, RecursionError) as exc:
        raise E2EEEncryptError("invalid_payload", f"not canonical-JSON encodable: {exc}") from None

    headers = normalize_protected_headers(protected_headers, payload)
    if context is not None and not isinstance(context, Mapping):
        raise E2EEEncryptError("invalid_payload", "context must be an object")
    context_body = {k: v for k, v in context.items() if k != "_auth"} if context else None

    master_key = os.urandom(32)
    body_nonce = os.urandom(12)
    sealed = AESGCM(master_key).encrypt(body_nonce, plaintext, aad_bytes)

    ephemeral = ec.generate_private_key(_CURVE)
    ephemeral_der = public_key_der(ephemeral.public_key())
    salt = sha256(aad_bytes + ephemeral_der + _SUITE_BYTES).digest()[:16]

    dh_ik: dict[str, bytes] = {}  # devices of one AID share its IK: one ECDH per distinct IK
    entries: list[tuple[tuple[str, str, str], list[str], bytes]] = []
    for target in targets:
        shared = dh_ik.get(target.ik_fp)
        if shared is None:
            shared = dh_ik[target.ik_fp] = ephemeral.exchange(_ECDH, target.ik_public)
        if target.uses_spk:
            spk_public = target.spk_public
            assert spk_public is not None
            ikm = shared + sender_ik_private.exchange(_ECDH, spk_public) + ephemeral.exchange(_ECDH, spk_public)
            wrap_key = _hkdf32(ikm, salt, _INFO_3DH)
            key_source, spk_id = target.key_source, target.spk_id
        else:
            wrap_key = _hkdf32(shared, salt, _INFO_1DH)
            key_source, spk_id = KEY_SOURCE_AID_MASTER, ""
        wrap_nonce = os.urandom(12)
        wrapped = AESGCM(wrap_key).encrypt(wrap_nonce, master_key, None)
        sort_key = (target.aid, target.device_id, target.role)
        row = [*sort_key, key_source, target.ik_fp, spk_id, _b64(wrap_nonce), _b64(wrapped)]
        entries.append((sort_key, row, leaf_hash(*sort_key, key_source, target.ik_fp, spk_id, wrap_nonce, wrapped)))

    entries.sort(key=lambda entry: entry[0])
    for previous, current in zip(entries, entries[1:]):
        if previous[0] == current[0]:
            raise E2EEEncryptError("duplicate_target", f"two targets for {current[0]!r}")
    root = merkle_root([entry[2] for entry in entries])

    ciphertext, tag = sealed[:-16], sealed[-16:]
    signature = _sign_raw(sender_ik_private, ciphertext + tag + aad_bytes + root)
    if sender_ik_digest is None:
        sender_ik_digest = spki_sha256(sender_ik_private.public_key())

    envelope: dict[str, Any] = {"type": envelope_type, "version": ENVELOPE_VERSION, "suite": SUITE,
                                "msg_type": "original", **head}
    envelope.update({
        "nonce": _b64(body_nonce),
        "ciphertext": _b64(ciphertext),
        "tag": _b64(tag),
        "sender_signature": _b64(signature),
        "sender_cert_fingerprint": "sha256:" + sender_ik_digest[:8].hex(),
        "sender_session_pk": _b64(ephemeral_der),
        "recipients_digest": root.hex(),
        "recipients": [entry[1] for entry in entries],
        "aad": aad,
    })
    payload_type = _payload_type(payload)
    if payload_type:
        envelope["payload_type"] = payload_type
    metadata_key = _metadata_key(master_key)
    envelope["protected_headers"] = _sealed(metadata_key, HEADERS_DOMAIN, headers)
    if context_body:
        try:
            envelope["context"] = _sealed(metadata_key, CONTEXT_DOMAIN, context_body)
        except (TypeError, ValueError, RecursionError) as exc:
            raise E2EEEncryptError("invalid_payload", f"context not canonical-JSON encodable: {exc}") from None
    if need_render is not None:
        envelope["need_render"] = need_render
    return envelope


# --------------------------------------------------------------------------------------------
# Decrypt


@dataclass(frozen=True, slots=True)
class DecryptResult:
    """What a verified envelope held.

    ``protected_headers``/``context`` are verified and stripped of ``_auth`` (``{}``/``None`` when
    absent); ``aad`` is the signed AAD; ``spk_id_used`` is ``""`` for 1DH; ``wrap_protocol`` is the
    protocol of the row we opened (``"3DH"`` or ``"1DH"``); ``role`` is that row's role.
    """

    payload: dict[str, Any]
    protected_headers: dict[str, Any]
    aad: dict[str, Any]
    spk_id_used: str
    wrap_protocol: str
    context: dict[str, Any] | None = None
    role: str = ""


def _fail(reason: str, message: str) -> E2EEDecryptError:
    return E2EEDecryptError(reason, message)


def _field_b64(envelope: Mapping[str, Any], name: str, size: int | None = None) -> bytes:
    value = envelope.get(name)
    if not isinstance(value, str):
        raise _fail("malformed_envelope", f"{name} missing or not a string")
    try:
        data = _unb64(value)
    except ValueError:
        raise _fail("malformed_envelope", f"{name} is not base64") from None
    if size is not None and len(data) != size:
        raise _fail("malformed_envelope", f"{name} must be {size} bytes")
    return data


def _fingerprint_matches(claimed: Any, sender_digest: bytes) -> bool:
    if not isinstance(claimed, str):
        return False
    claimed = claimed.strip().lower()
    if not claimed.startswith("sha256:"):
        return False
    hex_part = claimed[7:]
    if len(hex_part) not in (16, 64) or not _HEX.issuperset(hex_part):
        return False
    return sender_digest.hex()[: len(hex_part)] == hex_part


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


_PAYLOAD_DECODER = json.JSONDecoder(parse_constant=_reject_constant)  # NaN/Infinity are not JSON


def _parse_payload(plaintext: bytes) -> dict[str, Any]:
    try:
        payload = _PAYLOAD_DECODER.decode(plaintext.decode("utf-8"))
    except (ValueError, RecursionError):
        raise _fail("payload_invalid", "plaintext is not JSON") from None
    if not isinstance(payload, dict):
        raise _fail("payload_invalid", "plaintext is not a JSON object")
    return payload


_ROW_FIELDS = ("aid", "device_id", "role", "key_source", "fp", "spk_id", "wrap_nonce", "wrapped_key")




AadCheck = Callable[[dict[str, Any], str], None]


def _open_envelope(
    envelope: Mapping[str, Any],
    *,
    envelope_type: str,
    label: str,
    aad_strings: Sequence[str],
    check_shape: Callable[[Mapping[str, Any], dict[str, Any]], None] | None,
    check_aad: AadCheck | None,
    my_aid: str,
    my_device_id: str,
    my_ik_private: ec.EllipticCurvePrivateKey,
    spk_lookup: SpkLookup,
    sender_ik_public: ec.EllipticCurvePublicKey,
    expected_from: str | None,
    expected_from_device: str | None,
    expected_message_id: str | None,
    require_merkle_proof: bool,
    sender_ik_digest: bytes | None,
) -> DecryptResult:
    """The verification and opening that P2P and group envelopes share (protocol 5.5).

    ``aad_strings`` name the AAD members that must be strings; ``check_shape(envelope, aad)``
    adds envelope-kind shape checks (raise ``malformed_envelope``/``aad_mismatch``) and
    ``check_aad(aad, role)`` the kind's expectations once our row (and its role) is known.
    """
    # 1. Shape.
    if not isinstance(envelope, Mapping):
        raise _fail("malformed_envelope", "envelope is not an object")
    kind, version, suite = envelope.get("type"), envelope.get("version"), envelope.get("suite")
    if not isinstance(kind, str) or not isinstance(version, str) or not isinstance(suite, str):
        raise _fail("malformed_envelope", "type/version/suite missing")
    if kind != envelope_type or version != ENVELOPE_VERSION or suite != SUITE:
        raise _fail("unsupported_envelope", f"not a {label} v2 envelope: {kind}/{version}/{suite}")
    aad = envelope.get("aad")
    if not isinstance(aad, dict):
        raise _fail("malformed_envelope", "aad missing")
    for name in aad_strings:
        if not isinstance(aad.get(name), str):
            raise _fail("malformed_envelope", f"aad.{name} missing or not a string")
    timestamp = aad.get("timestamp")
    if not isinstance(timestamp, int) or isinstance(timestamp, bool):
        raise _fail("malformed_envelope", "aad.timestamp missing or not an integer")
    if aad.get("suite") != SUITE:
        raise _fail("unsupported_envelope", f"aad.suite is not the {label} v2 suite")
    if check_shape is not None:
        check_shape(envelope, aad)
    body_nonce = _field_b64(envelope, "nonce", 12)
    ciphertext = _field_b64(envelope, "ciphertext")
    tag = _field_b64(envelope, "tag", 16)
    signature = _field_b64(envelope, "sender_signature")
    ephemeral_der = _field_b64(envelope, "sender_session_pk")
    digest_hex = envelope.get("recipients_digest")
    if not isinstance(digest_hex, str) or len(digest_hex) != 64 or not _HEX.issuperset(digest_hex):
        raise _fail("malformed_envelope", "recipients_digest must be 64 lower-case hex")
    try:
        aad_bytes = canonical_json(aad)
    except (TypeError, ValueError, RecursionError):
        raise _fail("malformed_envelope", "aad is not canonical-JSON encodable") from None

    # 2. Sender identity and signature.
    if sender_ik_digest is None:
        sender_ik_digest = spki_sha256(sender_ik_public)
    if not _fingerprint_matches(envelope.get("sender_cert_fingerprint"), sender_ik_digest):
        raise _fail("fingerprint_mismatch", "sender_cert_fingerprint does not match the sender IK")
    digest = bytes.fromhex(digest_hex)
    if not _verify_raw(sender_ik_public, signature, ciphertext + tag + aad_bytes + digest):
        raise _fail("bad_signature", "sender_signature does not verify")

    # 3. Our row, bound to the signed digest.
    if "recipients" in envelope:
        rows = envelope["recipients"]
        if not isinstance(rows, list) or not rows:
            raise _fail("malformed_envelope", "recipients must be a non-empty list")
        leaves: list[bytes] = []
        mine = -1
        for index, row in enumerate(rows):
            if not isinstance(row, list):
                raise _fail("malformed_envelope", "recipient row is not a list")
            try:
                leaves.append(row_leaf_hash(row))
            except ValueError:
                raise _fail("malformed_envelope", "recipient row is malformed") from None
            if row[0] == my_aid and (row[1] == my_device_id or (row[1] == "" and mine < 0)):
                if mine < 0 or rows[mine][1] == "":
                    mine = index
        if merkle_root(leaves).hex() != digest_hex:
            raise _fail("digest_mismatch", "recipients do not hash to recipients_digest")
        if mine < 0:
            raise _fail("no_recipient_row", f"no recipient row for {my_aid}/{my_device_id}")
        row = rows[mine]
    elif "recipient" in envelope:
        item = envelope["recipient"]
        if not isinstance(item, dict):
            raise _fail("malformed_envelope", "recipient is not an object")
        row = [item.get(name, "") if index >= 3 else item.get(name) for index, name in enumerate(_ROW_FIELDS)]
        try:
            leaf = row_leaf_hash(row)
        except ValueError:
            raise _fail("malformed_envelope", "recipient is malformed") from None
        if row[0] != my_aid or row[1] not in (my_device_id, ""):
            raise _fail("no_recipient_row", f"recipient is not {my_aid}/{my_device_id}")
        proof = envelope.get("merkle_proof")
        if proof is None:
            if require_merkle_proof:
                raise _fail("merkle_proof_invalid", "merkle_proof missing")
        elif not verify_merkle_proof(leaf, proof, digest_hex):
            raise _fail("merkle_proof_invalid", "recipient does not prove into recipients_digest")
    else:
        raise _fail("malformed_envelope", "neither recipients nor recipient present")
    role, spk_id = row[2], row[5]

    # 4. What the caller expects of the AAD (the SDK does not check these).
    if expected_from is not None and aad["from"] != expected_from:
        raise _fail("aad_mismatch", "aad.from differs from the delivering sender")
    if expected_from_device is not None and aad["from_device"] != expected_from_device:
        raise _fail("aad_mismatch", "aad.from_device differs from the delivering sender device")
    if expected_message_id is not None and aad["message_id"] != expected_message_id:
        raise _fail("aad_mismatch", "aad.message_id differs from the delivered message id")
    if check_aad is not None:
        check_aad(aad, role)

    # 5. Unwrap the master key.
    wrap_nonce = _unb64(row[6])
    wrapped = _unb64(row[7])
    if len(wrap_nonce) != 12 or len(wrapped) != 48:
        raise _fail("malformed_envelope", "wrap_nonce/wrapped_key have the wrong length")
    try:
        ephemeral = load_public_key_der(ephemeral_der)
    except ValueError:
        raise _fail("malformed_envelope", "sender_session_pk is not a P-256 key") from None
    salt = sha256(aad_bytes + ephemeral_der + _SUITE_BYTES).digest()[:16]
    if spk_id:
        spk_private = spk_lookup(spk_id)
        if spk_private is None:
            if spk_id != ik_fingerprint(my_ik_private.public_key()):
                raise _fail("spk_missing", f"no local SPK {spk_id}")
            spk_private = my_ik_private
        ikm = (
            my_ik_private.exchange(_ECDH, ephemeral)
            + spk_private.exchange(_ECDH, sender_ik_public)
            + spk_private.exchange(_ECDH, ephemeral)
        )
        wrap_key = _hkdf32(ikm, salt, _INFO_3DH)
    else:
        wrap_key = _hkdf32(my_ik_private.exchange(_ECDH, ephemeral), salt, _INFO_1DH)
    try:
        master_key = AESGCM(wrap_key).decrypt(wrap_nonce, wrapped, None)
    except InvalidTag:
        raise _fail("unwrap_failed", f"cannot unwrap the master key (spk_id={spk_id or '-'})") from None

    # 6. Authenticated metadata, then the body.
    metadata_key = _metadata_key(master_key)
    headers = _check_auth(envelope.get("protected_headers"), metadata_key, HEADERS_DOMAIN, "header_mac_invalid")
    context = _check_auth(envelope.get("context"), metadata_key, CONTEXT_DOMAIN, "context_mac_invalid")
    try:
        plaintext = AESGCM(master_key).decrypt(body_nonce, ciphertext + tag, aad_bytes)
    except InvalidTag:
        raise _fail("body_decrypt_failed", "body does not authenticate under the AAD") from None
    return DecryptResult(
        payload=_parse_payload(plaintext),
        protected_headers=headers,
        aad=dict(aad),
        spk_id_used=spk_id,
        wrap_protocol="3DH" if spk_id else "1DH",
        context=context or None,
        role=role,
    )
