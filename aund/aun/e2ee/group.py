"""E2EE v2 group envelopes (``e2ee.group_encrypted``, docs/groups.md section 7) and the signed
membership state commitment (section 5). Pure layer: synchronous, no I/O, no trio, no clock and
no key storage; imports only the stdlib, ``cryptography`` and the P2P core it shares.

Wire compatible with the official SDK ``fastaun==0.5.25`` (``v2/e2ee/encrypt_group.py``,
``v2/e2ee/decrypt.py``, ``v2/state/commitment.py``):

* ``encrypt_group`` seals one payload for a list of :class:`~aund.aun.e2ee.Target` devices
  (role ``member``, ``self_sync`` or ``audit``); the wraps, Merkle digest, signature and header
  MACs are the P2P ones, only the envelope head and the AAD differ (``group_id``, ``epoch``,
  ``state_commitment``, no ``to``).
* ``decrypt_group`` opens an envelope in full or per-device form after every check
  ``decrypt_p2p`` makes, plus the group bindings: the unauthenticated ``group_id``/``epoch``
  copies must equal the AAD's, and ``aad.group_id``/``from``/``from_device``/``epoch``/
  ``message_id`` must equal what the caller expects of the row that carried it.
* ``state_commitment``, ``snapshot_json`` and ``state_sign_input``: the V2 state chain hash, the
  wire form of a membership snapshot and the bytes a proposer signs (5.1, 5.2).
"""

from __future__ import annotations

import copy
import hashlib
import json
import struct
from collections.abc import Mapping, Sequence
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ec

from .canonical import canonical_json
from .errors import E2EEEncryptError
from ._envelope import (
    DecryptResult,
    SpkLookup,
    Target,
    _check_seal_inputs,
    _fail,
    _open_envelope,
    _seal_envelope,
)

__all__ = [
    "GROUP_ENVELOPE_TYPE",
    "STATE_COMMITMENT_PREFIX",
    "decrypt_group",
    "encrypt_group",
    "snapshot_json",
    "state_commitment",
    "state_sign_input",
]

GROUP_ENVELOPE_TYPE = "e2ee.group_encrypted"
STATE_COMMITMENT_PREFIX = b"AUN-V2-SC-v1"
_GROUP_AAD_STRINGS = ("from", "from_device", "group_id", "message_id", "wrap_protocol")


def _commitment_aad(value: Mapping[str, Any] | None) -> dict[str, Any]:
    """The AAD ``state_commitment`` exactly as the SDK writes it (sv 0 placeholder when absent)."""
    sc = value or {}
    return {
        "state_version": int(sc.get("state_version", 0) or 0),
        "state_hash": str(sc.get("state_hash", "") or ""),
        "state_chain": str(sc.get("state_chain", "") or ""),
    }


def encrypt_group(
    *,
    sender_aid: str,
    sender_device_id: str,
    sender_ik_private: ec.EllipticCurvePrivateKey,
    group_id: str,
    epoch: int,
    targets: Sequence[Target],
    payload: Mapping[str, Any],
    message_id: str,
    timestamp_ms: int,
    state_commitment: Mapping[str, Any] | None = None,
    protected_headers: Mapping[str, Any] | None = None,
    context: Mapping[str, Any] | None = None,
    need_render: bool | None = True,
    sender_ik_digest: bytes | None = None,
) -> dict[str, Any]:
    """Build an ``e2ee.group_encrypted`` v2 envelope (docs/groups.md section 7).

    ``targets`` are the wrap set from ``group.v2.bootstrap`` minus the sending device (role
    ``member`` for other AIDs, ``self_sync`` for our own other devices, ``audit``).
    ``state_commitment`` is ``{state_version, state_hash, state_chain}`` of the signed state the
    sender verified (an all-empty ``state_version: 0`` placeholder when ``None``). Headers,
    context and ``need_render`` as :func:`~aund.aun.e2ee.p2p.encrypt_p2p`.

    Raises ``E2EEEncryptError`` with ``no_targets``, ``duplicate_target``, ``invalid_target``,
    ``invalid_header`` or ``invalid_payload`` (also for a non-integer epoch or state version).
    """
    _check_seal_inputs(targets, payload, timestamp_ms, (sender_aid, sender_device_id, message_id, group_id))
    if not isinstance(epoch, int) or isinstance(epoch, bool):
        raise E2EEEncryptError("invalid_payload", "epoch must be an int")
    try:
        commitment = _commitment_aad(state_commitment)
    except (TypeError, ValueError, AttributeError) as exc:
        raise E2EEEncryptError("invalid_payload", f"state_commitment: {exc}") from None
    return _seal_envelope(
        GROUP_ENVELOPE_TYPE, {"group_id": group_id, "epoch": epoch, "t_send": timestamp_ms, "t_server": None},
        {"group_id": group_id, "epoch": epoch}, {"state_commitment": commitment},
        sender_aid=sender_aid, sender_device_id=sender_device_id, sender_ik_private=sender_ik_private,
        targets=targets, payload=payload, message_id=message_id, timestamp_ms=timestamp_ms,
        protected_headers=protected_headers, context=context, need_render=need_render,
        sender_ik_digest=sender_ik_digest)


def _check_group_shape(envelope: Mapping[str, Any], aad: dict[str, Any]) -> None:
    epoch = aad.get("epoch")
    if not isinstance(epoch, int) or isinstance(epoch, bool):
        raise _fail("malformed_envelope", "aad.epoch missing or not an integer")
    commitment = aad.get("state_commitment")
    if commitment is not None and not isinstance(commitment, dict):
        raise _fail("malformed_envelope", "aad.state_commitment is not an object")
    # The head repeats group_id and epoch outside the signature: a copy must agree with the AAD.
    if "group_id" in envelope and envelope["group_id"] != aad["group_id"]:
        raise _fail("aad_mismatch", "envelope group_id differs from aad.group_id")
    if "epoch" in envelope and envelope["epoch"] != epoch:
        raise _fail("aad_mismatch", "envelope epoch differs from aad.epoch")


def decrypt_group(
    envelope: Mapping[str, Any],
    *,
    my_aid: str,
    my_device_id: str,
    my_ik_private: ec.EllipticCurvePrivateKey,
    spk_lookup: SpkLookup,
    sender_ik_public: ec.EllipticCurvePublicKey,
    expected_group_id: str | None = None,
    expected_from: str | None = None,
    expected_from_device: str | None = None,
    expected_message_id: str | None = None,
    expected_epoch: int | None = None,
    require_merkle_proof: bool = False,
    sender_ik_digest: bytes | None = None,
) -> DecryptResult:
    """Verify and open a group v2 envelope addressed to ``(my_aid, my_device_id)``.

    Same keys and checks as :func:`~aund.aun.e2ee.p2p.decrypt_p2p` (shape and suite, sender
    fingerprint, signature, Merkle root or proof, our row, unwrap, header/context MACs, body),
    with the group AAD: ``aad.epoch`` an integer, the head's ``group_id``/``epoch`` equal to the
    AAD's, each ``expected_*`` equal to the AAD, and a ``self_sync`` row only in a message this
    AID sent. The delivering row is the caller's evidence: pass its group, sender, sender device
    and message id (and epoch when the row carries one) so a valid envelope replayed into another
    group, under another sender or message id cannot pass.

    Raises ``E2EEDecryptError`` with the reasons of ``decrypt_p2p``.
    """

    def check_aad(aad: dict[str, Any], role: str) -> None:
        if expected_group_id is not None and aad["group_id"] != expected_group_id:
            raise _fail("aad_mismatch", "aad.group_id differs from the delivering group")
        if expected_epoch is not None and aad["epoch"] != expected_epoch:
            raise _fail("aad_mismatch", "aad.epoch differs from the delivered epoch")
        if role == "self_sync" and aad["from"] != my_aid:
            raise _fail("aad_mismatch", "self_sync row in a message not sent by this AID")

    return _open_envelope(
        envelope, envelope_type=GROUP_ENVELOPE_TYPE, label="group", aad_strings=_GROUP_AAD_STRINGS,
        check_shape=_check_group_shape, check_aad=check_aad, my_aid=my_aid, my_device_id=my_device_id,
        my_ik_private=my_ik_private, spk_lookup=spk_lookup, sender_ik_public=sender_ik_public,
        expected_from=expected_from, expected_from_device=expected_from_device,
        expected_message_id=expected_message_id, require_merkle_proof=require_merkle_proof,
        sender_ik_digest=sender_ik_digest)


# --------------------------------------------------------------------------------------------
# Signed membership state (docs/groups.md 5.1, 5.2)


def state_commitment(group_id: str, state_version: int, payload: Mapping[str, Any]) -> str:
    """Hex SHA-256 of ``AUN-V2-SC-v1 || group id || uint32 version || canonical(normalised payload)``.

    Members are sorted by aid (their devices by device_id), and ``audit_aids``,
    ``admin_set.admin_aids`` and ``recovery_quorum.quorum_aids`` sorted, as the SDK does.
    ``TypeError``/``ValueError`` if the payload is not canonical-JSON encodable or the version
    does not fit 32 bits.
    """
    body = copy.deepcopy(dict(payload))
    members = body.get("members")
    if isinstance(members, list):
        members.sort(key=lambda m: m.get("aid", "") if isinstance(m, dict) else "")
        for member in members:
            if isinstance(member, dict) and isinstance(member.get("devices"), list):
                member["devices"].sort(key=lambda d: d.get("device_id", "") if isinstance(d, dict) else "")
    if isinstance(body.get("audit_aids"), list):
        body["audit_aids"].sort()
    admin_set = body.get("admin_set")
    if isinstance(admin_set, dict) and isinstance(admin_set.get("admin_aids"), list):
        admin_set["admin_aids"].sort()
    quorum = body.get("recovery_quorum")
    if isinstance(quorum, dict) and isinstance(quorum.get("quorum_aids"), list):
        quorum["quorum_aids"].sort()
    try:
        version = struct.pack(">I", state_version)
    except struct.error as exc:
        raise ValueError(f"state_version: {exc}") from None
    data = STATE_COMMITMENT_PREFIX + group_id.encode("utf-8") + version + canonical_json(body)
    return hashlib.sha256(data).hexdigest()


def snapshot_json(payload: Mapping[str, Any]) -> str:
    """``membership_snapshot`` on the wire: sorted keys, compact, non-ASCII kept."""
    return json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def state_sign_input(group_id: str, state_version: int, state_hash: str, membership_snapshot: str) -> bytes:
    """The bytes a proposer signs (DER ECDSA-SHA256 with its AID key) and senders verify."""
    return snapshot_json({"group_id": group_id, "state_version": state_version, "state_hash": state_hash,
                          "membership_snapshot": membership_snapshot}).encode("utf-8")
