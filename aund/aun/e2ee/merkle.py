"""Recipients digest for E2EE v2 (protocol 5.4): leaf/node hashing, Merkle root and proofs.

Pure layer: stdlib only, no I/O, no trio.

A recipient row is ``[aid, device_id, role, key_source, fp, spk_id, b64(wrap_nonce),
b64(wrapped_key)]``. Its leaf is
``SHA256("AUN-V2-RCPT-LEAF-v1" || aid 00 device_id 00 role 00 key_source 00 fp 00 spk_id 00
|| wrap_nonce || wrapped_key)`` with the two last fields as raw bytes. Inner nodes are
``SHA256("AUN-V2-RCPT-NODE-v1" || left || right)``; an odd layer repeats its last node; a single
leaf is the root. The digest travels as lower-case hex. A proof is the list of siblings from the
leaf up: ``[{"sibling": "<hex>", "position": "L" | "R"}]`` where ``position`` says on which side
the sibling sits.
"""

from __future__ import annotations

import binascii
from collections.abc import Sequence
from hashlib import sha256
from typing import Any

__all__ = [
    "LEAF_PREFIX",
    "MAX_PROOF_STEPS",
    "NODE_PREFIX",
    "leaf_hash",
    "merkle_proof",
    "merkle_root",
    "node_hash",
    "recipients_digest",
    "row_leaf_hash",
    "verify_merkle_proof",
]

LEAF_PREFIX = b"AUN-V2-RCPT-LEAF-v1"
NODE_PREFIX = b"AUN-V2-RCPT-NODE-v1"
#: A proof longer than this cannot belong to any envelope that fits in a frame (2**64 rows).
MAX_PROOF_STEPS = 64


def leaf_hash(
    aid: str,
    device_id: str,
    role: str,
    key_source: str,
    fp: str,
    spk_id: str,
    wrap_nonce: bytes,
    wrapped_key: bytes,
) -> bytes:
    """Leaf hash of one recipient row, given the wrap fields as raw bytes (the encrypt path)."""
    text = "\x00".join((aid, device_id, role, key_source, fp, spk_id)) + "\x00"
    return sha256(LEAF_PREFIX + text.encode("utf-8") + wrap_nonce + wrapped_key).digest()


def row_leaf_hash(row: Sequence[Any]) -> bytes:
    """Leaf hash of a wire row (8 strings, wrap fields in base64).

    Raises ``ValueError`` if the row does not have exactly 8 string fields or a wrap field is not
    strict standard base64 (``binascii.Error`` is a ``ValueError``), and ``UnicodeEncodeError``
    (also a ``ValueError``) for strings holding lone surrogates.
    """
    if len(row) != 8:
        raise ValueError("recipient row must have 8 fields")
    for field in row:
        if not isinstance(field, str):
            raise ValueError("recipient row fields must be strings")
    return leaf_hash(
        row[0],
        row[1],
        row[2],
        row[3],
        row[4],
        row[5],
        binascii.a2b_base64(row[6], strict_mode=True),
        binascii.a2b_base64(row[7], strict_mode=True),
    )


def node_hash(left: bytes, right: bytes) -> bytes:
    """Hash of an inner node."""
    return sha256(NODE_PREFIX + left + right).digest()


def merkle_root(leaves: Sequence[bytes]) -> bytes:
    """Root over ``leaves`` in order. Raises ``ValueError`` for an empty sequence."""
    if not leaves:
        raise ValueError("merkle_root of no leaves")
    layer = list(leaves)
    while len(layer) > 1:
        if len(layer) & 1:
            layer.append(layer[-1])
        layer = [node_hash(layer[i], layer[i + 1]) for i in range(0, len(layer), 2)]
    return layer[0]


def recipients_digest(rows: Sequence[Sequence[Any]]) -> str:
    """Lower-case hex root over wire rows, which the caller has already sorted."""
    return merkle_root([row_leaf_hash(row) for row in rows]).hex()


def merkle_proof(leaves: Sequence[bytes], index: int) -> list[dict[str, str]]:
    """Proof that ``leaves[index]`` is under ``merkle_root(leaves)``. ``IndexError`` if out of range."""
    if not 0 <= index < len(leaves):
        raise IndexError("merkle_proof index out of range")
    proof: list[dict[str, str]] = []
    layer = list(leaves)
    while len(layer) > 1:
        if len(layer) & 1:
            layer.append(layer[-1])
        sibling = index ^ 1
        proof.append({"sibling": layer[sibling].hex(), "position": "R" if sibling > index else "L"})
        layer = [node_hash(layer[i], layer[i + 1]) for i in range(0, len(layer), 2)]
        index >>= 1
    return proof


def verify_merkle_proof(leaf: bytes, proof: Any, root_hex: str) -> bool:
    """True iff ``proof`` leads from ``leaf`` to ``root_hex``. Never raises: junk proofs are False."""
    if not isinstance(proof, list) or len(proof) > MAX_PROOF_STEPS or not isinstance(root_hex, str):
        return False
    node = leaf
    for step in proof:
        if not isinstance(step, dict):
            return False
        sibling_hex = step.get("sibling")
        position = step.get("position")
        if not isinstance(sibling_hex, str) or len(sibling_hex) != 64:
            return False
        try:
            sibling = bytes.fromhex(sibling_hex)
        except ValueError:
            return False
        if position == "L":
            node = node_hash(sibling, node)
        elif position == "R":
            node = node_hash(node, sibling)
        else:
            return False
    return node.hex() == root_hex
