"""The signed `group.index` of a group's indexed settings (docs/groups.md 3.5).

An index is `{"body": <JSON lines>}`: an `index_meta` line, then one entry per indexed setting
`{key, source: "db", etag, last_modified}` sorted by key. `body_hash` and the meta `etag` hash the
canonical entry lines; each entry's `etag` hashes the canonical JSON of the setting's value; the
signature (DER ECDSA, standard base64) covers the meta without `signature` plus the entry lines.
aund builds one when an app writes indexed settings; the devnet checks what it is given.
"""
from __future__ import annotations

import hashlib
import json
import re
from typing import Any

from aund.aun.e2ee.canonical import canonical_json
from aund.identity import pki

KEY = "group.index"
SCHEMA = "aun.group.index.v1"
SIG_ALG = "ECDSA-P256-SHA256"
MAX_BYTES = 64 * 1024
JOIN_KEYS = ("join.mode", "join.question", "join.auto_approve_patterns", "join.max_pending", "join.attachments")
DOC_KEY_RE = re.compile(r"^([A-Za-z][A-Za-z0-9_-]{0,63})\.(content|attachments)$")


def is_indexed(key: str) -> bool:
    """True for a setting that must be written together with a signed index."""
    return key in JOIN_KEYS or (DOC_KEY_RE.match(key) is not None and not key.startswith("join."))


def setting_etag(value: Any) -> str:
    return '"sha256:' + hashlib.sha256(canonical_json(value)).hexdigest() + '"'


def entries_bytes(entries: list[dict[str, Any]]) -> bytes:
    ordered = sorted((dict(e) for e in entries), key=lambda e: str(e.get("key") or ""))
    return b"".join(canonical_json(e) + b"\n" for e in ordered)


def body_hash(entries: list[dict[str, Any]]) -> str:
    return "sha256:" + hashlib.sha256(entries_bytes(entries)).hexdigest()


def signing_input(meta: dict[str, Any], entries: list[dict[str, Any]]) -> bytes:
    return canonical_json({k: v for k, v in meta.items() if k != "signature"}) + b"\n" + entries_bytes(entries)


def parse(value: Any) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """(meta, entries) of an index; ValueError when it is not one."""
    body = value.get("body") if isinstance(value, dict) else None
    if not isinstance(body, str) or len(body) > MAX_BYTES:
        raise ValueError("group.index must be an object with a body string")
    try:
        lines = [json.loads(line) for line in body.splitlines() if line.strip()]
    except ValueError as exc:
        raise ValueError(f"group.index body is not JSON lines: {exc}") from None
    if not lines or not all(isinstance(x, dict) for x in lines) or lines[0].get("type") != "index_meta":
        raise ValueError("group.index must start with an index_meta line")
    return lines[0], lines[1:]


def build(gid: str, signer_aid: str, private_key: Any, settings: dict[str, Any], *, base: Any = None,
          now_ms: int) -> dict[str, Any]:
    """A signed index holding `base`'s entries with those of `settings` replaced (the SDK's merge)."""
    entries = [dict(e) for e in parse(base)[1] if str(e.get("key") or "") not in settings] if base else []
    entries += [{"key": k, "source": "db", "etag": setting_etag(v), "last_modified": now_ms}
                for k, v in settings.items()]
    entries.sort(key=lambda e: str(e.get("key") or ""))
    digest = body_hash(entries)
    meta = {"type": "index_meta", "group_aid": gid, "etag": f'"{digest}"', "last_modified": now_ms,
            "schema": SCHEMA, "body_hash": digest, "signed_by": signer_aid, "sig_alg": SIG_ALG}
    meta["signature"] = pki.b64e(pki.sign_der(private_key, signing_input(meta, entries)))
    return {"body": (canonical_json(meta) + b"\n" + entries_bytes(entries)).decode()}
