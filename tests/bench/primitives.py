"""The floor: CPU of the cryptographic primitives of one E2EE message, with `cryptography` directly
(the same calls aund/aun/e2ee/p2p.py and aund/aun/signing.py make, without any of their Python).

Send (one peer device with a signed prekey, 3DH, as in the benches): ephemeral P-256 key
generation and its SPKI DER, three ECDH, HKDF-SHA256 (32 bytes), AES-256-GCM twice (body and key
wrap), two ECDSA-P256-SHA256 signatures (the envelope's and the RPC's client_signature).
Receive: loading the ephemeral key from DER, one ECDSA verification (the envelope's signature),
three ECDH, HKDF, AES-256-GCM decryption twice (key unwrap and body).

Run as `python -m tests.bench.primitives [iterations] [runs]`: prints JSON
{"send": [seconds per message per run], "receive": [...]} (process CPU time).
"""
from __future__ import annotations

import json
import os
import sys
import time

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

CURVE = ec.SECP256R1()
ECDH = ec.ECDH()
SIG = ec.ECDSA(hashes.SHA256())
DER = serialization.Encoding.DER
SPKI = serialization.PublicFormat.SubjectPublicKeyInfo
PLAINTEXT = b'{"text":"flood 123","type":"text"}'
AAD = b'{"from":"bench-s0000.aid.test","from_device":"d","message_id":"m-0123456789abcdef","suite":"x","timestamp":1,"to":"r.aid.test","wrap_protocol":"3DH"}'


class Keys:
    def __init__(self) -> None:
        self.sender_ik = ec.generate_private_key(CURVE)
        self.peer_ik = ec.generate_private_key(CURVE)
        self.peer_spk = ec.generate_private_key(CURVE)


def hkdf(ikm: bytes, salt: bytes) -> bytes:
    return HKDF(hashes.SHA256(), 32, salt, b"AUN-V2-3DH").derive(ikm)


def send_once(k: Keys) -> tuple[bytes, bytes, bytes, bytes, bytes, bytes]:
    peer_ik_pub, peer_spk_pub = k.peer_ik.public_key(), k.peer_spk.public_key()
    master, nonce = os.urandom(32), os.urandom(12)
    sealed = AESGCM(master).encrypt(nonce, PLAINTEXT, AAD)
    eph = ec.generate_private_key(CURVE)
    eph_der = eph.public_key().public_bytes(DER, SPKI)
    ikm = eph.exchange(ECDH, peer_ik_pub) + k.sender_ik.exchange(ECDH, peer_spk_pub) + eph.exchange(ECDH, peer_spk_pub)
    wrap_key = hkdf(ikm, eph_der[:16])
    wrap_nonce = os.urandom(12)
    wrapped = AESGCM(wrap_key).encrypt(wrap_nonce, master, None)
    signature = k.sender_ik.sign(sealed + AAD, SIG)
    k.sender_ik.sign(b"message.send|aid|ts|" + sealed[:32], SIG)  # the RPC's client_signature
    return sealed, nonce, eph_der, wrap_nonce, wrapped, signature


def receive_once(k: Keys, msg: tuple[bytes, bytes, bytes, bytes, bytes, bytes], sender_pub) -> bytes:
    sealed, nonce, eph_der, wrap_nonce, wrapped, signature = msg
    sender_pub.verify(signature, sealed + AAD, SIG)
    eph_pub = serialization.load_der_public_key(eph_der)
    ikm = (k.peer_ik.exchange(ECDH, eph_pub) + k.peer_spk.exchange(ECDH, sender_pub)
           + k.peer_spk.exchange(ECDH, eph_pub))
    master = AESGCM(hkdf(ikm, eph_der[:16])).decrypt(wrap_nonce, wrapped, None)
    return AESGCM(master).decrypt(nonce, sealed, AAD)


def measure(iterations: int = 300, runs: int = 5) -> dict[str, list[float]]:
    k = Keys()
    sender_pub = k.sender_ik.public_key()
    msgs = [send_once(k) for _ in range(20)]  # warm up, and messages to receive
    assert receive_once(k, msgs[0], sender_pub) == PLAINTEXT
    out: dict[str, list[float]] = {"send": [], "receive": []}
    for _ in range(runs):
        t0 = time.process_time()
        for _ in range(iterations):
            send_once(k)
        out["send"].append((time.process_time() - t0) / iterations)
        t0 = time.process_time()
        for i in range(iterations):
            receive_once(k, msgs[i % len(msgs)], sender_pub)
        out["receive"].append((time.process_time() - t0) / iterations)
    return out


if __name__ == "__main__":
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 300
    r = int(sys.argv[2]) if len(sys.argv) > 2 else 5
    print(json.dumps(measure(n, r)))
