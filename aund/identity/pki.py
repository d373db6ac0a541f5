"""Identity layer: X.509 and ECDSA helpers shared by aund's client side and the devnet.

Pure functions over `cryptography` objects: fingerprints, key encodings, DER and RAW (r||s)
signatures, and certificate chain checks. No I/O, no trio.
"""
from __future__ import annotations

import base64
import hashlib
import time
from collections.abc import Iterable, Sequence

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature, encode_dss_signature

CURVE = ec.SECP256R1()


class PKIError(ValueError):
    """A certificate, key or signature failed a check; the message says which and why."""


def b64e(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def b64d(text: str) -> bytes:
    """Strict standard base64 (padding required); raises PKIError on anything else."""
    try:
        return base64.b64decode(text, validate=True)
    except (ValueError, TypeError) as exc:
        raise PKIError(f"invalid base64: {exc}") from None


def generate_key(curve: ec.EllipticCurve = CURVE) -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(curve)


def spki_der(public_key: ec.EllipticCurvePublicKey) -> bytes:
    return public_key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def public_key_b64(public_key: ec.EllipticCurvePublicKey) -> str:
    return b64e(spki_der(public_key))


def load_public_key_der(der: bytes) -> ec.EllipticCurvePublicKey:
    """Load SPKI DER of a P-256 public key; raises PKIError for anything else."""
    try:
        key = serialization.load_der_public_key(der)
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise PKIError(f"invalid public key: {exc}") from None
    if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, ec.SECP256R1):
        raise PKIError("public key is not an ECDSA P-256 key")
    return key


def load_public_key_b64(text: str) -> ec.EllipticCurvePublicKey:
    """Load a base64 SPKI DER P-256 public key; raises PKIError."""
    if not isinstance(text, str):
        raise PKIError("public key must be a base64 string")
    return load_public_key_der(b64d(text))


def private_key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def load_private_key_pem(data: bytes) -> ec.EllipticCurvePrivateKey:
    key = serialization.load_pem_private_key(data, password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise PKIError("private key is not an EC key")
    return key


def cert_pem(cert: x509.Certificate) -> str:
    return cert.public_bytes(serialization.Encoding.PEM).decode("ascii")


def load_cert_pem(text: str | bytes) -> x509.Certificate:
    """Load one PEM certificate; raises PKIError."""
    if isinstance(text, str):
        text = text.encode("utf-8")
    try:
        return x509.load_pem_x509_certificate(text)
    except ValueError as exc:
        raise PKIError(f"invalid certificate: {str(exc).split('. ')[0]}") from None


def split_pem_bundle(text: str) -> list[x509.Certificate]:
    """Every certificate of a PEM bundle (text outside BEGIN/END blocks is ignored)."""
    marker = "-----END CERTIFICATE-----"
    parts = [p[p.index("-----BEGIN CERTIFICATE-----"):].strip() + "\n" + marker + "\n"
             for p in text.split(marker) if "-----BEGIN CERTIFICATE-----" in p]
    return [load_cert_pem(p) for p in parts]


def cert_fingerprint(cert: x509.Certificate) -> str:
    """`sha256:<64 hex>` of the certificate DER (the form client_signature carries)."""
    return "sha256:" + cert.fingerprint(hashes.SHA256()).hex()


def spki_fingerprint(public_key: ec.EllipticCurvePublicKey, hex_chars: int = 64) -> str:
    """`sha256:<hex>` of the SPKI DER; 16 hex chars is the E2EE key-id form."""
    return "sha256:" + hashlib.sha256(spki_der(public_key)).hexdigest()[:hex_chars]


def cert_matches_fingerprint(cert: x509.Certificate, fingerprint: str) -> bool:
    """True when `fingerprint` (sha256:, 16 or 64 hex) names the cert DER or its SPKI."""
    fp = fingerprint.strip().lower()
    if fp.startswith("sha256:"):
        fp = fp[7:]
    if len(fp) not in (16, 64) or any(c not in "0123456789abcdef" for c in fp):
        return False
    der_hex = cert.fingerprint(hashes.SHA256()).hex()
    spki_hex = hashlib.sha256(spki_der(cert.public_key())).hexdigest()
    return der_hex.startswith(fp) or spki_hex.startswith(fp)


def cert_aid(cert: x509.Certificate) -> str:
    attrs = cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
    return str(attrs[0].value) if attrs else ""


def sign_der(key: ec.EllipticCurvePrivateKey, data: bytes) -> bytes:
    return key.sign(data, ec.ECDSA(hashes.SHA256()))


try:  # RFC 6979 deterministic nonces where the backend has them (the official SDK signs this way)
    _DETERMINISTIC = ec.ECDSA(hashes.SHA256(), deterministic_signing=True)
except (TypeError, UnsupportedAlgorithm):  # pragma: no cover - older cryptography
    _DETERMINISTIC = ec.ECDSA(hashes.SHA256())


def sign_raw(key: ec.EllipticCurvePrivateKey, data: bytes) -> bytes:
    """RAW r||s (64 bytes) ECDSA-SHA256, deterministic nonces: SPK and envelope signatures."""
    r, s = decode_dss_signature(key.sign(data, _DETERMINISTIC))
    return r.to_bytes(32, "big") + s.to_bytes(32, "big")


def hash_for_key(key) -> hashes.HashAlgorithm | None:
    """The digest that goes with a key (private or public): SHA-256 for P-256, SHA-384 for P-384,
    None for Ed25519 (EdDSA hashes internally; X.509 builders take None). PKIError for other keys."""
    if isinstance(key, (ec.EllipticCurvePrivateKey, ec.EllipticCurvePublicKey)):
        if isinstance(key.curve, ec.SECP256R1):
            return hashes.SHA256()
        if isinstance(key.curve, ec.SECP384R1):
            return hashes.SHA384()
        raise PKIError(f"unsupported curve {key.curve.name} (P-256, P-384 or Ed25519)")
    if isinstance(key, (ed25519.Ed25519PrivateKey, ed25519.Ed25519PublicKey)):
        return None
    raise PKIError(f"unsupported key type {type(key).__name__} (P-256, P-384 or Ed25519)")


def sign_for_key(private_key, data: bytes) -> bytes:
    """Sign with the algorithm that fits the key: DER ECDSA-SHA256 (P-256), DER ECDSA-SHA384
    (P-384) or Ed25519. Raises PKIError for any other key."""
    digest = hash_for_key(private_key)
    if isinstance(private_key, ed25519.Ed25519PrivateKey):
        return private_key.sign(data)
    if not isinstance(private_key, ec.EllipticCurvePrivateKey):
        raise PKIError("a private key is needed to sign")
    return private_key.sign(data, ec.ECDSA(digest))


def verify_signature(public_key, signature: bytes, data: bytes) -> bool:
    """True when `signature` over `data` verifies with the algorithm that fits the key: DER
    ECDSA-SHA256 for P-256, DER ECDSA-SHA384 for P-384, Ed25519. False (never an exception) for a
    bad signature and for any other key type."""
    try:
        digest = hash_for_key(public_key)
        if isinstance(public_key, ed25519.Ed25519PublicKey):
            public_key.verify(signature, data)
        elif isinstance(public_key, ec.EllipticCurvePublicKey):
            public_key.verify(signature, data, ec.ECDSA(digest))
        else:
            return False
    except (PKIError, InvalidSignature, ValueError, TypeError):
        return False
    return True


def verify_raw(public_key: ec.EllipticCurvePublicKey, signature: bytes, data: bytes) -> bool:
    if len(signature) != 64 or not any(signature[:32]) or not any(signature[32:]):
        return False
    der = encode_dss_signature(int.from_bytes(signature[:32], "big"), int.from_bytes(signature[32:], "big"))
    return verify_signature(public_key, der, data)


_KNOWN_CRITICAL = frozenset({
    x509.oid.ExtensionOID.BASIC_CONSTRAINTS, x509.oid.ExtensionOID.KEY_USAGE,
    x509.oid.ExtensionOID.EXTENDED_KEY_USAGE, x509.oid.ExtensionOID.SUBJECT_ALTERNATIVE_NAME,
    x509.oid.ExtensionOID.NAME_CONSTRAINTS, x509.oid.ExtensionOID.POLICY_CONSTRAINTS,
    x509.oid.ExtensionOID.CERTIFICATE_POLICIES, x509.oid.ExtensionOID.INHIBIT_ANY_POLICY,
})


def verify_chain(leaf: x509.Certificate, chain: Sequence[x509.Certificate],
                 roots: Iterable[x509.Certificate], *, now: float | None = None) -> None:
    """Check `leaf` up `chain` (issuer first, self-signed root last) to a trusted root.

    Checks validity periods, CA BasicConstraints, KeyUsage, issuer names and signatures, and
    that the chain's root equals one of `roots` byte for byte. Raises PKIError naming the failure.
    """
    now = time.time() if now is None else now
    if not chain:
        raise PKIError("empty CA chain")
    certs = [leaf, *chain]
    for index, cert in enumerate(certs):
        if not cert.not_valid_before_utc.timestamp() <= now <= cert.not_valid_after_utc.timestamp():
            raise PKIError(f"certificate {index} ({cert.subject.rfc4514_string()}) is outside its validity period")
        try:
            usage = cert.extensions.get_extension_for_class(x509.KeyUsage).value
            if not (usage.digital_signature if index == 0 else usage.key_cert_sign):
                raise PKIError(f"certificate {index} KeyUsage does not allow its role")
        except x509.ExtensionNotFound:
            pass
        for ext in cert.extensions:
            if ext.critical and ext.oid not in _KNOWN_CRITICAL:
                raise PKIError(f"certificate {index} has an unknown critical extension {ext.oid.dotted_string}")
        if index:
            try:
                constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
            except x509.ExtensionNotFound:
                raise PKIError(f"CA certificate {index} lacks BasicConstraints") from None
            if not constraints.ca:
                raise PKIError(f"certificate {index} is not a CA")
            # CAs between this one and the leaf: index - 1 (the leaf itself is not counted)
            if constraints.path_length is not None and index - 1 > constraints.path_length:
                raise PKIError(f"certificate {index} ({cert.subject.rfc4514_string()}) allows "
                               f"{constraints.path_length} intermediate CAs below it, the chain has {index - 1}")
    for child, parent in zip(certs, certs[1:]):
        if child.issuer != parent.subject:
            raise PKIError(f"issuer mismatch: {child.subject.rfc4514_string()}")
        try:
            child.verify_directly_issued_by(parent)
        except (ValueError, TypeError, InvalidSignature) as exc:
            raise PKIError(f"bad signature on {child.subject.rfc4514_string()}: {exc}") from None
    root = certs[-1]
    try:
        root.verify_directly_issued_by(root)
    except (ValueError, TypeError, InvalidSignature):
        raise PKIError("chain root is not self-signed") from None
    root_der = root.public_bytes(serialization.Encoding.DER)
    if not any(r.public_bytes(serialization.Encoding.DER) == root_der for r in roots):
        raise PKIError("chain is not anchored by a trusted root")
