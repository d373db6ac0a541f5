"""The sealed-file format of the state dir and its seed (layer: aund.identity; cryptography).

`load_seed` finds the store's encryption seed (the environment or a systemd credential, never
the config file). `Sealer` derives the master key from it (scrypt, parameters and a seed check
in `{state_dir}/.kdf.json`, once per process), seals a plaintext into an `aund.enc` v1 file
(HKDF per file, AES-256-GCM, the AID, purpose and public key as associated data) and opens one,
raising SeedMismatch for a wrong seed and CorruptIdentity (naming the file) for anything else.
The format is described in aund.identity.store.
"""
from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from aund.identity.errors import CorruptIdentity, SeedMismatch, SeedMissing
from aund.identity.files import b64, create_once_raw, json_bytes, unb64

SEED_ENV = "AUND_ENCRYPTION_SEED"
SEED_CREDENTIAL = "encryption_seed"
FORMAT = "aund.enc"
FORMAT_VERSION = 1
SCRYPT_N, SCRYPT_R, SCRYPT_P = 2**15, 8, 1  # 32 MiB, ~0.11 s on a 2-vCPU box; once per process
_SCRYPT_MAX_NR = 2**22  # refuse files asking for more than 512 MiB of scrypt memory
_CHECK_LABEL = b"aund.enc/v1 seed check"
_INFO_PREFIX = b"aund.enc/v1"


def load_seed(env: Mapping[str, str] | None = None) -> bytes:
    """The store's encryption seed: ``$AUND_ENCRYPTION_SEED``, else ``$CREDENTIALS_DIRECTORY/encryption_seed``.

    The credential file is read as bytes with trailing CR/LF removed (``echo`` adds one). The
    seed is never taken from the config file or the command line, and never logged.
    Errors: SeedMissing with the places looked at and how to provide one.
    """
    env = os.environ if env is None else env
    value = env.get(SEED_ENV)
    if value:
        return value.encode("utf-8")
    looked = [f"${SEED_ENV} is {'empty' if value == '' else 'not set'}"]
    creds = env.get("CREDENTIALS_DIRECTORY")
    if creds:
        path = Path(creds) / SEED_CREDENTIAL
        try:
            data = path.read_bytes().rstrip(b"\r\n")
        except OSError as exc:
            looked.append(f"cannot read {path}: {exc.strerror or exc}")
        else:
            if data:
                return data
            looked.append(f"{path} is empty")
    else:
        looked.append("$CREDENTIALS_DIRECTORY is not set (no systemd credentials)")
    raise SeedMissing(
        "no encryption seed for the identity store (" + "; ".join(looked) + "). Provide one as the "
        f"systemd credential '{SEED_CREDENTIAL}' (LoadCredential={SEED_CREDENTIAL}:/etc/aund/seed or "
        f"LoadCredentialEncrypted=) or in the environment variable {SEED_ENV}; make one with "
        "`head -c 32 /dev/urandom | base64`. It is never read from the config file or the command line.",
        data={"looked_at": looked})




class Sealer:
    """Seals and opens the state dir's encrypted files with the key derived from `seed`.
    Thread-safe; the scrypt result is cached per parameter set."""

    def __init__(self, state_dir: Path | str, seed: bytes) -> None:
        self.state_dir = Path(state_dir)
        self.aids_dir = self.state_dir / "AIDs"
        self._seed = seed
        self._kdf_lock = threading.Lock()
        self._masters: dict[tuple[int, int, int, bytes], tuple[bytes, bytes]] = {}
        self._store_kdf: dict[str, Any] | None = None

    def _rel(self, path: Path) -> str:
        try:
            return str(path.relative_to(self.state_dir))
        except ValueError:
            return str(path)

    def _master(self, n: int, r: int, p: int, salt: bytes) -> tuple[bytes, bytes]:
        """(master key, seed check) for these scrypt parameters; cached per process."""
        ident = (n, r, p, salt)
        with self._kdf_lock:
            cached = self._masters.get(ident)
            if cached is None:
                master = hashlib.scrypt(self._seed, salt=salt, n=n, r=r, p=p, dklen=32,
                                        maxmem=128 * n * r + (1 << 24))
                check = hmac.new(master, _CHECK_LABEL, hashlib.sha256).digest()[:16]
                cached = self._masters[ident] = (master, check)
            return cached

    def _parse_kdf(self, kdf: Any, path: Path) -> tuple[int, int, int, bytes, bytes]:
        bad = CorruptIdentity(f"{path}: invalid or unsupported kdf parameters", data={"path": str(path)})
        if not isinstance(kdf, dict) or kdf.get("name") != "scrypt":
            raise bad
        n, r, p = kdf.get("n"), kdf.get("r"), kdf.get("p")
        if not all(type(v) is int for v in (n, r, p)):
            raise bad
        if not (2 <= n and n & (n - 1) == 0 and 1 <= r <= 32 and 1 <= p <= 16 and n * r <= _SCRYPT_MAX_NR):
            raise bad
        salt, check = unb64(kdf.get("salt"), "kdf.salt", path), unb64(kdf.get("check"), "kdf.check", path)
        if len(salt) < 16 or len(check) != 16:
            raise bad
        return n, r, p, salt, check

    def _kdf_for_writing(self) -> dict[str, Any]:
        """The store's KDF (``.kdf.json``, created on first use) after checking the seed against it."""
        if self._store_kdf is not None:
            return self._store_kdf
        path = self.state_dir / ".kdf.json"
        if not path.exists():
            self._refuse_without_kdf(path)
            salt = os.urandom(16)
            _, check = self._master(SCRYPT_N, SCRYPT_R, SCRYPT_P, salt)
            record = {"format": "aund.kdf", "version": 1, "name": "scrypt", "n": SCRYPT_N, "r": SCRYPT_R,
                      "p": SCRYPT_P, "salt": b64(salt), "check": b64(check)}
            create_once_raw(path, json_bytes(record))
        try:
            record = json.loads(path.read_bytes())
        except (OSError, ValueError) as exc:
            raise CorruptIdentity(f"{path} is unreadable: {exc}", data={"path": str(path)}) from None
        n, r, p, salt, check = self._parse_kdf(record, path)
        if not hmac.compare_digest(self._master(n, r, p, salt)[1], check):
            raise SeedMismatch(
                f"the encryption seed does not match this state dir ({path} was made with another seed); "
                f"check {SEED_ENV} (or the '{SEED_CREDENTIAL}' credential)", data={"path": str(path)})
        self._store_kdf = {"name": "scrypt", "n": n, "r": r, "p": p, "salt": b64(salt), "check": b64(check)}
        return self._store_kdf

    def _refuse_without_kdf(self, path: Path) -> None:
        """``.kdf.json`` is absent: fine for a new state dir, fatal for one that holds encrypted data.

        Making a new one there would accept any seed and re-key the state dir (old inbox rows and
        keys would no longer open with the right seed). Errors: CorruptIdentity naming the file.
        """
        sealed = [p for p in (self.state_dir / "inbox.sqlite3",) if p.exists()]
        sealed += sorted(self.aids_dir.glob("**/*.enc.json"))
        if sealed:
            raise CorruptIdentity(
                f"{path} is missing but {self.state_dir} holds encrypted data (e.g. {self._rel(sealed[0])}): "
                "restore .kdf.json from a backup; aund will not check the seed without it nor make a new one",
                data={"path": str(path)})

    def verify_seed(self) -> None:
        """Raise SeedMismatch now if the seed is not the one this state dir was set up with, or
        CorruptIdentity if ``.kdf.json`` is gone from a state dir that holds encrypted data.

        Costs one scrypt (~0.1 s); a no-op check on a store that has never encrypted anything.
        """
        path = self.state_dir / ".kdf.json"
        if path.exists():
            self._kdf_for_writing()
        else:
            self._refuse_without_kdf(path)

    @staticmethod
    def _aad(purpose: str, aid: str, public_key: str) -> bytes:
        return b"\x00".join((_INFO_PREFIX, purpose.encode(), aid.encode(), public_key.encode()))

    def seal(self, purpose: str, aid: str, plaintext: bytes, public_key: str = "") -> bytes:
        kdf = self._kdf_for_writing()
        master, _ = self._master(kdf["n"], kdf["r"], kdf["p"], base64.b64decode(kdf["salt"]))
        hkdf_salt, nonce = os.urandom(16), os.urandom(12)
        aad = self._aad(purpose, aid, public_key)
        key = HKDF(hashes.SHA256(), 32, salt=hkdf_salt, info=aad).derive(master)
        record = {
            "format": FORMAT, "version": FORMAT_VERSION, "aid": aid, "purpose": purpose,
            "public_key": public_key, "kdf": dict(kdf), "hkdf_salt": b64(hkdf_salt),
            "cipher": "AES-256-GCM", "nonce": b64(nonce),
            "ciphertext": b64(AESGCM(key).encrypt(nonce, plaintext, aad)),
        }
        return json_bytes(record)

    def read_envelope(self, path: Path, purpose: str, aid: str) -> dict[str, Any]:
        try:
            record = json.loads(path.read_bytes())
        except FileNotFoundError:
            raise
        except (OSError, ValueError) as exc:
            raise CorruptIdentity(f"{self._rel(path)} is unreadable: {exc}", data={"path": str(path)}) from None
        if not isinstance(record, dict) or record.get("format") != FORMAT:
            raise CorruptIdentity(f"{self._rel(path)} is not an aund encrypted file", data={"path": str(path)})
        if record.get("version") != FORMAT_VERSION:
            raise CorruptIdentity(f"{self._rel(path)} has format version {record.get('version')!r}; this aund "
                                  f"reads version {FORMAT_VERSION} (written by a newer aund?)",
                                  data={"path": str(path)})
        if record.get("aid") != aid or record.get("purpose") != purpose or record.get("cipher") != "AES-256-GCM":
            raise CorruptIdentity(f"{self._rel(path)} belongs to aid={record.get('aid')!r} "
                                  f"purpose={record.get('purpose')!r}, not {aid} {purpose}",
                                  data={"path": str(path)})
        if not isinstance(record.get("public_key"), str):
            raise CorruptIdentity(f"{self._rel(path)}: public_key is not a string", data={"path": str(path)})
        return record

    def open(self, path: Path, purpose: str, aid: str) -> tuple[bytes, dict[str, Any]]:
        record = self.read_envelope(path, purpose, aid)
        n, r, p, salt, check = self._parse_kdf(record.get("kdf"), path)
        hkdf_salt = unb64(record.get("hkdf_salt"), "hkdf_salt", path)
        nonce = unb64(record.get("nonce"), "nonce", path)
        ciphertext = unb64(record.get("ciphertext"), "ciphertext", path)
        master, expected = self._master(n, r, p, salt)
        if not hmac.compare_digest(expected, check):
            raise SeedMismatch(f"the encryption seed does not decrypt {self._rel(path)}; check {SEED_ENV} "
                               f"(or the '{SEED_CREDENTIAL}' credential)",
                               data={"path": str(path), "aid": aid})
        aad = self._aad(purpose, aid, record["public_key"])
        key = HKDF(hashes.SHA256(), 32, salt=hkdf_salt, info=aad).derive(master)
        try:
            return AESGCM(key).decrypt(nonce, ciphertext, aad), record
        except (InvalidTag, ValueError):
            raise CorruptIdentity(f"{self._rel(path)} fails authentication (the seed is right: the file is "
                                  "damaged or was edited or copied from elsewhere)",
                                  data={"path": str(path), "aid": aid}) from None

    def derive_key(self, purpose: str) -> bytes:
        """A 32-byte key for `purpose` derived from the store's master key (e.g. the inbox cipher).
        Raises SeedMismatch if the seed is wrong for this state dir."""
        kdf = self._kdf_for_writing()
        master, _ = self._master(kdf["n"], kdf["r"], kdf["p"], base64.b64decode(kdf["salt"]))
        return HKDF(hashes.SHA256(), 32, salt=None, info=b"aund derived key v1\x00" + purpose.encode()).derive(master)
