"""Reading an identity the official SDK (fastaun) made, to import it (layer: aund.identity).

`read_fastaun` reads `{aun_path}/AIDs/{aid}`: the private key, decrypted with fastaun's scheme
(PBKDF2-HMAC-SHA256 + an HMAC field key + AES-256-GCM), the certificate and its older versions,
and the gateway URL from fastaun's aun.db (read-only). It writes nothing; the store imports it.
"""
from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import sqlite3
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from aund.identity import pki
from aund.identity.errors import CorruptIdentity, IdentityNotFound, SeedMismatch
from aund.identity.files import unb64
from aund.identity.keys import check_aid, check_cert, check_p256, spki


@dataclass(frozen=True)
class FastaunIdentity:
    """One identity as the official SDK holds it, read by ``read_fastaun`` (nothing stored yet)."""

    aid: str
    aun_path: str  # resolved, for meta.json
    key: ec.EllipticCurvePrivateKey
    cert: x509.Certificate
    older: tuple[x509.Certificate, ...]  # the versions in public/certs/ that parse
    gateway_url: str | None  # from fastaun's aun.db, when readable


def read_fastaun(aun_path: Path | str, aid: str, fastaun_seed: str | bytes) -> FastaunIdentity:
    """Read (only) the fastaun identity ``{aun_path}/AIDs/{aid}``: the key is decrypted with fastaun's
    scheme (PBKDF2-HMAC-SHA256 100k + HMAC field key + AES-256-GCM, see ``_fastaun_reveal``) and
    checked against ``public/cert.pem``. fastaun's tokens are not read (they are bound to fastaun's
    device id; aund logs in afresh). Errors: IdentityNotFound (nothing at that path), SeedMismatch
    (wrong fastaun seed), CorruptIdentity, CertKeyMismatch, InvalidIdentity."""
    check_aid(aid)
    src = Path(aun_path) / "AIDs" / aid  # fastaun's safe_aid() is the identity for valid AIDs
    key_path, cert_path = src / "private" / "key.json", src / "public" / "cert.pem"
    if not key_path.exists():
        raise IdentityNotFound(f"no fastaun identity {aid}: {key_path} does not exist",
                               data={"aid": aid, "path": str(key_path)})
    key = _fastaun_private_key(key_path, aid, fastaun_seed)
    try:
        cert_bytes = cert_path.read_bytes()
    except FileNotFoundError:
        raise CorruptIdentity(f"{cert_path} is missing", data={"path": str(cert_path)}) from None
    cert = check_cert(aid, spki(key), cert_bytes)
    older: list[x509.Certificate] = []
    for p in sorted((src / "public" / "certs").glob("*.pem")):
        with contextlib.suppress(OSError, pki.PKIError):
            older.append(pki.load_cert_pem(p.read_bytes()))
    return FastaunIdentity(aid, str(Path(aun_path).resolve()), key, cert, tuple(older),
                           _fastaun_metadata(src / "aun.db", "gateway_url") or None)


# ── fastaun's key.json (aun_core/keystore/_utils.py, local_identity_store.py) ──

_FASTAUN_SALT = b"aun_file_secret_store_v1"
_FASTAUN_ITERATIONS = 100_000
_FASTAUN_FIELD = "identity/private_key"


def _fastaun_bytes(value: Any, what: str, path: Path) -> bytes:
    if not isinstance(value, str):
        raise CorruptIdentity(f"{path}: {what} is missing", data={"path": str(path)})
    try:
        return bytes.fromhex(value)
    except ValueError:  # decode_field_bytes falls back to base64
        return unb64(value, what, path)


def _fastaun_reveal(seed: bytes, aid: str, record: Mapping[str, Any], path: Path) -> bytes | None:
    """fastaun's reveal_field(seed, safe_aid(aid), "identity/private_key", record), None on auth failure."""
    master = hashlib.pbkdf2_hmac("sha256", seed, _FASTAUN_SALT, _FASTAUN_ITERATIONS)
    field_key = hmac.new(master, f"aun:{aid}:{_FASTAUN_FIELD}\x01".encode(), hashlib.sha256).digest()
    nonce = _fastaun_bytes(record.get("nonce"), "nonce", path)
    ciphertext = _fastaun_bytes(record.get("ciphertext"), "ciphertext", path)
    tag = _fastaun_bytes(record.get("tag"), "tag", path)
    try:
        return AESGCM(field_key).decrypt(nonce, ciphertext + tag, None)
    except (InvalidTag, ValueError):
        return None


def _fastaun_private_key(path: Path, aid: str, seed: str | bytes) -> ec.EllipticCurvePrivateKey:
    seed_bytes = seed if isinstance(seed, bytes) else str(seed).encode("utf-8")
    try:
        data = json.loads(path.read_bytes())
    except (OSError, ValueError) as exc:
        raise CorruptIdentity(f"{path} is unreadable: {exc}", data={"path": str(path)}) from None
    if not isinstance(data, dict):
        raise CorruptIdentity(f"{path} is not a JSON object", data={"path": str(path)})
    record = data.get("private_key_protection")
    if isinstance(record, dict):
        if record.get("scheme") not in ("file_aes", "file_secret_store"):
            raise CorruptIdentity(f"{path}: unknown protection scheme {record.get('scheme')!r}",
                                  data={"path": str(path)})
        pem = _fastaun_reveal(seed_bytes, aid, record, path)
        if pem is None:
            raise SeedMismatch(f"the fastaun seed does not decrypt {path}; pass the encryption_seed that "
                               "fastaun's AIDStore was created with", data={"path": str(path), "aid": aid})
    elif isinstance(data.get("private_key_pem"), str):
        pem = data["private_key_pem"].encode("utf-8")  # legacy plaintext key.json (fastaun still reads it)
    else:
        raise CorruptIdentity(f"{path} holds no private key", data={"path": str(path)})
    try:
        key = serialization.load_pem_private_key(pem, password=None)
    except (ValueError, TypeError) as exc:
        raise CorruptIdentity(f"{path}: private key does not parse: {exc}", data={"path": str(path)}) from None
    key = check_p256(key, str(path))
    declared = data.get("public_key_der_b64")
    if isinstance(declared, str) and declared and declared != pki.public_key_b64(key.public_key()):
        raise CorruptIdentity(f"{path}: public_key_der_b64 does not match the private key",
                              data={"path": str(path)})
    return key


def _fastaun_metadata(db_path: Path, key: str) -> str:
    """A string from fastaun's aun.db metadata_kv, read-only and best effort ("" if unavailable).

    A cleanly closed WAL database has no -wal file; it is then opened ``immutable`` so that
    SQLite creates no -wal/-shm files in fastaun's directory. A live one is opened ``mode=ro``.
    """
    if not db_path.exists():
        return ""
    live = db_path.with_name(db_path.name + "-wal").exists()
    uri = f"{db_path.resolve().as_uri()}?mode=ro" + ("" if live else "&immutable=1")
    try:
        conn = sqlite3.connect(uri, uri=True, timeout=1.0)
        try:
            row = conn.execute("SELECT value FROM metadata_kv WHERE key = ?", (key,)).fetchone()
        finally:
            conn.close()
    except sqlite3.Error:
        return ""
    if not row or not isinstance(row[0], str):
        return ""
    try:
        value = json.loads(row[0])
    except ValueError:
        value = row[0]
    return value.strip() if isinstance(value, str) else ""
