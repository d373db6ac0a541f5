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
    {state_dir}/AIDs/{aid}/prekeys.d/{n:08}.enc.json        the n-th E2EE prekey ever made (create-once;
                                               older aunds kept them all in prekeys.enc.json, still read)
    {state_dir}/AIDs/{aid}/group_prekeys.d/{n:08}.enc.json  likewise, the group prekeys

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

Pieces: durable writes are aund.identity.files, the seed and the sealed-file format
aund.identity.sealed (``Sealer``), the AID/key/certificate checks aund.identity.keys, reading an
SDK identity aund.identity.fastaun, and the one-daemon lock aund.identity.lock; this module is
the layout and its rules. Group identities live in the same layout under ``AIDs/_groups/``
(``IdentityStore.groups()``).

Blocking I/O: everything except ``ensure`` is synchronous; the daemon calls it through
``trio.to_thread.run_sync``. Methods are thread-safe (one lock serialises writes).
"""
from __future__ import annotations

import base64
import binascii
import contextlib
import copy
import errno
import functools
import hashlib
import json
import os
import re
import threading
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from aund.identity import pki
from aund.identity.errors import (
    CertKeyMismatch,
    CorruptIdentity,
    IdentityConflict,
    IdentityNotFound,
    SeedMissing,
)
from aund.identity.files import (
    atomic_write, b64, create_once, create_once_raw, fsync_dir, json_bytes, present, unb64, write_failed,
)
from aund.identity.keys import AID_RE, check_aid, check_cert, check_p256, spki
from aund.identity.lock import StateLock
from aund.identity.sealed import SEED_CREDENTIAL, SEED_ENV, Sealer, load_seed
from client_stub.errors import StorageError

if TYPE_CHECKING:
    from aund.identity.fastaun import FastaunIdentity

__all__ = [
    "Identity", "IdentityStore", "StateLock", "atomic_write", "create_once", "load_seed", "write_failed",
    "SEED_ENV", "SEED_CREDENTIAL",
]

PURPOSE_KEY = "identity/private_key"
PURPOSE_TOKENS = "tokens"
PURPOSE_PREKEYS = "e2ee/prekeys"
PURPOSE_GROUP_PREKEYS = "e2ee/group_prekeys"

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

_DEVICE_ID_RE = re.compile(r"^[A-Za-z0-9._-]{1,128}$")

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
        self.sealer = Sealer(self.state_dir, seed)  # the seed, its KDF and the encrypted-file format
        self._lock = threading.RLock()  # serialises writes
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
            fsync_dir(d.parent)

    def _aid_dir(self, aid: str) -> Path:
        return self.aids_dir / check_aid(aid)

    def _pending_dir(self, aid: str) -> Path:
        return self.aids_dir / PENDING_DIR / check_aid(aid)

    def _rel(self, path: Path) -> str:
        try:
            return str(path.relative_to(self.state_dir))
        except ValueError:
            return str(path)

    def _device_id(self) -> str:
        path = self.state_dir / ".device_id"
        if not path.exists():
            create_once_raw(path, str(uuid.uuid4()).encode("ascii"))
        text = path.read_text("utf-8").strip()
        if not _DEVICE_ID_RE.fullmatch(text):
            raise CorruptIdentity(f"{path} does not hold a valid device id", data={"path": str(path)})
        return text

    def _read_key(self, path: Path, aid: str) -> ec.EllipticCurvePrivateKey:
        plaintext, record = self.sealer.open(path, PURPOSE_KEY, aid)
        try:
            key = serialization.load_der_private_key(plaintext, password=None)
        except (ValueError, TypeError) as exc:
            raise CorruptIdentity(f"{self._rel(path)} holds no usable private key: {exc}",
                                  data={"path": str(path)}) from None
        key = check_p256(key, self._rel(path))
        if pki.public_key_b64(key.public_key()) != record["public_key"]:
            raise CorruptIdentity(f"{self._rel(path)}: public_key does not match the private key",
                                  data={"path": str(path)})
        return key

    def _stored_public_key(self, path: Path, aid: str) -> bytes:
        """SPKI DER declared by a key file (authenticated on every decrypt via the aad)."""
        record = self.sealer.read_envelope(path, PURPOSE_KEY, aid)
        return unb64(record["public_key"], "public_key", path)

    def _key_record(self, aid: str, key: ec.EllipticCurvePrivateKey) -> bytes:
        der = key.private_bytes(serialization.Encoding.DER, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
        return self.sealer.seal(PURPOSE_KEY, aid, der, pki.public_key_b64(key.public_key()))

    # ── certificates ──

    def _write_cert(self, aid_dir: Path, cert: x509.Certificate) -> None:
        """History first (create-once), then the active cert.pem; the previous cert stays in certs/."""
        history = aid_dir / CERTS_DIR
        self._mkdirs(history)
        active = aid_dir / CERT_FILE
        if active.exists():  # make sure what we replace is in the history (e.g. after an import)
            with contextlib.suppress(pki.PKIError):
                old = pki.load_cert_pem(active.read_bytes())
                if not (history / _history_name(old)).exists():
                    create_once_raw(history / _history_name(old), active.read_bytes())
        pem = pki.cert_pem(cert).encode("ascii")
        if not (history / _history_name(cert)).exists():
            create_once_raw(history / _history_name(cert), pem)
        if not active.exists() or active.read_bytes() != pem:
            atomic_write(active, pem)

    # ── public API: reading ──

    def exists(self, aid: str) -> bool:
        """Errors: StorageError if the AID's directory cannot be read (e.g. owned by another user)."""
        return present(self._aid_dir(aid) / KEY_FILE)

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
            if not AID_RE.fullmatch(p.name):
                continue
            try:
                if present(p / KEY_FILE):
                    found.append(p.name)
            except StorageError as exc:
                unreadable[p.name] = exc.message
        self.unreadable = unreadable
        return sorted(found)

    def _require(self, aid: str) -> Path:
        d = self._aid_dir(aid)
        if not present(d / KEY_FILE):
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
            cert = check_cert(aid, spki(key), pem)
        except CertKeyMismatch as exc:
            cert = self._newest_cert_for(d, aid, spki(key))  # a rekey stopped between key and cert
            if cert is None:
                raise CertKeyMismatch(f"{self._rel(cert_path)}: {exc.message}", data=exc.data) from None
        return Identity(aid=aid, private_key=key, cert=cert, cert_pem=pki.cert_pem(cert),
                        device_id=self.device_id, cert_fingerprint=pki.cert_fingerprint(cert))

    def _newest_cert_for(self, aid_dir: Path, aid: str, spki: bytes) -> x509.Certificate | None:
        """The newest certificate in the history that certifies `spki` for `aid`, or None."""
        found = []
        for path in sorted((aid_dir / CERTS_DIR).glob("sha256_*.pem")) if (aid_dir / CERTS_DIR).is_dir() else []:
            with contextlib.suppress(CertKeyMismatch, OSError):
                found.append(check_cert(aid, spki, path.read_bytes()))
        return max(found, key=lambda c: c.not_valid_before_utc, default=None)

    def past_keys(self, aid: str) -> list[ec.EllipticCurvePrivateKey]:
        """Every key ``aid`` had before the current one (a rekey keeps them: late messages wrapped
        to an old identity key must still open), oldest file name first. Errors as ``load``."""
        d = self._require(aid)
        current = self._stored_public_key(d / KEY_FILE, aid)
        keys = []
        for path in sorted((d / KEYS_DIR).glob("sha256_*.enc.json")) if (d / KEYS_DIR).is_dir() else []:
            key = self._read_key(path, aid)
            if spki(key) != current:
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
            atomic_write(d / TOKENS_FILE, self.sealer.seal(PURPOSE_TOKENS, aid, plaintext))

    def load_prekeys(self, aid: str) -> list[dict[str, Any]]:
        """Every E2EE signed prekey ever made for ``aid`` on this device (oldest first; [] if none).

        Each record: spk_id, private_pem, timestamp, signature, created_at (and uploaded_at when
        published). Errors as ``load``."""
        return self._load_key_list(aid, PREKEYS_FILE, PURPOSE_PREKEYS)

    def save_prekeys(self, aid: str, records: list[Mapping[str, Any]]) -> None:
        """Store the records of ``records`` not stored yet (appended, in order); refuses a list that
        lacks a stored prekey: old prekeys are kept so that late messages wrapped to them still
        decrypt (aund never deletes key material)."""
        self._save_key_list(aid, PREKEYS_FILE, PURPOSE_PREKEYS, records)

    def append_prekey(self, aid: str, record: Mapping[str, Any]) -> None:
        """Add one prekey record, durably (one new file: nothing already stored is rewritten)."""
        self._append_key(aid, PREKEYS_FILE, PURPOSE_PREKEYS, record)

    def load_group_prekeys(self, aid: str) -> list[dict[str, Any]]:
        """Every group prekey (``group.v2.put_group_pk``) ever made for ``aid``, oldest first.

        Records as ``load_prekeys`` plus ``group_id``. Kept apart from the P2P prekeys, whose list
        order names the current P2P prekey."""
        return self._load_key_list(aid, GROUP_PREKEYS_FILE, PURPOSE_GROUP_PREKEYS)

    def save_group_prekeys(self, aid: str, records: list[Mapping[str, Any]]) -> None:
        """Like ``save_prekeys``, for the group prekeys."""
        self._save_key_list(aid, GROUP_PREKEYS_FILE, PURPOSE_GROUP_PREKEYS, records)

    def append_group_prekey(self, aid: str, record: Mapping[str, Any]) -> None:
        """Add one group prekey record (one new file)."""
        self._append_key(aid, GROUP_PREKEYS_FILE, PURPOSE_GROUP_PREKEYS, record)

    # A prekey list is the sealed list file older aunds rewrote whole on each new prekey (read,
    # never written again), then one create-once sealed file per record in `{name}.d/`, named by
    # its place in the list: a rotation writes one small file, whatever the list's length.
    @staticmethod
    def _records_dir(d: Path, name: str) -> Path:
        return d / (name.removesuffix(".enc.json") + ".d")

    def _load_key_list(self, aid: str, name: str, purpose: str) -> list[dict[str, Any]]:
        d = self._require(aid)
        records = self._load_sealed_json(d / name, purpose, aid, list, [])
        folder = self._records_dir(d, name)
        if folder.is_dir():
            for path in sorted(folder.glob("*.enc.json")):
                records.append(self._load_sealed_json(path, purpose, aid, dict, {}))
        return records

    def _append_key(self, aid: str, name: str, purpose: str, record: Mapping[str, Any]) -> None:
        data = self.sealer.seal(purpose, aid, json.dumps(dict(record), sort_keys=True).encode("utf-8"))
        with self._lock:
            folder = self._records_dir(self._require(aid), name)
            self._mkdirs(folder)
            place = len(list(folder.glob("*.enc.json")))
            while not create_once_raw(folder / f"{place:08d}.enc.json", data):
                place += 1

    def _save_key_list(self, aid: str, name: str, purpose: str, records: list[Mapping[str, Any]]) -> None:
        with self._lock:
            stored = {r.get("spk_id") for r in self._load_key_list(aid, name, purpose)}
            if not stored <= {r.get("spk_id") for r in records}:
                raise ValueError(f"saving {name} would drop a prekey: prekeys are never deleted")
            for record in records:
                if record.get("spk_id") not in stored:
                    self._append_key(aid, name, purpose, record)
                    stored.add(record.get("spk_id"))

    def _load_sealed_json(self, path: Path, purpose: str, aid: str, kind: type, missing: Any) -> Any:
        """The JSON value (of type `kind`) sealed in `path`, or `missing` if there is no file.
        Errors: SeedMismatch, CorruptIdentity naming the file."""
        try:
            plaintext, _ = self.sealer.open(path, purpose, aid)
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

    def derive_key(self, purpose: str) -> bytes:
        """A 32-byte key for `purpose` derived from the store's master key (e.g. the inbox cipher).
        Raises SeedMismatch if the seed is wrong for this state dir."""
        return self.sealer.derive_key(purpose)

    def verify_seed(self) -> None:
        """Raise SeedMismatch now if the seed is not the one this state dir was set up with, or
        CorruptIdentity if ``.kdf.json`` is gone from a state dir that holds encrypted data."""
        self.sealer.verify_seed()

    def save_meta(self, aid: str, meta: Mapping[str, Any]) -> None:
        """Replace meta.json of ``aid`` (JSON object) atomically."""
        data = json_bytes(dict(meta))
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
            cert = check_cert(aid, self._stored_public_key(d / KEY_FILE, aid), cert_pem)
            self._write_cert(d, cert)
            return pki.cert_fingerprint(cert)

    def _archive_key(self, d: Path, aid: str) -> None:
        """Copy the active key file into ``keys/`` (create-once) before anything replaces it."""
        history = d / KEYS_DIR
        self._mkdirs(history)
        name = _key_history_name(self._stored_public_key(d / KEY_FILE, aid))
        if not (history / name).exists():
            create_once_raw(history / name, (d / KEY_FILE).read_bytes())

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
            if not create_once_raw(path, self._key_record(aid, key)):
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
            cert = check_cert(aid, spki(key), cert_pem)
            pending = d / KEYS_DIR / REKEY_PENDING
            if not pending.exists() or self._stored_public_key(pending, aid) != spki(key):
                if self._stored_public_key(d / KEY_FILE, aid) == spki(key):  # done before
                    self._write_cert(d, cert)
                    return pki.cert_fingerprint(cert)
                raise IdentityConflict(f"the pending rekey of {aid} is not for this key", data={"aid": aid})
            self._archive_key(d, aid)
            history = d / CERTS_DIR
            self._mkdirs(history)
            if not (history / _history_name(cert)).exists():  # the new cert first: load can find it
                create_once_raw(history / _history_name(cert), pki.cert_pem(cert).encode("ascii"))
            record = pending.read_bytes()
            target = d / KEYS_DIR / _key_history_name(spki(key))
            if not target.exists():
                os.rename(pending, target)  # renamed, never deleted
                fsync_dir(target.parent)
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
            if not create_once_raw(path, record):
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
            fsync_dir(parent)
            fsync_dir(pdir.parent)
            return target

    def promote(self, aid: str, key: ec.EllipticCurvePrivateKey, cert_pem: str | bytes,
                *, meta: Mapping[str, Any] | None = None) -> None:
        """Finish a registration: check the cert against ``key``, then move the pending dir into place.

        Errors: CertKeyMismatch (cert is for another key or CN; the pending key is kept),
        IdentityNotFound (no pending key), IdentityConflict (another key is pending or stored).
        Idempotent once done (same key): only the cert is updated.
        """
        with self._lock:
            cert = check_cert(aid, spki(key), cert_pem)
            target = self._aid_dir(aid)
            if (target / KEY_FILE).exists():
                if self._stored_public_key(target / KEY_FILE, aid) != spki(key):
                    raise IdentityConflict(f"{aid} is already in the store with another key", data={"aid": aid})
                self._write_cert(target, cert)
                return
            pdir = self._pending_dir(aid)
            if not (pdir / KEY_FILE).exists():
                raise IdentityNotFound(f"no pending registration of {aid} (call create_pending first)",
                                       data={"aid": aid})
            if self._stored_public_key(pdir / KEY_FILE, aid) != spki(key):
                raise IdentityConflict(f"the pending key of {aid} is not the key being promoted", data={"aid": aid})
            self._write_cert(pdir, cert)
            full = {"version": 1, "aid": aid, "created_at": time.time(), **dict(meta or {})}
            atomic_write(pdir / META_FILE, json_bytes(full))
            self._move_into_place(pdir, target)

    def _move_into_place(self, pdir: Path, target: Path) -> None:
        try:
            os.rename(pdir, target)  # atomic; replaces only an empty directory
        except OSError as exc:
            if exc.errno in (errno.ENOTEMPTY, errno.EEXIST):
                raise CorruptIdentity(f"{self._rel(target)} exists without {KEY_FILE}; move it aside",
                                      data={"path": str(target)}) from None
            raise
        fsync_dir(target.parent)
        fsync_dir(pdir.parent)

    async def ensure(self, aid: str, register: Callable[[str, ec.EllipticCurvePublicKey], Awaitable[str]],
                     *, meta: Mapping[str, Any] | None = None) -> Identity:
        """Load ``aid``; only if absent: create_pending, ``await register(aid, public_key)`` -> cert PEM,
        promote (with ``meta``); then load again. Concurrent calls for one AID register once.

        Must run under trio; file work runs in worker threads. If ``register`` fails the pending
        key is kept and the next call registers the same key again.
        """
        import trio

        check_aid(aid)
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
        from aund.identity.fastaun import read_fastaun

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
            atomic_write(pdir / META_FILE, json_bytes(full))
            self._move_into_place(pdir, target)
        return self.load(aid)


    def _stage_import(self, aid: str, key: ec.EllipticCurvePrivateKey) -> tuple[Path, Path | None]:
        """(the AID's directory, its pending directory holding `key` for an import), or (dir, None)
        when the store already holds the AID with this key. Under the lock. Errors:
        IdentityConflict (the AID is held, or pending, with another key)."""
        target = self._aid_dir(aid)
        if (target / KEY_FILE).exists():
            if self._stored_public_key(target / KEY_FILE, aid) != spki(key):
                raise IdentityConflict(f"{aid} is already in aund with a different key; not importing",
                                       data={"aid": aid})
            return target, None
        pdir = self._pending_dir(aid)
        pkey = pdir / KEY_FILE
        if pkey.exists():
            if self._stored_public_key(pkey, aid) != spki(key):
                raise IdentityConflict(f"a registration of {aid} with another key is pending in aund",
                                       data={"aid": aid})
        else:
            record = self._key_record(aid, key)
            self._mkdirs(pdir)
            create_once_raw(pkey, record)
        return target, pdir

    def _keep_certs(self, directory: Path, certs: Iterable[x509.Certificate]) -> None:
        """Each of `certs` in `directory`'s certificate history, once (never one written over)."""
        history = directory / CERTS_DIR
        self._mkdirs(history)
        for old in certs:
            if not (history / _history_name(old)).exists():
                create_once_raw(history / _history_name(old), pki.cert_pem(old).encode("ascii"))

    # ── moving an identity to another aund (aund.identity.bundle) ──

    def export_content(self, aid: str) -> dict[str, Any]:
        """What a bundle carries of ``aid``, JSON-safe: the key and every past key (PKCS#8 DER, b64),
        the active and every past certificate (PEM), the prekey lists and meta.json. Never tokens.
        Reads only (each file is replaced atomically, so a copy taken while the daemon runs is whole).
        Errors as ``load``."""
        identity = self.load(aid)
        d = self._aid_dir(aid)

        def der(key: ec.EllipticCurvePrivateKey) -> str:
            return b64(key.private_bytes(serialization.Encoding.DER, serialization.PrivateFormat.PKCS8,
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
        aid = check_aid(str(content.get("aid", "")))
        where = f"the bundle of {aid}"
        try:
            key = check_p256(serialization.load_der_private_key(base64.b64decode(content["key"]), None), where)
            past = [check_p256(serialization.load_der_private_key(base64.b64decode(k), None), where)
                    for k in content.get("past_keys") or []]
            cert = check_cert(aid, spki(key), content["cert"])
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
                atomic_write(pdir / META_FILE, json_bytes(full))
                self._move_into_place(pdir, target)
            self._keep_certs(target, [*older, cert])
            if past:
                self._mkdirs(target / KEYS_DIR)
            for old_key in past:
                name = target / KEYS_DIR / _key_history_name(spki(old_key))
                if not name.exists():
                    create_once_raw(name, self._key_record(aid, old_key))
            for loader, saver, field_name in ((self.load_prekeys, self.save_prekeys, "prekeys"),
                                              (self.load_group_prekeys, self.save_group_prekeys, "group_prekeys")):
                theirs = [r for r in content.get(field_name) or [] if isinstance(r, dict)]
                ours = loader(aid)
                known = {r.get("spk_id") for r in ours}
                added = [r for r in theirs if r.get("spk_id") not in known]
                if added:  # appended: the list's last entry stays this store's current prekey if it had one
                    saver(aid, ours + added if ours else theirs)
        return self.load(aid)


def __getattr__(name: str) -> Any:  # the SDK import lives in aund.identity.fastaun (it imports this module's checks)
    if name in ("FastaunIdentity", "read_fastaun"):
        from aund.identity import fastaun
        return getattr(fastaun, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
