"""AUN layer: `client_signature` on signed RPC methods, made by aund and checked by the devnet.

The signature binds the method, the AID, a timestamp and a hash of the params:
`DER-ECDSA-SHA256(AID key, "{method}|{aid}|{ts}|{params_hash}")`, where params_hash is the
SHA-256 of the params (without `client_signature` and `_`-prefixed keys) as sorted, compact JSON;
for `org.*` methods as canonical JSON (aund.aun.e2ee.canonical), after `org_request()` bound the
organization into the params' `aad`, as the SDK does. Which methods are signed: `needs_signature()`
(the table in aund.aun.methods). Pure functions; no I/O.
"""
from __future__ import annotations

import hashlib
import json
import re
import time
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from aund.aun import jsonrpc as rpc
from aund.aun import methods
from aund.aun.e2ee.canonical import canonical_json
from aund.identity import pki

#: Methods whose params carry a client_signature (the official SDK signs these; aund does too),
#: besides every `org.*` method (see `aund.aun.methods`).
SIGNED_METHODS = methods.SIGNED

_ORG_ID = re.compile(r"^[^\s/]+\.[^\s/]+$")

#: How far a signature's timestamp may be from the verifier's clock.
MAX_SKEW_SECONDS = 300


class SignatureError(Exception):
    """A client_signature is missing, malformed, stale or does not verify."""


class BindingError(ValueError):
    """An `org.*` request whose organization binding (`org_id`, `aad`) is missing or contradictory."""


def needs_signature(method: str) -> bool:
    return methods.rule(method).signed


def org_request(method: str, params: dict[str, Any]) -> dict[str, Any]:
    """A copy of an `org.*` request's params with `aad.org_id` set to its `org_id` (other methods:
    params unchanged). `org_id` is required (a full `name.issuer` id) except for the few methods
    in `methods.ORG_ID_OPTIONAL`; an `aad` naming another organization is refused."""
    if not methods.rule(method).org_aad:
        return params
    org_id = params.get("org_id")
    if org_id is None:
        if method not in methods.ORG_ID_OPTIONAL:
            raise BindingError(f"{method} needs org_id (the organization's id, name.issuer)")
    elif not isinstance(org_id, str) or not _ORG_ID.fullmatch(org_id):
        raise BindingError(f"{method}: org_id must be a full organization id (name.issuer), got {org_id!r:.80}")
    aad = params.get("aad", {})
    if not isinstance(aad, dict):
        raise BindingError(f"{method}: aad must be an object")
    if "org_id" in aad and aad["org_id"] != org_id:
        raise BindingError(f"{method}: aad.org_id does not match org_id")
    return {**params, "aad": {**aad, "org_id": org_id}}


def params_hash(params: dict[str, Any], *, canonical: bool = False) -> str:
    """SHA-256 (hex) of the params without `client_signature` and `_`-prefixed keys: sorted
    compact JSON, or canonical JSON (`org.*`). TypeError/ValueError for what JSON cannot hold."""
    body = {k: v for k, v in params.items() if k != "client_signature" and not k.startswith("_")}
    if canonical:
        data = canonical_json(body)
    else:
        data = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    return hashlib.sha256(data).hexdigest()


def _hashed_text(method: str, params: dict[str, Any]) -> str | None:
    """The sorted compact JSON that params_hash hashes, when it is also a valid wire form of the
    params (no `_` keys, no previous signature, not canonical `org.*` hashing, no NaN), else None."""
    if methods.rule(method).org_aad or "client_signature" in params or any(k.startswith("_") for k in params):
        return None
    try:
        return json.dumps(params, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    except ValueError:  # NaN/Infinity: hashed as JSON cannot carry them, and refused when sent
        return None


def _signed(method: str, params: dict[str, Any], aid: str, key: ec.EllipticCurvePrivateKey,
            cert_fingerprint: str, now: float | None) -> tuple[dict[str, Any], str | None]:
    """(params with `client_signature`, their wire text made from the hashed text, or None)."""
    ts = str(int(time.time() if now is None else now))
    text = _hashed_text(method, params)
    if text is None:
        digest = params_hash(params, canonical=methods.rule(method).org_aad)
    else:
        digest = hashlib.sha256(text.encode("utf-8")).hexdigest()
    signature = pki.sign_der(key, f"{method}|{aid}|{ts}|{digest}".encode("utf-8"))
    client_signature = {"aid": aid, "cert_fingerprint": cert_fingerprint, "timestamp": ts,
                        "params_hash": digest, "signature": pki.b64e(signature)}
    signed = {**params, "client_signature": client_signature}
    if text is None:
        return signed, None
    sig_text = json.dumps(client_signature, ensure_ascii=False, separators=(",", ":"))
    return signed, f'{text[:-1]}{"," if len(text) > 2 else ""}"client_signature":{sig_text}}}'


def sign_params(method: str, params: dict[str, Any], *, aid: str, key: ec.EllipticCurvePrivateKey,
                cert_fingerprint: str, now: float | None = None) -> dict[str, Any]:
    """Return a copy of params with `client_signature` attached (a plain dict: free to change)."""
    return _signed(method, params, aid, key, cert_fingerprint, now)[0]


def sign_for_wire(method: str, params: dict[str, Any], *, aid: str, key: ec.EllipticCurvePrivateKey,
                  cert_fingerprint: str, now: float | None = None) -> dict[str, Any]:
    """`sign_params` for a call about to be sent: where the hashed text is a valid wire form of the
    params (the usual case) the copy is a `jsonrpc.Encoded` carrying that text plus the signature,
    so the frame is made from the bytes that were hashed (serialised once). Send it as it is: a
    change made inside a nested value after signing would not reach the wire."""
    signed, wire = _signed(method, params, aid, key, cert_fingerprint, now)
    return signed if wire is None else rpc.Encoded(signed, wire)


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
    if sig["params_hash"] != params_hash(params, canonical=methods.rule(method).org_aad):
        raise SignatureError("client_signature params_hash does not match the params")
    try:
        raw = pki.b64d(sig["signature"])
    except pki.PKIError:
        raise SignatureError("client_signature signature is not base64") from None
    data = f"{method}|{aid}|{sig['timestamp']}|{sig['params_hash']}".encode("utf-8")
    if not pki.verify_signature(cert.public_key(), raw, data):
        raise SignatureError("client_signature does not verify")
