"""A portable, passphrase-encrypted bundle of one identity (layer: aund.identity; cryptography, stdlib).

`aund aid export` writes one, `aund aid import --from BUNDLE` reads it on another machine. It
holds what the identity *is*: the private key, every key it had before (a rekey keeps them),
the active and every past certificate, its E2EE prekeys (late messages wrapped to them still
open) and its meta.json. Never tokens (they are bound to the old device; the new aund logs in
afresh) and never the store's seed (the key is re-encrypted under the new store's seed).

File format (JSON, one object), version 1::

    {"format": "aund.identity-bundle", "version": 1, "aid": "<aid>", "created_at": <unix s>,
     "kdf": {"name": "scrypt", "n": 131072, "r": 8, "p": 1, "salt": "<b64 16 B>"},
     "cipher": "AES-256-GCM", "nonce": "<b64 12 B>", "ciphertext": "<b64 ciphertext || tag>"}

    key        = scrypt(passphrase, salt, n, r, p, 32 B)      (cryptography's Scrypt, 128 MiB, ~0.5 s)
    aad        = the JSON of every field but "ciphertext" (sorted keys, compact)
    ciphertext = AES-256-GCM(key, nonce, plaintext JSON, aad)

The aad binds the header (AID, KDF parameters) to the content: an edited header fails
authentication like a wrong passphrase does. A reader bounds the KDF parameters it accepts.
"""
from __future__ import annotations

import base64
import binascii
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

from aund.identity.errors import CorruptIdentity, InvalidIdentity, SeedMismatch

__all__ = ["BUNDLE_FORMAT", "MIN_PASSPHRASE", "PASSPHRASE_ENV", "BundlePassphraseWrong", "Opened", "open_bundle",
           "read_passphrase", "seal"]

BUNDLE_FORMAT = "aund.identity-bundle"
BUNDLE_VERSION = 1
PASSPHRASE_ENV = "AUND_EXPORT_PASSPHRASE"
MIN_PASSPHRASE = 12
SCRYPT_N, SCRYPT_R, SCRYPT_P = 2**17, 8, 1
_MAX_NR = 2**21  # refuse bundles asking for more than 256 MiB of scrypt memory
_MAX_BYTES = 16 * 1024 * 1024


class BundlePassphraseWrong(SeedMismatch):
    """The passphrase does not open the bundle (or the bundle was edited)."""


@dataclass(frozen=True)
class Opened:
    aid: str
    created_at: float
    content: dict[str, Any]


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _aad(header: dict[str, Any]) -> bytes:
    return json.dumps(header, sort_keys=True, separators=(",", ":")).encode("utf-8")


def _derive(passphrase: bytes, salt: bytes, n: int, r: int, p: int) -> bytes:
    return Scrypt(salt=salt, length=32, n=n, r=r, p=p).derive(passphrase)


def seal(aid: str, content: dict[str, Any], passphrase: bytes) -> bytes:
    """The bundle file's bytes for `content` (JSON-safe) of `aid`, encrypted with `passphrase`."""
    salt, nonce = os.urandom(16), os.urandom(12)
    header = {"format": BUNDLE_FORMAT, "version": BUNDLE_VERSION, "aid": aid, "created_at": time.time(),
              "kdf": {"name": "scrypt", "n": SCRYPT_N, "r": SCRYPT_R, "p": SCRYPT_P, "salt": _b64(salt)},
              "cipher": "AES-256-GCM", "nonce": _b64(nonce)}
    plaintext = json.dumps(content, sort_keys=True).encode("utf-8")
    key = _derive(passphrase, salt, SCRYPT_N, SCRYPT_R, SCRYPT_P)
    record = dict(header, ciphertext=_b64(AESGCM(key).encrypt(nonce, plaintext, _aad(header))))
    return (json.dumps(record, indent=2, sort_keys=True) + "\n").encode("utf-8")


def open_bundle(path: Path, passphrase: bytes) -> Opened:
    """Read and decrypt the bundle at `path`. Errors: CorruptIdentity (not a bundle, unsupported
    version or parameters, unreadable), BundlePassphraseWrong (the passphrase does not open it)."""
    def bad(why: str) -> CorruptIdentity:
        return CorruptIdentity(f"{path} {why}", data={"path": str(path)})

    try:
        with open(path, "rb") as f:
            raw = f.read(_MAX_BYTES + 1)
    except OSError as exc:
        raise bad(f"cannot be read ({exc.strerror or exc})") from None
    if len(raw) > _MAX_BYTES:
        raise bad("is too large to be an identity bundle")
    try:
        record = json.loads(raw)
    except ValueError:
        raise bad("is not an aund identity bundle (not JSON)") from None
    if not isinstance(record, dict) or record.get("format") != BUNDLE_FORMAT:
        raise bad("is not an aund identity bundle (made by `aund aid export`)")
    if record.get("version") != BUNDLE_VERSION:
        raise bad(f"has bundle version {record.get('version')!r}; this aund reads version {BUNDLE_VERSION}")
    kdf = record.get("kdf")
    try:
        n, r, p = kdf["n"], kdf["r"], kdf["p"]
        ok = (kdf["name"] == "scrypt" and all(type(v) is int for v in (n, r, p)) and n >= 2 and n & (n - 1) == 0
              and 1 <= r <= 32 and 1 <= p <= 16 and n * r <= _MAX_NR)
        salt = base64.b64decode(kdf["salt"], validate=True)
        nonce = base64.b64decode(record["nonce"], validate=True)
        ciphertext = base64.b64decode(record["ciphertext"], validate=True)
    except (KeyError, TypeError, binascii.Error, ValueError):
        raise bad("has a damaged header") from None
    if not ok or len(salt) < 16 or len(nonce) != 12 or record.get("cipher") != "AES-256-GCM":
        raise bad("asks for unsupported encryption parameters")
    header = {k: v for k, v in record.items() if k != "ciphertext"}
    try:
        plaintext = AESGCM(_derive(passphrase, salt, n, r, p)).decrypt(nonce, ciphertext, _aad(header))
    except (InvalidTag, ValueError):
        raise BundlePassphraseWrong(f"the passphrase does not open {path} (wrong passphrase, or the file was "
                                    "edited)", data={"path": str(path)}) from None
    try:
        content = json.loads(plaintext)
    except ValueError:
        content = None
    if not isinstance(content, dict) or content.get("aid") != record.get("aid"):
        raise bad("holds no identity")
    created = record.get("created_at")
    return Opened(str(record["aid"]), float(created) if isinstance(created, (int, float)) else 0.0, content)


def read_passphrase(passphrase_file: Path | None, *, env: dict[str, str] | None = None,
                    new: bool = False) -> bytes:
    """The bundle passphrase: the file `passphrase_file` (trailing CR/LF removed), else
    $AUND_EXPORT_PASSPHRASE; never the command line. `new` (export): at least MIN_PASSPHRASE
    characters. Errors: InvalidIdentity saying where to put one."""
    env = os.environ if env is None else env
    if passphrase_file is not None:
        try:
            value = passphrase_file.read_bytes().rstrip(b"\r\n")
        except OSError as exc:
            raise InvalidIdentity(f"cannot read the passphrase file {passphrase_file}: {exc.strerror or exc}",
                                  data={"path": str(passphrase_file)}) from None
        where = f"the passphrase file {passphrase_file}"
    else:
        value = env.get(PASSPHRASE_ENV, "").encode("utf-8")
        where = f"${PASSPHRASE_ENV}"
    if not value:
        raise InvalidIdentity(f"no bundle passphrase: {where} is empty or unset; put the passphrase in "
                              f"${PASSPHRASE_ENV} or a file given with --passphrase-file (never on the command line)")
    if new and len(value.decode("utf-8", "replace")) < MIN_PASSPHRASE:
        raise InvalidIdentity(f"the bundle passphrase from {where} is shorter than {MIN_PASSPHRASE} characters; "
                              "choose a longer one (e.g. `head -c 18 /dev/urandom | base64`)")
    return value
