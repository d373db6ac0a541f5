"""The checks every identity goes through (layer: aund.identity): an AID's form, a P-256 key,
a certificate that certifies the key and names the AID."""
from __future__ import annotations

import re
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from aund.identity import pki
from aund.identity.errors import CertKeyMismatch, InvalidIdentity

# AUN AIDs are "{name}.{issuer}" in lower case (aun_core agent_md_schema._AID_RE, lower-cased as
# validators.validate_aid_format does). Requiring the dot keeps AIDs apart from "_pending".
AID_RE = re.compile(r"^[a-z0-9_][a-z0-9_-]*(?:\.[a-z0-9_][a-z0-9_-]*)+$")


def check_aid(aid: str) -> str:
    if not isinstance(aid, str) or len(aid) > 255 or not AID_RE.fullmatch(aid):
        raise InvalidIdentity(
            f"{aid!r} is not a usable AID (expected lower-case '<name>.<issuer>' of [a-z0-9_-] labels)",
            data={"aid": str(aid)})
    return aid


def spki(key: ec.EllipticCurvePublicKey | ec.EllipticCurvePrivateKey) -> bytes:
    if isinstance(key, ec.EllipticCurvePrivateKey):
        key = key.public_key()
    return pki.spki_der(key)


def check_p256(key: Any, what: str) -> ec.EllipticCurvePrivateKey:
    if not isinstance(key, ec.EllipticCurvePrivateKey) or key.curve.name != pki.CURVE.name:
        kind = getattr(getattr(key, "curve", None), "name", type(key).__name__)
        raise InvalidIdentity(f"{what} is not an ECDSA P-256 key ({kind}); aund supports P-256 only",
                              data={"what": what})
    return key


def check_cert(aid: str, spki_der: bytes, cert_pem: str | bytes) -> x509.Certificate:
    try:
        cert = pki.load_cert_pem(cert_pem)
    except pki.PKIError as exc:
        raise CertKeyMismatch(f"certificate for {aid} is not a valid PEM certificate: {exc}",
                              data={"aid": aid}) from None
    if pki.spki_der(cert.public_key()) != spki_der:
        raise CertKeyMismatch(f"the certificate's public key is not the key of {aid}",
                              data={"aid": aid, "cert_fingerprint": pki.cert_fingerprint(cert)})
    cn = pki.cert_aid(cert)
    if cn != aid:
        raise CertKeyMismatch(f"the certificate is for {cn!r}, not {aid}",
                              data={"aid": aid, "cert_cn": cn})
    return cert
