"""E2EE v2 error types. Pure layer: imports nothing from trio, the network or the rest of aund.

These are local to ``aund.aun.e2ee`` so the crypto core stays self-contained; the daemon maps
them onto its own error tree at the edge (an undecryptable message is data, not a bug).
"""

from __future__ import annotations

__all__ = [
    "DECRYPT_REASON_CODES",
    "ENCRYPT_REASON_CODES",
    "E2EEDecryptError",
    "E2EEEncryptError",
    "E2EEError",
]

#: Every ``reason_code`` that :class:`E2EEDecryptError` can carry. Stable strings: they end up in
#: logs, in ``message.undecryptable`` events and in tests.
DECRYPT_REASON_CODES = frozenset(
    {
        "malformed_envelope",  # wrong shape, wrong types, bad base64/hex, bad key encoding
        "unsupported_envelope",  # type/version/suite is not the P2P v2 suite this code speaks
        "fingerprint_mismatch",  # sender_cert_fingerprint does not name the supplied sender IK
        "bad_signature",  # sender_signature does not verify over ct||tag||aad||digest
        "digest_mismatch",  # recomputed Merkle root != recipients_digest (full form)
        "merkle_proof_invalid",  # per-device row does not prove into recipients_digest
        "no_recipient_row",  # no row addressed to (my_aid, my_device_id | "")
        "spk_missing",  # row names an SPK we do not hold
        "unwrap_failed",  # AES-GCM unwrap of the master key failed (wrong keys or tampered wrap)
        "header_mac_invalid",  # protected_headers _auth missing or wrong
        "context_mac_invalid",  # context _auth missing or wrong
        "aad_mismatch",  # aad.from / aad.to / aad.from_device disagree with what the caller expects
        "body_decrypt_failed",  # AES-GCM of the body failed after a good unwrap
        "payload_invalid",  # plaintext is not a JSON object
    }
)

#: Every ``reason_code`` that :class:`E2EEEncryptError` can carry.
ENCRYPT_REASON_CODES = frozenset(
    {
        "no_targets",  # empty target list
        "duplicate_target",  # two targets share (aid, device_id, role)
        "invalid_target",  # wrong key type / curve, non-string ids
        "invalid_header",  # protected header key not [a-z0-9_-]+ or reserved "_auth"
        "invalid_payload",  # payload/context is not an object or not canonical-JSON encodable
    }
)


class E2EEError(Exception):
    """Root of the E2EE errors: ``reason_code`` (stable string) plus a human message."""

    reason_code: str

    def __init__(self, reason_code: str, message: str = "") -> None:
        super().__init__(reason_code, message)
        self.reason_code = reason_code
        self.message = message or reason_code

    def __str__(self) -> str:
        return f"{self.reason_code}: {self.message}" if self.message != self.reason_code else self.reason_code


class E2EEDecryptError(E2EEError):
    """An envelope could not be verified or decrypted; ``reason_code`` is in DECRYPT_REASON_CODES."""


class E2EEEncryptError(E2EEError, ValueError):
    """The caller asked to encrypt something invalid; ``reason_code`` is in ENCRYPT_REASON_CODES."""
