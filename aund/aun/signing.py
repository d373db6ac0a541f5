"""AUN layer: `client_signature` on signed RPC methods, made by aund and checked by the devnet.

The signature binds the method, the AID, a timestamp and a hash of the params:
`DER-ECDSA-SHA256(AID key, "{method}|{aid}|{ts}|{params_hash}")`, where params_hash is the
SHA-256 of the params (without `client_signature` and `_`-prefixed keys) as sorted, compact JSON.
Pure functions; no I/O.
"""
from __future__ import annotations

import hashlib
import json
import time
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from aund.identity import pki

#: Methods whose params carry a client_signature (the official SDK signs these; aund does too).
SIGNED_METHODS = frozenset({
    "message.send", "message.v2.put_peer_pk", "message.v2.bootstrap", "message.v2.group_bootstrap",
    "message.v2.pull", "message.v2.ack", "message.thought.put",
    "group.send", "group.recall", "group.thought.put", "group.add_member", "group.kick",
    "group.invite_member", "group.list_my_invites", "group.accept_invite", "group.reject_invite",
    "group.revoke_invite", "group.leave", "group.remove_member", "group.update", "group.set_role",
    "group.transfer_owner", "group.request_join", "group.review_join_request", "group.dissolve",
    "group.v2.put_group_pk", "group.v2.bootstrap", "group.v2.send", "group.v2.pull", "group.v2.ack",
    "group.v2.propose_state", "group.v2.confirm_state", "group.v2.get_proposal",
    "group.batch_review_join_request", "group.use_invite_code", "group.bind_group_aid", "group.renew_group_aid",
    "group.complete_transfer", "group.set_settings", "group.update_announcement", "group.update_rules",
    "group.commit_state", "group.ban", "group.unban", "group.block", "group.unblock", "group.report_status",
    "group.suspend", "group.resume",
    "group.fs.mkdir", "group.fs.rm", "group.fs.cp", "group.fs.mv", "group.fs.set_acl", "group.fs.remove_acl",
    "group.fs.mount", "group.fs.umount", "group.fs.check_upload", "group.fs.create_upload_session",
    "group.fs.complete_upload", "group.fs.create_download_ticket",
})

#: How far a signature's timestamp may be from the verifier's clock.
MAX_SKEW_SECONDS = 300


class SignatureError(Exception):
    """A client_signature is missing, malformed, stale or does not verify."""


def params_hash(params: dict[str, Any]) -> str:
    body = {k: v for k, v in params.items() if k != "client_signature" and not k.startswith("_")}
    data = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    return hashlib.sha256(data).hexdigest()


def sign_params(method: str, params: dict[str, Any], *, aid: str, key: ec.EllipticCurvePrivateKey,
                cert_fingerprint: str, now: float | None = None) -> dict[str, Any]:
    """Return a copy of params with `client_signature` attached."""
    ts = str(int(time.time() if now is None else now))
    digest = params_hash(params)
    signature = pki.sign_der(key, f"{method}|{aid}|{ts}|{digest}".encode("utf-8"))
    signed = dict(params)
    signed["client_signature"] = {"aid": aid, "cert_fingerprint": cert_fingerprint, "timestamp": ts,
                                  "params_hash": digest, "signature": pki.b64e(signature)}
    return signed


def verify_params(method: str, params: dict[str, Any], *, aid: str, cert: x509.Certificate,
                  now: float | None = None) -> None:
    """Check the client_signature in params against `cert`; raises SignatureError with the reason."""
    sig = params.get("client_signature")
    if not isinstance(sig, dict):
        raise SignatureError("client_signature missing")
    fields = ("aid", "cert_fingerprint", "timestamp", "params_hash", "signature")
    if any(not isinstance(sig.get(f), str) for f in fields):
        raise SignatureError("client_signature malformed")
    if sig["aid"] != aid:
        raise SignatureError("client_signature aid does not match the connection")
    if not pki.cert_matches_fingerprint(cert, sig["cert_fingerprint"]):
        raise SignatureError("client_signature cert_fingerprint does not match the AID certificate")
    if not (sig["timestamp"].isascii() and sig["timestamp"].isdigit()) or len(sig["timestamp"]) > 12:
        raise SignatureError("client_signature timestamp malformed")
    now = time.time() if now is None else now
    if abs(int(sig["timestamp"]) - now) > MAX_SKEW_SECONDS:
        raise SignatureError("client_signature timestamp outside the allowed window")
    if sig["params_hash"] != params_hash(params):
        raise SignatureError("client_signature params_hash does not match the params")
    try:
        raw = pki.b64d(sig["signature"])
    except pki.PKIError:
        raise SignatureError("client_signature signature is not base64") from None
    data = f"{method}|{aid}|{sig['timestamp']}|{sig['params_hash']}".encode("utf-8")
    if not pki.verify_signature(cert.public_key(), raw, data):
        raise SignatureError("client_signature does not verify")
