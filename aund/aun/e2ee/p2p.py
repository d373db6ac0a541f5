"""E2EE v2 point-to-point envelopes (protocol 5.2, 5.3, 5.5 and 6). Pure layer: synchronous, no
I/O, no trio, no clock and no key storage; imports only the stdlib and ``cryptography``.

Wire compatible with the official SDK ``fastaun==0.5.25``:

* ``encrypt_p2p`` seals one payload for a list of :class:`Target` devices (3DH to a signed
  prekey when the target has one, else 1DH to the identity key) and returns the envelope dict.
* ``decrypt_p2p`` opens an envelope, full form (``recipients`` rows) or per-device form
  (``recipient`` + ``merkle_proof``), after checking every binding the protocol offers. Every
  failure is an :class:`~aund.aun.e2ee.errors.E2EEDecryptError` with a stable ``reason_code``.
* SPK helpers (``spk_id_for``, ``sign_spk``, ``verify_spk``), key fingerprints and base64 SPKI
  encoding, protected-header normalisation and the ``_auth`` HMAC used for
  ``protected_headers`` and ``context``.

Keys are ``cryptography`` EC objects on P-256 throughout. All randomness comes from
``os.urandom`` (and the library's key generation).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ec

from ._envelope import DecryptResult, SpkLookup, Target, _check_seal_inputs, _fail, _open_envelope, _seal_envelope

__all__ = ["ENVELOPE_TYPE", "decrypt_p2p", "encrypt_p2p"]


ENVELOPE_TYPE = "e2ee.p2p_encrypted"


def encrypt_p2p(
    *,
    sender_aid: str,
    sender_device_id: str,
    sender_ik_private: ec.EllipticCurvePrivateKey,
    targets: Sequence[Target],
    payload: Mapping[str, Any],
    message_id: str,
    timestamp_ms: int,
    protected_headers: Mapping[str, Any] | None = None,
    context: Mapping[str, Any] | None = None,
    to_aid: str | None = None,
    need_render: bool | None = True,
    sender_ik_digest: bytes | None = None,
) -> dict[str, Any]:
    """Build an ``e2ee.p2p_encrypted`` v2 envelope (protocol 5.3).

    ``targets`` are in the SDK's order: peer devices, then own other devices (``self_sync``),
    then audit. ``aad.to`` is ``to_aid`` or else the first non-audit target's AID.
    ``protected_headers`` are normalised with :func:`normalize_protected_headers` and MAC'd (the
    envelope always carries them, as the SDK's does); a non-empty ``context`` is MAC'd under its
    own domain. ``need_render`` (unauthenticated) is added after sealing unless it is ``None``.
    ``sender_ik_digest`` (:func:`spki_sha256` of the sender IK) may be passed to skip
    re-serialising the key.

    Raises ``E2EEEncryptError`` with ``no_targets``, ``duplicate_target``, ``invalid_target``,
    ``invalid_header`` or ``invalid_payload``.
    """
    _check_seal_inputs(targets, payload, timestamp_ms, (sender_aid, sender_device_id, message_id, to_aid or ""))
    to = to_aid if to_aid is not None else next((t.aid for t in targets if t.role != "audit"), "")
    return _seal_envelope(
        ENVELOPE_TYPE, {"t_send": timestamp_ms, "t_supplement": None, "t_server": None}, {"to": to}, {},
        sender_aid=sender_aid, sender_device_id=sender_device_id, sender_ik_private=sender_ik_private,
        targets=targets, payload=payload, message_id=message_id, timestamp_ms=timestamp_ms,
        protected_headers=protected_headers, context=context, need_render=need_render,
        sender_ik_digest=sender_ik_digest)


def decrypt_p2p(
    envelope: Mapping[str, Any],
    *,
    my_aid: str,
    my_device_id: str,
    my_ik_private: ec.EllipticCurvePrivateKey,
    spk_lookup: SpkLookup,
    sender_ik_public: ec.EllipticCurvePublicKey,
    expected_from: str | None = None,
    expected_to: str | None = None,
    expected_from_device: str | None = None,
    expected_message_id: str | None = None,
    require_merkle_proof: bool = False,
    sender_ik_digest: bytes | None = None,
) -> DecryptResult:
    """Verify and open a P2P v2 envelope addressed to ``(my_aid, my_device_id)`` (protocol 5.5).

    ``sender_ik_public`` is the sender AID's identity key as the caller trusts it (PKI-verified
    cert or cached IK); ``sender_ik_digest`` (its :func:`spki_sha256`) may be passed to save
    re-serialising it. ``spk_lookup(spk_id)`` returns the private SPK for an id or ``None`` (it
    is called at most once, only for a 3DH row, and its own exceptions propagate); an ``spk_id``
    equal to our own IK fingerprint is served by ``my_ik_private``.

    Checks, in order: envelope shape and suite; ``sender_cert_fingerprint`` names
    ``sender_ik_public``; the raw signature over ``ct || tag || canonical(aad) || digest``; the
    recomputed Merkle root (full form) or the ``merkle_proof`` (per-device form; its absence is
    tolerated like the SDK unless ``require_merkle_proof``); our row; the ``expected_*`` values
    against the AAD (for a ``self_sync`` row ``aad.from`` must be ``my_aid`` instead of
    ``aad.to == expected_to``; an ``audit`` row skips the ``to`` check); the key unwrap; the
    ``_auth`` MACs of ``protected_headers`` and ``context``; the body AES-GCM with canonical AAD;
    and that the plaintext is a JSON object.

    Raises ``E2EEDecryptError`` with ``malformed_envelope``, ``unsupported_envelope``,
    ``fingerprint_mismatch``, ``bad_signature``, ``digest_mismatch``, ``merkle_proof_invalid``,
    ``no_recipient_row``, ``aad_mismatch``, ``spk_missing``, ``unwrap_failed``,
    ``header_mac_invalid``, ``context_mac_invalid``, ``body_decrypt_failed`` or
    ``payload_invalid``. Nothing else escapes for any JSON-shaped ``envelope``.
    """
    def check_aad(aad: dict[str, Any], role: str) -> None:
        if expected_to is not None:
            if role == "self_sync":
                if aad["from"] != my_aid:
                    raise _fail("aad_mismatch", "self_sync row in a message not sent by this AID")
            elif role != "audit" and aad["to"] != expected_to:
                raise _fail("aad_mismatch", "aad.to differs from the expected recipient")

    return _open_envelope(
        envelope, envelope_type=ENVELOPE_TYPE, label="P2P", aad_strings=_P2P_AAD_STRINGS, check_shape=None,
        check_aad=check_aad, my_aid=my_aid, my_device_id=my_device_id, my_ik_private=my_ik_private,
        spk_lookup=spk_lookup, sender_ik_public=sender_ik_public, expected_from=expected_from,
        expected_from_device=expected_from_device, expected_message_id=expected_message_id,
        require_merkle_proof=require_merkle_proof, sender_ik_digest=sender_ik_digest)


_P2P_AAD_STRINGS = ("from", "from_device", "to", "message_id", "wrap_protocol")
