"""pki.verify_signature / sign_for_key: the digest follows the key; unsupported keys give False."""
from __future__ import annotations

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa

from aund.identity import pki

DATA = b"client-nonce-123"


def test_p256_verifies_sha256_only():
    key = pki.generate_key()
    sig = pki.sign_for_key(key, DATA)
    assert pki.verify_signature(key.public_key(), sig, DATA)
    assert not pki.verify_signature(key.public_key(), key.sign(DATA, ec.ECDSA(hashes.SHA384())), DATA)
    assert not pki.verify_signature(key.public_key(), sig, DATA + b"x")


def test_p384_verifies_sha384_only():
    key = pki.generate_key(ec.SECP384R1())
    sig = pki.sign_for_key(key, DATA)
    key.public_key().verify(sig, DATA, ec.ECDSA(hashes.SHA384()))  # what the SDK's verifier does
    assert pki.verify_signature(key.public_key(), sig, DATA)
    assert not pki.verify_signature(key.public_key(), key.sign(DATA, ec.ECDSA(hashes.SHA256())), DATA)


def test_ed25519():
    key = ed25519.Ed25519PrivateKey.generate()
    sig = pki.sign_for_key(key, DATA)
    assert pki.verify_signature(key.public_key(), sig, DATA)
    assert not pki.verify_signature(key.public_key(), sig, b"other")
    assert not pki.verify_signature(key.public_key(), b"short", DATA)


def test_rsa_is_false_not_an_exception():
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    sig = key.sign(DATA, padding.PKCS1v15(), hashes.SHA256())
    assert pki.verify_signature(key.public_key(), sig, DATA) is False
    assert pki.verify_signature(None, sig, DATA) is False
