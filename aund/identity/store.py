"""The AID store: aund's identities on disk (layer: aund.identity; cryptography, stdlib, trio in ``ensure``).

Layout under the daemon's state dir (every directory 0700, every file 0600)::

    {state_dir}/aund.lock                      StateLock: flock + holder pid (never deleted)
    {state_dir}/.device_id                     uuid4, written once
    {state_dir}/.kdf.json                      the store's seed KDF: scrypt params, salt, seed check
    {state_dir}/AIDs/_pending/{aid}/           a registration in flight (key written before the RPC)
    {state_dir}/AIDs/_abandoned/{aid}.{ms}/    a registration the gateway refused for good, kept
    {state_dir}/AIDs/{aid}/key.enc.json        private key (PKCS#8 DER), encrypted (format below)
    {state_dir}/AIDs/{aid}/cert.pem            the active certificate
    {state_dir}/AIDs/{aid}/certs/sha256_<64 hex of cert DER>.pem   every cert ever active (kept)
    {state_dir}/AIDs/{aid}/keys/sha256_<64 hex of SPKI DER>.enc.json   every key ever active (kept, rekey)
    {state_dir}/AIDs/{aid}/keys/rekey-pending.enc.json   a rekey in flight (written before the RPC)
    {state_dir}/AIDs/{aid}/tokens.enc.json     {access_token, refresh_token, access_token_expires_at, ...}, encrypted
    {state_dir}/AIDs/{aid}/meta.json           {version, aid, created_at, gateway_url, imported_from, ...} (plain)

Encrypted file format (``key.enc.json`` and ``tokens.enc.json``), version 1::

    {"format": "aund.enc", "version": 1, "aid": "<aid>", "purpose": "identity/private_key" | "tokens",
     "public_key": "<b64 SPKI DER of the key>" (key files only, "" otherwise),
     "kdf": {"name": "scrypt", "n": 32768, "r": 8, "p": 1, "salt": "<b64 16 B>", "check": "<b64 16 B>"},
     "hkdf_salt": "<b64 16 B, random per write>", "cipher": "AES-256-GCM",
     "nonce": "<b64 12 B, random per write>", "ciphertext": "<b64 ciphertext || 16 B tag>"}

    master    = scrypt(seed, kdf.salt, n, r, p, 32 B)          (once per process per salt: ~0.11 s)
    check     = HMAC-SHA256(master, "aund.enc/v1 seed check")[:16]   (wrong seed -> SeedMismatch)
    info=aad  = "aund.enc/v1" 0x00 purpose 0x00 aid 0x00 public_key
    file key  = HKDF-SHA256(master, salt=hkdf_salt, info, 32 B)
    ciphertext= AES-256-GCM(file key, nonce, plaintext, aad)

The aad binds a file to its AID, its purpose and its declared public key, so a file copied
under another AID or purpose, or an edited public key, fails authentication (CorruptIdentity).
All files of a store share ``.kdf.json``'s salt, so the costly scrypt runs once per process;
each file still gets its own random HKDF salt and nonce. A reader takes the KDF parameters
from the file itself (bounded), so parameters can change without rewriting old files.

Durability: every write goes through ``atomic_write`` (temp file in the same directory, fsync,
``os.replace``, fsync of the directory). Key and certificate files are never deleted or
overwritten in place: a key is created once and moved (rename) from ``_pending``; a superseded
certificate stays in ``certs/``, a superseded key (rekey) in ``keys/`` (a rekey copies the
active key there before ``key.enc.json`` names the new one). Tokens are replaced atomically
(old, rotated tokens are worthless and keeping copies of secrets would only widen exposure);
meta.json likewise.

Blocking I/O: everything except ``ensure`` is synchronous; the daemon calls it through
``trio.to_thread.run_sync``. Methods are thread-safe (one lock serialises writes).
"""
from __future__ import annotations

import base64
import binascii
import contextlib
import copy
import errno
import fcntl
import functools
import hashlib
import hmac
import json
import os
import re
import secrets
import sqlite3
import threading
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from aund.identity import pki
from aund.identity.errors import (
    CertKeyMismatch,
    CorruptIdentity,
    IdentityConflict,
    IdentityNotFound,
    InvalidIdentity,
    SeedMismatch,
    SeedMissing,
    StateDirLocked,
)
from client_stub.errors import StorageError

__all__ = [
    "FastaunIdentity", "Identity", "IdentityStore", "StateLock", "atomic_write", "create_once", "load_seed",
    "read_fastaun",
    "SEED_ENV", "SEED_CREDENTIAL", "FAULT_HOOK",
]

SEED_ENV = "AUND_ENCRYPTION_SEED"
SEED_CREDENTIAL = "encryption_seed"

FORMAT = "aund.enc"
FORMAT_VERSION = 1
PURPOSE_KEY = "identity/private_key"
PURPOSE_TOKENS = "tokens"
PURPOSE_PREKEYS = "e2ee/prekeys"
PURPOSE_GROUP_PREKEYS = "e2ee/group_prekeys"
SCRYPT_N, SCRYPT_R, SCRYPT_P = 2**15, 8, 1  # 32 MiB, ~0.11 s on a 2-vCPU box; once per process
_SCRYPT_MAX_NR = 2**22  # refuse files asking for more than 512 MiB of scrypt memory
_CHECK_LABEL = b"aund.enc/v1 seed check"
_INFO_PREFIX = b"aund.enc/v1"

KEY_FILE = "key.enc.json"
CERT_FILE = "cert.pem"
CERTS_DIR = "certs"
KEYS_DIR = "keys"
REKEY_PENDING = "rekey-pending.enc.json"
TOKENS_FILE = "tokens.enc.json"
PREKEYS_FILE = "prekeys.enc.json"
GROUP_PREKEYS_FILE = "group_prekeys.enc.json"
META_FILE = "meta.json"
PENDING_DIR = "_pending"
ABANDONED_DIR = "_abandoned"  # refused registrations, kept (keys are never deleted)
GROUPS_DIR = "_groups"  # group identities (group AIDs) owned by AIDs of this store

# AUN AIDs are "{name}.{issuer}" in lower case (aun_core agent_md_schema._AID_RE, lower-cased as
# validators.validate_aid_format does). Requiring the dot keeps AIDs apart from "_pending".
_AID_RE = re.compile(r"^[a-z0-9_][a-z0-9_-]*(?:\.[a-z0-9_][a-z0-9_-]*)+$")
_DEVICE_ID_RE = re.compile(r"^[A-Za-z0-9._-]{1,128}$")

# Fault injection for tests: called as FAULT_HOOK(stage, path) at "after_write" (temp file
# written, not yet fsynced) and "before_replace" (temp complete, target untouched).
FAULT_HOOK: Callable[[str, Path], None] | None = None


def _fault(stage: str, path: Path) -> None:
    hook = FAULT_HOOK
    if hook is not None:
        hook(stage, path)


# ── files ──────────────────────────────────────────────────────────────────


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


_DISK_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


def write_failed(exc: OSError, path: Path | str) -> StorageError:
    """The API error for a failed write of ``path`` (the disk full, read-only, ...), naming both."""
    why = exc.strerror or str(exc)
    if exc.errno in _DISK_FULL:
        why += " (the disk is full: free space, then aund retries)"
    return StorageError(f"cannot write {path}: {why}",
                        data={"path": str(path), "errno": errno.errorcode.get(exc.errno or 0, "")})


def _write_temp(path: Path, data: bytes, mode: int) -> Path:
    """Write ``data`` to a fresh, fsynced temp file next to ``path``; return the temp path.
    Errors: StorageError naming ``path`` (e.g. the disk is full)."""
    try:
        return _write_temp_raw(path, data, mode)
    except OSError as exc:
        raise write_failed(exc, path) from None


def _write_temp_raw(path: Path, data: bytes, mode: int) -> Path:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW, mode)
    try:
        os.fchmod(fd, mode)  # the umask may have cleared bits; never leave more than asked either
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        _fault("after_write", tmp)
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    os.close(fd)
    return tmp


def atomic_write(path: Path, data: bytes, mode: int = 0o600) -> None:
    """Replace ``path`` with ``data`` atomically and durably.

    Temp file in the same directory (created 0600 with O_EXCL), fsync, ``os.replace``, fsync of
    the directory. A crash at any point leaves either the old file or the new one, never a mix;
    at worst a stray ``.{name}.tmp-*`` file remains, which readers ignore.
    """
    path = Path(path)
    tmp = _write_temp(path, data, mode)
    try:
        _fault("before_replace", path)
        os.replace(tmp, path)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(exc, OSError):
            raise write_failed(exc, path) from None
        raise
    try:
        _fsync_dir(path.parent)
    except OSError as exc:
        raise write_failed(exc, path) from None


def _create_once(path: Path, data: bytes, mode: int = 0o600) -> bool:
    """Create ``path`` with ``data`` unless it exists (atomic, durable); True if this call created it."""
    tmp = _write_temp(path, data, mode)
    try:
        _fault("before_replace", path)
        os.link(tmp, path)  # atomic create-if-absent: never replaces an existing file
        created = True
    except FileExistsError:
        created = False
    finally:
        with contextlib.suppress(OSError):
            os.unlink(tmp)  # only the temporary name; `path` keeps the inode
    if created:
        _fsync_dir(path.parent)
    return created


def create_once(path: Path, data: bytes, mode: int = 0o600) -> bool:
    """Create ``path`` with ``data`` (atomic, durable, ``mode``) unless something is there; True if
    this call created it. Never replaces a file (exports, backups)."""
    return _create_once(Path(path), data, mode)


def _present(path: Path) -> bool:
    """Whether ``path`` exists; StorageError (naming the owner) if this process may not look."""
    try:
        os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        return False
    except PermissionError as exc:
        try:
            owner = f" (owned by uid {os.stat(path.parent).st_uid})"
        except OSError:
            owner = ""
        raise StorageError(f"cannot read {path.parent}{owner}: {exc.strerror}; give it to the daemon's user "
                           f"(uid {os.geteuid()})", retryable=False, data={"path": str(path.parent)}) from None
    return True


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(text: Any, what: str, path: Path) -> bytes:
    if not isinstance(text, str):
        raise CorruptIdentity(f"{path}: field {what!r} is missing or not a string", data={"path": str(path)})
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise CorruptIdentity(f"{path}: field {what!r} is not base64", data={"path": str(path)}) from None


def _json_bytes(obj: Any) -> bytes:
    return (json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n").encode("utf-8")


# ── the seed ───────────────────────────────────────────────────────────────


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


# ── identities ─────────────────────────────────────────────────────────────


@dataclass(frozen=True)
class Identity:
    """One loaded AID: its private key (never in repr), certificate and this store's device id."""

    aid: str
    private_key: ec.EllipticCurvePrivateKey = field(repr=False)
    cert: x509.Certificate = field(repr=False)
    cert_pem: str = field(repr=False)
    device_id: str
    cert_fingerprint: str  # "sha256:" + 64 hex of the cert DER

    @property
    def public_key(self) -> ec.EllipticCurvePublicKey:
        return self.private_key.public_key()

    @property
    def public_key_b64(self) -> str:
        """b64 SPKI DER, as auth.create_aid and peers expect it."""
        return pki.public_key_b64(self.public_key)


def _spki(key: ec.EllipticCurvePublicKey | ec.EllipticCurvePrivateKey) -> bytes:
    if isinstance(key, ec.EllipticCurvePrivateKey):
        key = key.public_key()
    return pki.spki_der(key)


def _check_p256(key: Any, what: str) -> ec.EllipticCurvePrivateKey:
    if not isinstance(key, ec.EllipticCurvePrivateKey) or key.curve.name != pki.CURVE.name:
        kind = getattr(getattr(key, "curve", None), "name", type(key).__name__)
        raise InvalidIdentity(f"{what} is not an ECDSA P-256 key ({kind}); aund supports P-256 only",
                              data={"what": what})
    return key


def _history_name(cert: x509.Certificate) -> str:
    return f"sha256_{cert.fingerprint(hashes.SHA256()).hex()}.pem"


def _key_history_name(spki: bytes) -> str:
    return f"sha256_{hashlib.sha256(spki).hexdigest()}.enc.json"


class IdentityStore:
    """AIDs under ``{state_dir}/AIDs``, keys and tokens encrypted with a key derived from ``seed``.

    Construction creates the state dir (0700), ``AIDs/`` and ``.device_id`` if absent, and
    nothing else; it does not check the seed (see ``verify_seed``).
    """

    def __init__(self, state_dir: Path | str, seed: bytes | str) -> None:
        if isinstance(seed, str):
            seed = seed.encode("utf-8")
        if not isinstance(seed, bytes) or not seed:
            raise SeedMissing("the identity store needs a non-empty encryption seed")
        self.state_dir = Path(state_dir)
        self.aids_dir = self.state_dir / "AIDs"
        self._seed = seed
        self._lock = threading.RLock()  # serialises writes
        self._kdf_lock = threading.Lock()
        self._masters: dict[tuple[int, int, int, bytes], tuple[bytes, bytes]] = {}
        self._store_kdf: dict[str, Any] | None = None
        self._ensure_locks: dict[str, Any] = {}
        self.unreadable: dict[str, str] = {}  # AID -> why, as found by the last ``list``
        self._mkdirs(self.aids_dir)
        if not self.aids_dir.is_dir():
            raise StorageError(f"{self.aids_dir} is not a directory: move that file aside (aund keeps its "
                               "identities there)", retryable=False, data={"path": str(self.aids_dir)})
        self.device_id = self._device_id()

    def __repr__(self) -> str:  # never show the seed
        return f"IdentityStore({str(self.state_dir)!r})"

    def groups(self) -> "IdentityStore":
        """The group identities held here: the same store (seed, KDF, write lock, layout and
        never-delete rules) rooted at ``AIDs/_groups/``, so a group AID is never listed, loaded or
        connected as an agent AID. Group AIDs have the AID form (``name.issuer``)."""
        view = self.__dict__.get("_groups_view")
        if view is None:
            view = copy.copy(self)
            view.aids_dir = self.aids_dir / GROUPS_DIR
            view._ensure_locks = {}
            view.unreadable = {}
            view._mkdirs(view.aids_dir)
            view.__dict__["_groups_view"] = view
            self.__dict__["_groups_view"] = view
        return view

    # ── directories and names ──

    def _mkdirs(self, path: Path) -> None:
        missing: list[Path] = []
        p = path
        while not p.exists():
            missing.append(p)
            p = p.parent
        for d in reversed(missing):
            try:
                os.mkdir(d, 0o700)
            except FileExistsError:
                continue
            except OSError as exc:
                raise write_failed(exc, d) from None
            os.chmod(d, 0o700)  # umask
            _fsync_dir(d.parent)

    @staticmethod
    def _check_aid(aid: str) -> str:
        if not isinstance(aid, str) or len(aid) > 255 or not _AID_RE.fullmatch(aid):
            raise InvalidIdentity(
                f"{aid!r} is not a usable AID (expected lower-case '<name>.<issuer>' of [a-z0-9_-] labels)",
                data={"aid": str(aid)})
        return aid

    def _aid_dir(self, aid: str) -> Path:
        return self.aids_dir / self._check_aid(aid)

    def _pending_dir(self, aid: str) -> Path:
        return self.aids_dir / PENDING_DIR / self._check_aid(aid)

    def _rel(self, path: Path) -> str:
        try:
            return str(path.relative_to(self.state_dir))
        except ValueError:
            return str(path)

    def _device_id(self) -> str:
        path = self.state_dir / ".device_id"
        if not path.exists():
            _create_once(path, str(uuid.uuid4()).encode("ascii"))
        text = path.read_text("utf-8").strip()
        if not _DEVICE_ID_RE.fullmatch(text):
            raise CorruptIdentity(f"{path} does not hold a valid device id", data={"path": str(path)})
        return text

    # ── the seed KDF ──

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
        salt, check = _unb64(kdf.get("salt"), "kdf.salt", path), _unb64(kdf.get("check"), "kdf.check", path)
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
                      "p": SCRYPT_P, "salt": _b64(salt), "check": _b64(check)}
            _create_once(path, _json_bytes(record))
        try:
            record = json.loads(path.read_bytes())
        except (OSError, ValueError) as exc:
            raise CorruptIdentity(f"{path} is unreadable: {exc}", data={"path": str(path)}) from None
        n, r, p, salt, check = self._parse_kdf(record, path)
        if not hmac.compare_digest(self._master(n, r, p, salt)[1], check):
            raise SeedMismatch(
                f"the encryption seed does not match this state dir ({path} was made with another seed); "
                f"check {SEED_ENV} (or the '{SEED_CREDENTIAL}' credential)", data={"path": str(path)})
        self._store_kdf = {"name": "scrypt", "n": n, "r": r, "p": p, "salt": _b64(salt), "check": _b64(check)}
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

    # ── the envelope ──

    @staticmethod
    def _aad(purpose: str, aid: str, public_key: str) -> bytes:
        return b"\x00".join((_INFO_PREFIX, purpose.encode(), aid.encode(), public_key.encode()))

    def _seal(self, purpose: str, aid: str, plaintext: bytes, public_key: str = "") -> bytes:
        kdf = self._kdf_for_writing()
        master, _ = self._master(kdf["n"], kdf["r"], kdf["p"], base64.b64decode(kdf["salt"]))
        hkdf_salt, nonce = os.urandom(16), os.urandom(12)
        aad = self._aad(purpose, aid, public_key)
        key = HKDF(hashes.SHA256(), 32, salt=hkdf_salt, info=aad).derive(master)
        record = {
            "format": FORMAT, "version": FORMAT_VERSION, "aid": aid, "purpose": purpose,
            "public_key": public_key, "kdf": dict(kdf), "hkdf_salt": _b64(hkdf_salt),
            "cipher": "AES-256-GCM", "nonce": _b64(nonce),
            "ciphertext": _b64(AESGCM(key).encrypt(nonce, plaintext, aad)),
        }
        return _json_bytes(record)

    def _read_envelope(self, path: Path, purpose: str, aid: str) -> dict[str, Any]:
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

    def _open(self, path: Path, purpose: str, aid: str) -> tuple[bytes, dict[str, Any]]:
        record = self._read_envelope(path, purpose, aid)
        n, r, p, salt, check = self._parse_kdf(record.get("kdf"), path)
        hkdf_salt = _unb64(record.get("hkdf_salt"), "hkdf_salt", path)
        nonce = _unb64(record.get("nonce"), "nonce", path)
        ciphertext = _unb64(record.get("ciphertext"), "ciphertext", path)
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

    def _read_key(self, path: Path, aid: str) -> ec.EllipticCurvePrivateKey:
        plaintext, record = self._open(path, PURPOSE_KEY, aid)
        try:
            key = serialization.load_der_private_key(plaintext, password=None)
        except (ValueError, TypeError) as exc:
            raise CorruptIdentity(f"{self._rel(path)} holds no usable private key: {exc}",
                                  data={"path": str(path)}) from None
        key = _check_p256(key, self._rel(path))
        if pki.public_key_b64(key.public_key()) != record["public_key"]:
            raise CorruptIdentity(f"{self._rel(path)}: public_key does not match the private key",
                                  data={"path": str(path)})
        return key

    def _stored_public_key(self, path: Path, aid: str) -> bytes:
        """SPKI DER declared by a key file (authenticated on every decrypt via the aad)."""
        record = self._read_envelope(path, PURPOSE_KEY, aid)
        return _unb64(record["public_key"], "public_key", path)

    def _key_record(self, aid: str, key: ec.EllipticCurvePrivateKey) -> bytes:
        der = key.private_bytes(serialization.Encoding.DER, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
        return self._seal(PURPOSE_KEY, aid, der, pki.public_key_b64(key.public_key()))

    # ── certificates ──

    @staticmethod
    def _check_cert(aid: str, spki: bytes, cert_pem: str | bytes) -> x509.Certificate:
        try:
            cert = pki.load_cert_pem(cert_pem)
        except pki.PKIError as exc:
            raise CertKeyMismatch(f"certificate for {aid} is not a valid PEM certificate: {exc}",
                                  data={"aid": aid}) from None
        if pki.spki_der(cert.public_key()) != spki:
            raise CertKeyMismatch(f"the certificate's public key is not the key of {aid}",
                                  data={"aid": aid, "cert_fingerprint": pki.cert_fingerprint(cert)})
        cn = pki.cert_aid(cert)
        if cn != aid:
            raise CertKeyMismatch(f"the certificate is for {cn!r}, not {aid}",
                                  data={"aid": aid, "cert_cn": cn})
        return cert

    def _write_cert(self, aid_dir: Path, cert: x509.Certificate) -> None:
        """History first (create-once), then the active cert.pem; the previous cert stays in certs/."""
        history = aid_dir / CERTS_DIR
        self._mkdirs(history)
        active = aid_dir / CERT_FILE
        if active.exists():  # make sure what we replace is in the history (e.g. after an import)
            with contextlib.suppress(pki.PKIError):
                old = pki.load_cert_pem(active.read_bytes())
                if not (history / _history_name(old)).exists():
                    _create_once(history / _history_name(old), active.read_bytes())
        pem = pki.cert_pem(cert).encode("ascii")
        if not (history / _history_name(cert)).exists():
            _create_once(history / _history_name(cert), pem)
        if not active.exists() or active.read_bytes() != pem:
            atomic_write(active, pem)

    # ── public API: reading ──

    def exists(self, aid: str) -> bool:
        """Errors: StorageError if the AID's directory cannot be read (e.g. owned by another user)."""
        return _present(self._aid_dir(aid) / KEY_FILE)

    def list(self) -> list[str]:
        """AIDs present in the store, sorted (pending registrations are not listed). A directory this
        process cannot read is left out, and named in ``unreadable`` (AID -> why) for health."""
        found, unreadable = [], {}
        try:
            entries = list(self.aids_dir.iterdir())
        except OSError as exc:
            raise StorageError(f"cannot read {self.aids_dir}: {exc.strerror or exc}",
                               data={"path": str(self.aids_dir)}) from None
        for p in entries:
            if not _AID_RE.fullmatch(p.name):
                continue
            try:
                if _present(p / KEY_FILE):
                    found.append(p.name)
            except StorageError as exc:
                unreadable[p.name] = exc.message
        self.unreadable = unreadable
        return sorted(found)

    def _require(self, aid: str) -> Path:
        d = self._aid_dir(aid)
        if not _present(d / KEY_FILE):
            if d.is_dir() and any(d.iterdir()):
                raise CorruptIdentity(f"{self._rel(d / KEY_FILE)} is missing but {self._rel(d)} exists",
                                      data={"path": str(d / KEY_FILE), "aid": aid})
            raise IdentityNotFound(f"no identity {aid} in {self.aids_dir}", data={"aid": aid})
        return d

    def load(self, aid: str) -> Identity:
        """The identity of ``aid``: key decrypted, cert checked against it. Reads only.

        Errors: IdentityNotFound, SeedMismatch (wrong seed; names the file), CorruptIdentity
        (names the file), CertKeyMismatch (cert.pem does not certify the stored key), InvalidIdentity.
        """
        d = self._require(aid)
        key = self._read_key(d / KEY_FILE, aid)
        cert_path = d / CERT_FILE
        try:
            pem = cert_path.read_bytes()
        except FileNotFoundError:
            raise CorruptIdentity(f"{self._rel(cert_path)} is missing", data={"path": str(cert_path)}) from None
        try:
            pki.load_cert_pem(pem)
        except (pki.PKIError, ValueError) as exc:
            raise CorruptIdentity(f"{self._rel(cert_path)} is not a valid certificate: {exc}",
                                  data={"path": str(cert_path)}) from None
        try:
            cert = self._check_cert(aid, _spki(key), pem)
        except CertKeyMismatch as exc:
            cert = self._newest_cert_for(d, aid, _spki(key))  # a rekey stopped between key and cert
            if cert is None:
                raise CertKeyMismatch(f"{self._rel(cert_path)}: {exc.message}", data=exc.data) from None
        return Identity(aid=aid, private_key=key, cert=cert, cert_pem=pki.cert_pem(cert),
                        device_id=self.device_id, cert_fingerprint=pki.cert_fingerprint(cert))

    def _newest_cert_for(self, aid_dir: Path, aid: str, spki: bytes) -> x509.Certificate | None:
        """The newest certificate in the history that certifies `spki` for `aid`, or None."""
        found = []
        for path in sorted((aid_dir / CERTS_DIR).glob("sha256_*.pem")) if (aid_dir / CERTS_DIR).is_dir() else []:
            with contextlib.suppress(CertKeyMismatch, OSError):
                found.append(self._check_cert(aid, spki, path.read_bytes()))
        return max(found, key=lambda c: c.not_valid_before_utc, default=None)

    def past_keys(self, aid: str) -> list[ec.EllipticCurvePrivateKey]:
        """Every key ``aid`` had before the current one (a rekey keeps them: late messages wrapped
        to an old identity key must still open), oldest file name first. Errors as ``load``."""
        d = self._require(aid)
        current = self._stored_public_key(d / KEY_FILE, aid)
        keys = []
        for path in sorted((d / KEYS_DIR).glob("sha256_*.enc.json")) if (d / KEYS_DIR).is_dir() else []:
            key = self._read_key(path, aid)
            if _spki(key) != current:
                keys.append(key)
        return keys

    def load_tokens(self, aid: str) -> dict[str, Any] | None:
        """The stored tokens of ``aid`` or None. Errors as ``load``."""
        return self._load_sealed_json(self._require(aid) / TOKENS_FILE, PURPOSE_TOKENS, aid, dict, None)

    def load_meta(self, aid: str) -> dict[str, Any]:
        """meta.json of ``aid`` ({} if absent). Errors: IdentityNotFound, CorruptIdentity."""
        path = self._require(aid) / META_FILE
        try:
            meta = json.loads(path.read_bytes())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            raise CorruptIdentity(f"{self._rel(path)} is unreadable: {exc}", data={"path": str(path)}) from None
        if not isinstance(meta, dict):
            raise CorruptIdentity(f"{self._rel(path)} does not hold a JSON object", data={"path": str(path)})
        return meta

    # ── public API: writing ──

    def save_tokens(self, aid: str, tokens: Mapping[str, Any]) -> None:
        """Replace the stored tokens atomically and durably (call before using a rotated refresh token)."""
        plaintext = json.dumps(dict(tokens), sort_keys=True).encode("utf-8")
        with self._lock:
            d = self._require(aid)
            atomic_write(d / TOKENS_FILE, self._seal(PURPOSE_TOKENS, aid, plaintext))

    def load_prekeys(self, aid: str) -> list[dict[str, Any]]:
        """Every E2EE signed prekey ever made for ``aid`` on this device (oldest first; [] if none).

        Each record: spk_id, private_pem, timestamp, signature, created_at (and uploaded_at when
        published). Errors as ``load``."""
        return self._load_key_list(aid, PREKEYS_FILE, PURPOSE_PREKEYS)

    def save_prekeys(self, aid: str, records: list[Mapping[str, Any]]) -> None:
        """Replace the prekey list atomically. Callers only ever append: old prekeys are kept so
        that late messages wrapped to them still decrypt (aund never deletes key material)."""
        self._save_key_list(aid, PREKEYS_FILE, PURPOSE_PREKEYS, records)

    def load_group_prekeys(self, aid: str) -> list[dict[str, Any]]:
        """Every group prekey (``group.v2.put_group_pk``) ever made for ``aid``, oldest first.

        Records as ``load_prekeys`` plus ``group_id``. Kept apart from the P2P prekeys, whose list
        order names the current P2P prekey."""
        return self._load_key_list(aid, GROUP_PREKEYS_FILE, PURPOSE_GROUP_PREKEYS)

    def save_group_prekeys(self, aid: str, records: list[Mapping[str, Any]]) -> None:
        """Replace the group prekey list atomically; like ``save_prekeys`` it refuses to drop a key."""
        self._save_key_list(aid, GROUP_PREKEYS_FILE, PURPOSE_GROUP_PREKEYS, records)

    def _load_key_list(self, aid: str, name: str, purpose: str) -> list[dict[str, Any]]:
        return self._load_sealed_json(self._require(aid) / name, purpose, aid, list, [])

    def _load_sealed_json(self, path: Path, purpose: str, aid: str, kind: type, missing: Any) -> Any:
        """The JSON value (of type `kind`) sealed in `path`, or `missing` if there is no file.
        Errors: SeedMismatch, CorruptIdentity naming the file."""
        try:
            plaintext, _ = self._open(path, purpose, aid)
        except FileNotFoundError:
            return missing
        try:
            value = json.loads(plaintext)
        except ValueError:
            value = None
        if not isinstance(value, kind):
            what = "JSON object" if kind is dict else "JSON list"
            raise CorruptIdentity(f"{self._rel(path)} does not hold a {what}", data={"path": str(path)})
        return value

    def _save_key_list(self, aid: str, name: str, purpose: str, records: list[Mapping[str, Any]]) -> None:
        old = {r.get("spk_id") for r in self._load_key_list(aid, name, purpose)}
        new = {r.get("spk_id") for r in records}
        if not old <= new:
            raise ValueError(f"saving {name} would drop a prekey: prekeys are never deleted")
        plaintext = json.dumps([dict(r) for r in records], sort_keys=True).encode("utf-8")
        with self._lock:
            atomic_write(self._require(aid) / name, self._seal(purpose, aid, plaintext))

    def derive_key(self, purpose: str) -> bytes:
        """A 32-byte key for `purpose` derived from the store's master key (e.g. the inbox cipher).
        Raises SeedMismatch if the seed is wrong for this state dir."""
        kdf = self._kdf_for_writing()
        master, _ = self._master(kdf["n"], kdf["r"], kdf["p"], base64.b64decode(kdf["salt"]))
        return HKDF(hashes.SHA256(), 32, salt=None, info=b"aund derived key v1\x00" + purpose.encode()).derive(master)

    def save_meta(self, aid: str, meta: Mapping[str, Any]) -> None:
        """Replace meta.json of ``aid`` (JSON object) atomically."""
        data = _json_bytes(dict(meta))
        with self._lock:
            atomic_write(self._require(aid) / META_FILE, data)

    def update_meta(self, aid: str, **changes: Any) -> dict[str, Any]:
        """Read-modify-write of meta.json under the store lock; returns the new meta."""
        with self._lock:
            meta = self.load_meta(aid)
            meta.update(changes)
            self.save_meta(aid, meta)
            return meta

    def save_cert(self, aid: str, cert_pem: str | bytes) -> str:
        """Make ``cert_pem`` the active certificate of ``aid``; returns its fingerprint.

        The cert must certify the stored key (SPKI) and name ``aid`` (CN), else CertKeyMismatch.
        Every certificate ever active stays in ``certs/sha256_<hex>.pem``.
        """
        with self._lock:
            d = self._require(aid)
            cert = self._check_cert(aid, self._stored_public_key(d / KEY_FILE, aid), cert_pem)
            self._write_cert(d, cert)
            return pki.cert_fingerprint(cert)

    def _archive_key(self, d: Path, aid: str) -> None:
        """Copy the active key file into ``keys/`` (create-once) before anything replaces it."""
        history = d / KEYS_DIR
        self._mkdirs(history)
        name = _key_history_name(self._stored_public_key(d / KEY_FILE, aid))
        if not (history / name).exists():
            _create_once(history / name, (d / KEY_FILE).read_bytes())

    def rekey_pending(self, aid: str) -> ec.EllipticCurvePrivateKey:
        """The new key of a rekey of ``aid``, written encrypted to ``keys/rekey-pending.enc.json``
        before the gateway hears of it (the current key is archived in ``keys/`` first). Idempotent:
        a pending key (a rekey that failed or crashed, perhaps after the gateway accepted it) is
        returned again. Errors: IdentityNotFound, SeedMismatch, StorageError."""
        with self._lock:
            d = self._require(aid)
            self._archive_key(d, aid)
            path = d / KEYS_DIR / REKEY_PENDING
            if path.exists():
                return self._read_key(path, aid)
            key = pki.generate_key()
            if not _create_once(path, self._key_record(aid, key)):
                return self._read_key(path, aid)
            return key

    def commit_rekey(self, aid: str, key: ec.EllipticCurvePrivateKey, cert_pem: str | bytes) -> str:
        """Make the pending ``key`` and its new ``cert_pem`` the active identity; returns the cert
        fingerprint. Nothing is deleted: the old key stays in ``keys/``, the old cert in ``certs/``,
        the pending file is renamed into ``keys/``. A crash between the key and cert.pem is
        repaired by ``load`` (it takes the newest cert of the key from the history).
        Errors: CertKeyMismatch (the cert is not for ``key``), IdentityConflict (another key is pending)."""
        with self._lock:
            d = self._require(aid)
            cert = self._check_cert(aid, _spki(key), cert_pem)
            pending = d / KEYS_DIR / REKEY_PENDING
            if not pending.exists() or self._stored_public_key(pending, aid) != _spki(key):
                if self._stored_public_key(d / KEY_FILE, aid) == _spki(key):  # done before
                    self._write_cert(d, cert)
                    return pki.cert_fingerprint(cert)
                raise IdentityConflict(f"the pending rekey of {aid} is not for this key", data={"aid": aid})
            self._archive_key(d, aid)
            history = d / CERTS_DIR
            self._mkdirs(history)
            if not (history / _history_name(cert)).exists():  # the new cert first: load can find it
                _create_once(history / _history_name(cert), pki.cert_pem(cert).encode("ascii"))
            record = pending.read_bytes()
            target = d / KEYS_DIR / _key_history_name(_spki(key))
            if not target.exists():
                os.rename(pending, target)  # renamed, never deleted
                _fsync_dir(target.parent)
            atomic_write(d / KEY_FILE, record)
            self._write_cert(d, cert)
            return pki.cert_fingerprint(cert)

    def create_pending(self, aid: str) -> ec.EllipticCurvePrivateKey:
        """The key to register ``aid`` with, written encrypted to ``AIDs/_pending/{aid}/`` first.

        Idempotent: if a pending key exists (a registration that crashed or failed after the
        key was written, perhaps after the gateway accepted it), that same key is returned.
        Errors: IdentityConflict if ``aid`` is already in the store; SeedMismatch.
        """
        with self._lock:
            if self.exists(aid):
                raise IdentityConflict(f"{aid} is already in the store", data={"aid": aid})
            pdir = self._pending_dir(aid)
            path = pdir / KEY_FILE
            if path.exists():
                return self._read_key(path, aid)
            key = pki.generate_key()
            record = self._key_record(aid, key)  # checks the seed before anything is written
            self._mkdirs(pdir)
            if not _create_once(path, record):
                return self._read_key(path, aid)
            return key

    def abandon_pending(self, aid: str) -> Path | None:
        """Move a pending registration the gateway refused for good (the name belongs to another
        key) to ``AIDs/_abandoned/{aid}.{unix time}/``, so that a later registration starts with a
        fresh key. Nothing is deleted: the key stays there, encrypted. Returns where it went (None
        if nothing was pending)."""
        with self._lock:
            pdir = self._pending_dir(aid)
            if not pdir.exists():
                return None
            parent = self.aids_dir / ABANDONED_DIR
            self._mkdirs(parent)
            target = parent / f"{aid}.{int(time.time() * 1000)}"
            os.rename(pdir, target)
            _fsync_dir(parent)
            _fsync_dir(pdir.parent)
            return target

    def promote(self, aid: str, key: ec.EllipticCurvePrivateKey, cert_pem: str | bytes,
                *, meta: Mapping[str, Any] | None = None) -> None:
        """Finish a registration: check the cert against ``key``, then move the pending dir into place.

        Errors: CertKeyMismatch (cert is for another key or CN; the pending key is kept),
        IdentityNotFound (no pending key), IdentityConflict (another key is pending or stored).
        Idempotent once done (same key): only the cert is updated.
        """
        with self._lock:
            cert = self._check_cert(aid, _spki(key), cert_pem)
            target = self._aid_dir(aid)
            if (target / KEY_FILE).exists():
                if self._stored_public_key(target / KEY_FILE, aid) != _spki(key):
                    raise IdentityConflict(f"{aid} is already in the store with another key", data={"aid": aid})
                self._write_cert(target, cert)
                return
            pdir = self._pending_dir(aid)
            if not (pdir / KEY_FILE).exists():
                raise IdentityNotFound(f"no pending registration of {aid} (call create_pending first)",
                                       data={"aid": aid})
            if self._stored_public_key(pdir / KEY_FILE, aid) != _spki(key):
                raise IdentityConflict(f"the pending key of {aid} is not the key being promoted", data={"aid": aid})
            self._write_cert(pdir, cert)
            full = {"version": 1, "aid": aid, "created_at": time.time(), **dict(meta or {})}
            atomic_write(pdir / META_FILE, _json_bytes(full))
            self._move_into_place(pdir, target)

    def _move_into_place(self, pdir: Path, target: Path) -> None:
        try:
            os.rename(pdir, target)  # atomic; replaces only an empty directory
        except OSError as exc:
            if exc.errno in (errno.ENOTEMPTY, errno.EEXIST):
                raise CorruptIdentity(f"{self._rel(target)} exists without {KEY_FILE}; move it aside",
                                      data={"path": str(target)}) from None
            raise
        _fsync_dir(target.parent)
        _fsync_dir(pdir.parent)

    async def ensure(self, aid: str, register: Callable[[str, ec.EllipticCurvePublicKey], Awaitable[str]],
                     *, meta: Mapping[str, Any] | None = None) -> Identity:
        """Load ``aid``; only if absent: create_pending, ``await register(aid, public_key)`` -> cert PEM,
        promote (with ``meta``); then load again. Concurrent calls for one AID register once.

        Must run under trio; file work runs in worker threads. If ``register`` fails the pending
        key is kept and the next call registers the same key again.
        """
        import trio

        self._check_aid(aid)
        lock = self._ensure_locks.setdefault(aid, trio.Lock())
        async with lock:
            try:
                return await trio.to_thread.run_sync(self.load, aid)
            except IdentityNotFound:
                pass
            key = await trio.to_thread.run_sync(self.create_pending, aid)
            cert_pem = await register(aid, key.public_key())
            await trio.to_thread.run_sync(functools.partial(self.promote, aid, key, cert_pem, meta=meta))
            return await trio.to_thread.run_sync(self.load, aid)

    # ── import from the official SDK ──

    def import_fastaun(self, aun_path: Path | str, aid: str, fastaun_seed: str | bytes,
                       *, meta: Mapping[str, Any] | None = None) -> Identity:
        """Import an identity made by fastaun (``{aun_path}/AIDs/{aid}/private/key.json`` + ``public/cert.pem``):
        ``read_fastaun`` then ``import_read``; see both for what is read, written and raised."""
        return self.import_read(read_fastaun(aun_path, aid, fastaun_seed), meta=meta)

    def import_read(self, found: FastaunIdentity, *, meta: Mapping[str, Any] | None = None) -> Identity:
        """Store what ``read_fastaun`` found: the key re-encrypted under this store's seed, the cert
        and its older versions (history), ``gateway_url`` in meta.json. Reads nothing of fastaun's
        (so the caller may read as one user and store as another). Idempotent for the same key.
        Errors: IdentityConflict (the AID exists here, or is pending, with another key), StorageError."""
        aid, key, cert = found.aid, found.key, found.cert
        with self._lock:
            target, pdir = self._stage_import(aid, key)
            if pdir is None:
                return self.load(aid)
            self._keep_certs(pdir, found.older)
            self._write_cert(pdir, cert)
            now = time.time()
            full: dict[str, Any] = {"version": 1, "aid": aid, "created_at": now,
                                    "imported_from": {"sdk": "fastaun", "aun_path": found.aun_path,
                                                      "imported_at": now}}
            if found.gateway_url:
                full["gateway_url"] = found.gateway_url
            full.update(meta or {})
            atomic_write(pdir / META_FILE, _json_bytes(full))
            self._move_into_place(pdir, target)
        return self.load(aid)


    def _stage_import(self, aid: str, key: ec.EllipticCurvePrivateKey) -> tuple[Path, Path | None]:
        """(the AID's directory, its pending directory holding `key` for an import), or (dir, None)
        when the store already holds the AID with this key. Under the lock. Errors:
        IdentityConflict (the AID is held, or pending, with another key)."""
        target = self._aid_dir(aid)
        if (target / KEY_FILE).exists():
            if self._stored_public_key(target / KEY_FILE, aid) != _spki(key):
                raise IdentityConflict(f"{aid} is already in aund with a different key; not importing",
                                       data={"aid": aid})
            return target, None
        pdir = self._pending_dir(aid)
        pkey = pdir / KEY_FILE
        if pkey.exists():
            if self._stored_public_key(pkey, aid) != _spki(key):
                raise IdentityConflict(f"a registration of {aid} with another key is pending in aund",
                                       data={"aid": aid})
        else:
            record = self._key_record(aid, key)
            self._mkdirs(pdir)
            _create_once(pkey, record)
        return target, pdir

    def _keep_certs(self, directory: Path, certs: Iterable[x509.Certificate]) -> None:
        """Each of `certs` in `directory`'s certificate history, once (never one written over)."""
        history = directory / CERTS_DIR
        self._mkdirs(history)
        for old in certs:
            if not (history / _history_name(old)).exists():
                _create_once(history / _history_name(old), pki.cert_pem(old).encode("ascii"))

    # ── moving an identity to another aund (aund.identity.bundle) ──

    def export_content(self, aid: str) -> dict[str, Any]:
        """What a bundle carries of ``aid``, JSON-safe: the key and every past key (PKCS#8 DER, b64),
        the active and every past certificate (PEM), the prekey lists and meta.json. Never tokens.
        Reads only (each file is replaced atomically, so a copy taken while the daemon runs is whole).
        Errors as ``load``."""
        identity = self.load(aid)
        d = self._aid_dir(aid)

        def der(key: ec.EllipticCurvePrivateKey) -> str:
            return _b64(key.private_bytes(serialization.Encoding.DER, serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption()))

        certs = []
        for path in sorted((d / CERTS_DIR).glob("sha256_*.pem")) if (d / CERTS_DIR).is_dir() else []:
            with contextlib.suppress(OSError, pki.PKIError):
                certs.append(pki.cert_pem(pki.load_cert_pem(path.read_bytes())))
        return {"aid": aid, "key": der(identity.private_key), "cert": identity.cert_pem, "certs": certs,
                "past_keys": [der(k) for k in self.past_keys(aid)], "prekeys": self.load_prekeys(aid),
                "group_prekeys": self.load_group_prekeys(aid), "meta": self.load_meta(aid),
                "device_id": identity.device_id}

    def import_content(self, content: Mapping[str, Any], *, meta: Mapping[str, Any] | None = None) -> Identity:
        """Store what ``export_content`` gave (from a bundle): the keys re-encrypted under this
        store's seed, the certificates, prekeys (merged: none dropped) and meta.json (without
        ``disabled``, plus ``meta``). Idempotent for the same key; adds what is missing and never
        replaces or deletes anything. Errors: IdentityConflict (the AID is here, or pending, with
        another key), CorruptIdentity (the content does not hold a usable identity), StorageError."""
        aid = self._check_aid(str(content.get("aid", "")))
        where = f"the bundle of {aid}"
        try:
            key = _check_p256(serialization.load_der_private_key(base64.b64decode(content["key"]), None), where)
            past = [_check_p256(serialization.load_der_private_key(base64.b64decode(k), None), where)
                    for k in content.get("past_keys") or []]
            cert = self._check_cert(aid, _spki(key), content["cert"])
            older = [pki.load_cert_pem(c) for c in content.get("certs") or []]
        except (KeyError, TypeError, ValueError, binascii.Error, pki.PKIError, CertKeyMismatch) as exc:
            raise CorruptIdentity(f"{where} holds no usable identity: {exc}", data={"aid": aid}) from None
        with self._lock:
            target, pdir = self._stage_import(aid, key)
            if pdir is not None:
                self._write_cert(pdir, cert)
                full = {k: v for k, v in dict(content.get("meta") or {}).items() if k != "disabled"}
                full.update({"version": 1, "aid": aid}, **dict(meta or {}))
                full.setdefault("created_at", time.time())
                atomic_write(pdir / META_FILE, _json_bytes(full))
                self._move_into_place(pdir, target)
            self._keep_certs(target, [*older, cert])
            if past:
                self._mkdirs(target / KEYS_DIR)
            for old_key in past:
                name = target / KEYS_DIR / _key_history_name(_spki(old_key))
                if not name.exists():
                    _create_once(name, self._key_record(aid, old_key))
            for loader, saver, field_name in ((self.load_prekeys, self.save_prekeys, "prekeys"),
                                              (self.load_group_prekeys, self.save_group_prekeys, "group_prekeys")):
                theirs = [r for r in content.get(field_name) or [] if isinstance(r, dict)]
                ours = loader(aid)
                known = {r.get("spk_id") for r in ours}
                added = [r for r in theirs if r.get("spk_id") not in known]
                if added:  # appended: the list's last entry stays this store's current prekey if it had one
                    saver(aid, ours + added if ours else theirs)
        return self.load(aid)


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
    IdentityStore._check_aid(aid)
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
    cert = IdentityStore._check_cert(aid, _spki(key), cert_bytes)
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
        return _unb64(value, what, path)


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
    key = _check_p256(key, str(path))
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


# ── one daemon per state dir ───────────────────────────────────────────────


class StateLock:
    """Exclusive ``flock`` on ``{state_dir}/aund.lock`` holding the owner's pid.

    The kernel drops the lock when the process dies (SIGKILL included) or closes the file; the
    file itself is never deleted. The fd is O_CLOEXEC, so exec'd children do not keep the lock
    (a child forked *without* exec would). Use as a context manager or ``acquire``/``release``.
    Errors: StateDirLocked(holder_pid, state_dir).
    """

    def __init__(self, state_dir: Path | str) -> None:
        self.state_dir = Path(state_dir)
        self.path = self.state_dir / "aund.lock"
        self._fd: int | None = None

    @property
    def locked(self) -> bool:
        return self._fd is not None

    def acquire(self) -> StateLock:
        if self._fd is not None:
            return self
        if not self.state_dir.exists():
            self.state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            os.chmod(self.state_dir, 0o700)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_pid(fd)
            os.close(fd)
            raise StateDirLocked(holder, self.state_dir) from None
        except BaseException:
            os.close(fd)
            raise
        os.fchmod(fd, 0o600)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode("ascii"), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)  # drops the flock; the file (and its stale pid) stays

    def __enter__(self) -> StateLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def _read_pid(fd: int) -> int | None:
    try:
        text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None
