"""Unit tests of aund.identity.store: the AID store on disk, the seed, and the state-dir lock.

Real files in tmp_path and real processes (a crash is a SIGKILLed child, the second daemon is a
child that tries the lock, the fastaun identity is made by fastaun's own code in a child).
The only fake is `FakeCA`, which stands in for the gateway's answer to auth.create_aid.
"""
from __future__ import annotations

import base64
import datetime
import hashlib
import json
import os
import signal
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import trio
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.x509.oid import NameOID

from aund.errors import StorageError
from aund.identity import files as files_mod, pki, store as store_mod
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
from aund.identity.store import IdentityStore, StateLock, atomic_write, load_seed
from client_stub.errors import ClientError, ResourceAlreadyExistError, ResourceNotExistError

ROOT = Path(__file__).resolve().parents[2]
SEED = b"correct horse battery staple"
ALICE = "alice.aid.test"


class FakeCA:
    """Issues the cert the gateway would return from auth.create_aid, from a throwaway local CA."""

    def __init__(self) -> None:
        self.key = pki.generate_key()
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "aund test CA")])
        self.name = name
        now = datetime.datetime.now(datetime.timezone.utc)
        self.cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
                     .public_key(self.key.public_key()).serial_number(x509.random_serial_number())
                     .not_valid_before(now - datetime.timedelta(hours=1))
                     .not_valid_after(now + datetime.timedelta(days=30))
                     .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
                     .sign(self.key, hashes.SHA256()))
        self.calls: list[tuple[str, str]] = []
        self.fail_next = 0

    def issue(self, aid: str, public_key) -> str:
        now = datetime.datetime.now(datetime.timezone.utc)
        cert = (x509.CertificateBuilder()
                .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, aid)]))
                .issuer_name(self.name).public_key(public_key).serial_number(x509.random_serial_number())
                .not_valid_before(now - datetime.timedelta(minutes=5))
                .not_valid_after(now + datetime.timedelta(days=1))
                .sign(self.key, hashes.SHA256()))
        return pki.cert_pem(cert)

    async def register(self, aid: str, public_key) -> str:
        self.calls.append((aid, pki.public_key_b64(public_key)))
        await trio.sleep(0)  # a real checkpoint, so concurrent ensure() calls really interleave
        if self.fail_next:
            self.fail_next -= 1
            raise ConnectionError("gateway went away")
        return self.issue(aid, public_key)


def snapshot(root: Path) -> dict[str, tuple[str, int]]:
    """Every file and directory under root: relative path -> (sha256 of content or 'dir', mode)."""
    out = {}
    for path in sorted(root.rglob("*")):
        mode = stat.S_IMODE(path.lstat().st_mode)
        digest = "dir" if path.is_dir() else hashlib.sha256(path.read_bytes()).hexdigest()
        out[str(path.relative_to(root))] = (digest, mode)
    return out


def run_child(code: str, *args: str, timeout: float = 30.0) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code), *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def state(tmp_path):
    return tmp_path / "state"


@pytest.fixture
def ca():
    return FakeCA()


async def make_alice(state: Path, ca: FakeCA) -> tuple[IdentityStore, store_mod.Identity]:
    st = IdentityStore(state, SEED)
    ident = await st.ensure(ALICE, ca.register, meta={"gateway_url": "ws://127.0.0.1:1/aun"})
    return st, ident


# ── layout and modes ─────────────────────────────────────────────────────────


async def test_every_file_is_0600_and_every_dir_0700_even_with_umask_0(state, ca):
    old = os.umask(0)  # modes must come from the code, not from a friendly umask
    try:
        st, ident = await make_alice(state, ca)
        st.save_tokens(ALICE, {"access_token": "a", "refresh_token": "r", "access_token_expires_at": 1.0})
        st.update_meta(ALICE, note="x")
        st.save_cert(ALICE, ca.issue(ALICE, ident.public_key))
        with StateLock(state):
            pass
    finally:
        os.umask(old)
    snap = snapshot(state)
    expected = {".device_id", ".kdf.json", "aund.lock", "AIDs", "AIDs/_pending", f"AIDs/{ALICE}",
                f"AIDs/{ALICE}/key.enc.json", f"AIDs/{ALICE}/cert.pem", f"AIDs/{ALICE}/certs",
                f"AIDs/{ALICE}/tokens.enc.json", f"AIDs/{ALICE}/meta.json"}
    assert expected <= set(snap)
    assert len([p for p in snap if p.startswith(f"AIDs/{ALICE}/certs/sha256_")]) == 2
    for rel, (digest, mode) in snap.items():
        assert mode == (0o700 if digest == "dir" else 0o600), (rel, oct(mode))
    assert stat.S_IMODE(state.stat().st_mode) == 0o700


async def test_key_and_tokens_are_encrypted_and_roundtrip(state, ca):
    st, ident = await make_alice(state, ca)
    tokens = {"access_token": "acc-SECRET", "refresh_token": "ref-SECRET", "access_token_expires_at": 1.5e9}
    st.save_tokens(ALICE, tokens)
    d = state / "AIDs" / ALICE
    key_doc = json.loads((d / "key.enc.json").read_text())
    assert key_doc["format"] == "aund.enc" and key_doc["version"] == 1
    assert key_doc["purpose"] == "identity/private_key" and key_doc["aid"] == ALICE
    assert key_doc["kdf"]["name"] == "scrypt" and key_doc["public_key"] == ident.public_key_b64
    der = ident.private_key.private_bytes(store_mod.serialization.Encoding.DER,
                                          store_mod.serialization.PrivateFormat.PKCS8,
                                          store_mod.serialization.NoEncryption())
    raw = b"".join(p.read_bytes() for p in state.rglob("*") if p.is_file())
    assert der not in raw and base64.b64encode(der) not in raw
    assert b"SECRET" not in raw
    assert SEED not in raw

    again = IdentityStore(state, SEED)  # a fresh process-like instance (no cached master key)
    assert again.load_tokens(ALICE) == tokens
    loaded = again.load(ALICE)
    assert loaded.public_key_b64 == ident.public_key_b64
    assert loaded.cert_fingerprint == pki.cert_fingerprint(loaded.cert) == ident.cert_fingerprint
    assert loaded.device_id == (state / ".device_id").read_text() == st.device_id
    assert again.list() == [ALICE] and again.exists(ALICE) and not again.exists("bob.aid.test")
    assert again.load_meta(ALICE)["gateway_url"] == "ws://127.0.0.1:1/aun"
    assert "PRIVATE" not in repr(loaded) and "private_key" not in repr(loaded)
    assert SEED.decode() not in repr(again)


def test_missing_and_invalid_aids(state):
    st = IdentityStore(state, SEED)
    with pytest.raises(IdentityNotFound) as err:
        st.load("nobody.aid.test")
    assert isinstance(err.value, ResourceNotExistError) and "nobody.aid.test" in str(err.value)
    with pytest.raises(IdentityNotFound):
        st.load_tokens("nobody.aid.test")
    for bad in ("../etc.passwd", "_pending", "Alice.aid.test", "noissuer", "a/b.test", ".hidden.test"):
        with pytest.raises(InvalidIdentity):
            st.load(bad)
    assert st.list() == []


# ── crash safety ─────────────────────────────────────────────────────────────


@pytest.mark.parametrize("stage", ["after_write", "before_replace"])
async def test_failure_between_write_and_rename_keeps_old_file(state, ca, monkeypatch, stage):
    st, ident = await make_alice(state, ca)
    st.save_tokens(ALICE, {"refresh_token": "old"})
    cert_before = (state / "AIDs" / ALICE / "cert.pem").read_bytes()
    before = snapshot(state)

    def boom(at: str, path: Path) -> None:
        if at == stage:
            raise OSError(28, "No space left on device")

    monkeypatch.setattr(files_mod, "FAULT_HOOK", boom)
    with pytest.raises(StorageError, match="No space left on device.*disk is full"):
        st.save_tokens(ALICE, {"refresh_token": "new"})
    with pytest.raises(StorageError, match="No space"):
        atomic_write(state / "AIDs" / ALICE / "cert.pem", b"garbage")
    monkeypatch.setattr(files_mod, "FAULT_HOOK", None)

    assert snapshot(state) == before  # old files intact, no temp file left behind
    assert st.load_tokens(ALICE) == {"refresh_token": "old"}
    assert (state / "AIDs" / ALICE / "cert.pem").read_bytes() == cert_before
    assert IdentityStore(state, SEED).load(ALICE).cert_fingerprint == ident.cert_fingerprint


async def test_sigkill_mid_write_leaves_old_tokens_and_cert(state, ca):
    st, ident = await make_alice(state, ca)
    st.save_tokens(ALICE, {"refresh_token": "old"})
    new_cert = ca.issue(ALICE, ident.public_key)
    d = state / "AIDs" / ALICE
    key_before, cert_before = (d / "key.enc.json").read_bytes(), (d / "cert.pem").read_bytes()
    child = """
        import os, signal, sys
        from pathlib import Path
        from aund.identity import files, store
        def die(stage, path):
            if stage == "before_replace" and path.name == sys.argv[2]:
                os.kill(os.getpid(), signal.SIGKILL)  # a crash with the new bytes fsynced but not renamed
        files.FAULT_HOOK = die
        st = store.IdentityStore(Path(sys.argv[1]), b"correct horse battery staple")
        if sys.argv[2] == "tokens.enc.json":
            st.save_tokens("alice.aid.test", {"refresh_token": "new"})
        else:
            st.save_cert("alice.aid.test", Path(sys.argv[3]).read_text())
        print("not killed")
    """
    cert_file = state.parent / "new.pem"
    cert_file.write_text(new_cert)
    for target in ("tokens.enc.json", "cert.pem"):
        done = run_child(child, str(state), target, str(cert_file))
        assert done.returncode == -signal.SIGKILL, (done.returncode, done.stdout, done.stderr[-2000:])
    strays = sorted(p.name for p in d.iterdir() if ".tmp-" in p.name)
    assert len(strays) == 2 and all(p.startswith((".tokens.enc.json.tmp-", ".cert.pem.tmp-")) for p in strays)
    fresh = IdentityStore(state, SEED)
    assert fresh.load_tokens(ALICE) == {"refresh_token": "old"}
    assert (d / "cert.pem").read_bytes() == cert_before and (d / "key.enc.json").read_bytes() == key_before
    assert fresh.load(ALICE).cert_fingerprint == ident.cert_fingerprint
    assert fresh.list() == [ALICE]
    fresh.save_cert(ALICE, new_cert)  # and the store keeps working after the crash
    assert fresh.load(ALICE).cert_fingerprint == pki.cert_fingerprint(pki.load_cert_pem(new_cert))


# ── the seed ─────────────────────────────────────────────────────────────────


async def test_wrong_seed_is_a_clear_error_and_changes_nothing(state, ca):
    st, _ = await make_alice(state, ca)
    st.save_tokens(ALICE, {"refresh_token": "r"})
    before = snapshot(state)

    wrong = IdentityStore(state, b"not the seed")
    with pytest.raises(SeedMismatch) as err:
        wrong.load(ALICE)
    msg = str(err.value)
    assert f"the encryption seed does not decrypt AIDs/{ALICE}/key.enc.json" in msg
    assert "AUND_ENCRYPTION_SEED" in msg and "not the seed" not in msg
    assert isinstance(err.value, ClientError)
    with pytest.raises(SeedMismatch, match=f"AIDs/{ALICE}/tokens.enc.json"):
        wrong.load_tokens(ALICE)
    with pytest.raises(SeedMismatch, match=r"\.kdf\.json"):
        wrong.save_tokens(ALICE, {"refresh_token": "x"})
    with pytest.raises(SeedMismatch):
        wrong.verify_seed()
    bob_ca = FakeCA()
    with pytest.raises(SeedMismatch):
        await wrong.ensure("bob.aid.test", bob_ca.register)
    assert bob_ca.calls == []  # never registers a key it could not store
    assert snapshot(state) == before
    IdentityStore(state, SEED).verify_seed()  # the right seed still passes


async def test_damaged_or_moved_files_are_corrupt_not_seed_errors(state, ca):
    st, _ = await make_alice(state, ca)
    await st.ensure("bob.aid.test", ca.register)
    d = state / "AIDs" / ALICE
    doc = json.loads((d / "key.enc.json").read_text())
    ct = bytearray(base64.b64decode(doc["ciphertext"]))
    ct[5] ^= 1
    atomic_write(d / "key.enc.json", json.dumps({**doc, "ciphertext": base64.b64encode(ct).decode()}).encode())
    with pytest.raises(CorruptIdentity, match=f"AIDs/{ALICE}/key.enc.json fails authentication"):
        st.load(ALICE)
    bob_key = json.loads((state / "AIDs" / "bob.aid.test" / "key.enc.json").read_text())
    atomic_write(d / "key.enc.json", json.dumps({**bob_key, "aid": ALICE}).encode())  # bob's key as alice's
    with pytest.raises(CorruptIdentity, match="fails authentication"):
        st.load(ALICE)
    (d / "key.enc.json").write_text("{not json")
    with pytest.raises(CorruptIdentity, match=f"AIDs/{ALICE}/key.enc.json is unreadable") as err:
        st.load(ALICE)
    assert err.value.retryable is False and err.value.data["path"].endswith("key.enc.json")


def test_load_seed_sources_and_missing_message(tmp_path):
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "encryption_seed").write_bytes(b"from-credential\n")
    assert load_seed({"AUND_ENCRYPTION_SEED": "from-env"}) == b"from-env"
    assert load_seed({"CREDENTIALS_DIRECTORY": str(creds)}) == b"from-credential"
    assert load_seed({"AUND_ENCRYPTION_SEED": "from-env", "CREDENTIALS_DIRECTORY": str(creds)}) == b"from-env"
    assert load_seed({"AUND_ENCRYPTION_SEED": "", "CREDENTIALS_DIRECTORY": str(creds)}) == b"from-credential"

    with pytest.raises(SeedMissing) as err:
        load_seed({})
    msg = str(err.value)
    assert "AUND_ENCRYPTION_SEED" in msg and "LoadCredential=encryption_seed" in msg
    assert "$CREDENTIALS_DIRECTORY is not set" in msg and "never read from the config file" in msg
    (creds / "encryption_seed").write_bytes(b"\n")
    with pytest.raises(SeedMissing, match=r"encryption_seed is empty"):
        load_seed({"CREDENTIALS_DIRECTORY": str(creds)})
    with pytest.raises(SeedMissing, match=r"cannot read .*nowhere/encryption_seed"):
        load_seed({"CREDENTIALS_DIRECTORY": str(tmp_path / "nowhere")})
    with pytest.raises(SeedMissing):
        IdentityStore(tmp_path / "state", b"")


# ── registration ─────────────────────────────────────────────────────────────


async def test_ensure_registers_once_and_is_idempotent(state, ca):
    st = IdentityStore(state, SEED)
    results = []

    async def one():
        results.append(await st.ensure(ALICE, ca.register))

    async with trio.open_nursery() as nursery:
        for _ in range(4):
            nursery.start_soon(one)
    results.append(await st.ensure(ALICE, ca.register))
    results.append(await IdentityStore(state, SEED).ensure(ALICE, ca.register))  # after a "restart"
    assert len(ca.calls) == 1 and ca.calls[0][0] == ALICE
    assert {r.cert_fingerprint for r in results} == {results[0].cert_fingerprint}
    assert {r.public_key_b64 for r in results} == {ca.calls[0][1]}
    assert not (state / "AIDs" / "_pending" / ALICE).exists()  # moved into place, not copied
    assert st.list() == [ALICE]
    meta = st.load_meta(ALICE)
    assert meta["aid"] == ALICE and meta["version"] == 1 and meta["created_at"] <= time.time()


async def test_failed_registration_keeps_the_key_and_retries_with_it(state, ca):
    st = IdentityStore(state, SEED)
    ca.fail_next = 1
    with pytest.raises(ConnectionError):
        await st.ensure(ALICE, ca.register)
    assert (state / "AIDs" / "_pending" / ALICE / "key.enc.json").exists()  # written before the RPC
    assert not st.exists(ALICE) and st.list() == []
    ident = await IdentityStore(state, SEED).ensure(ALICE, ca.register)
    assert len(ca.calls) == 2 and ca.calls[0][1] == ca.calls[1][1] == ident.public_key_b64
    with pytest.raises(IdentityConflict) as err:
        st.create_pending(ALICE)
    assert isinstance(err.value, ResourceAlreadyExistError)


async def test_cert_for_another_key_or_aid_is_refused(state, ca):
    st = IdentityStore(state, SEED)

    async def wrong_key(aid, public_key):
        return ca.issue(aid, pki.generate_key().public_key())

    with pytest.raises(CertKeyMismatch, match="public key is not the key"):
        await st.ensure(ALICE, wrong_key)
    assert not st.exists(ALICE) and (state / "AIDs" / "_pending" / ALICE / "key.enc.json").exists()
    key = st.create_pending(ALICE)
    with pytest.raises(CertKeyMismatch, match="is for 'mallory.aid.test'"):
        st.promote(ALICE, key, ca.issue("mallory.aid.test", key.public_key()))
    with pytest.raises(CertKeyMismatch, match="not a valid PEM"):
        st.promote(ALICE, key, "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n")
    st.promote(ALICE, key, ca.issue(ALICE, key.public_key()))
    ident = st.load(ALICE)
    cert_before = (state / "AIDs" / ALICE / "cert.pem").read_bytes()
    with pytest.raises(CertKeyMismatch):
        st.save_cert(ALICE, ca.issue(ALICE, pki.generate_key().public_key()))
    assert (state / "AIDs" / ALICE / "cert.pem").read_bytes() == cert_before
    assert st.load(ALICE).cert_fingerprint == ident.cert_fingerprint
    other = pki.generate_key()
    with pytest.raises(IdentityConflict, match="another key"):
        st.promote(ALICE, other, ca.issue(ALICE, other.public_key()))


async def test_nothing_is_ever_deleted(state, ca):
    st, ident = await make_alice(state, ca)
    d = state / "AIDs" / ALICE
    key_bytes = (d / "key.enc.json").read_bytes()
    seen = set(snapshot(state))
    issued = [ident.cert_fingerprint]
    for i in range(15):
        pem = ca.issue(ALICE, ident.public_key)
        assert st.save_cert(ALICE, pem) == pki.cert_fingerprint(pki.load_cert_pem(pem))
        issued.append(pki.cert_fingerprint(pki.load_cert_pem(pem)))
        st.save_tokens(ALICE, {"refresh_token": f"r{i}"})
        now = set(snapshot(state))
        assert seen <= now, seen - now
        seen = now
    history = sorted((d / "certs").iterdir())
    assert {"sha256:" + p.name[len("sha256_"):-len(".pem")] for p in history} == set(issued)
    for p in history:
        assert pki.cert_fingerprint(pki.load_cert_pem(p.read_bytes())) == "sha256:" + p.name[7:-4]
    assert (d / "key.enc.json").read_bytes() == key_bytes
    assert st.load(ALICE).cert_fingerprint == issued[-1]
    assert st.load_tokens(ALICE) == {"refresh_token": "r14"}


async def test_rekey_keeps_every_key_and_cert_and_survives_a_crash(state, ca, monkeypatch):
    st, ident = await make_alice(state, ca)
    seen = set(snapshot(state))
    pending = st.rekey_pending(ALICE)
    assert pki.spki_der(st.rekey_pending(ALICE).public_key()) == pki.spki_der(pending.public_key())  # idempotent
    assert st.load(ALICE).cert_fingerprint == ident.cert_fingerprint  # nothing active changed yet
    with pytest.raises(CertKeyMismatch):
        st.commit_rekey(ALICE, pending, ca.issue(ALICE, ident.public_key))  # a cert for the old key
    cert_pem = ca.issue(ALICE, pending.public_key())

    def crash(*args, **kwargs):  # the process dies after the key file, before cert.pem
        raise OSError(5, "simulated crash")

    monkeypatch.setattr(st, "_write_cert", crash)
    with pytest.raises(OSError):
        st.commit_rekey(ALICE, pending, cert_pem)
    monkeypatch.undo()
    repaired = st.load(ALICE)  # key.enc.json is the new key, cert.pem still the old cert: repaired from certs/
    assert pki.spki_der(repaired.public_key) == pki.spki_der(pending.public_key())
    assert repaired.cert_fingerprint == pki.cert_fingerprint(pki.load_cert_pem(cert_pem))
    assert st.commit_rekey(ALICE, pending, cert_pem) == repaired.cert_fingerprint  # finishing again is a no-op
    assert st.load(ALICE).cert_pem == pki.cert_pem(pki.load_cert_pem(cert_pem))
    past = st.past_keys(ALICE)
    assert [pki.spki_der(k.public_key()) for k in past] == [pki.spki_der(ident.public_key)]
    now = set(snapshot(state))
    assert seen <= now, seen - now  # nothing deleted
    d = state / "AIDs" / ALICE
    assert len(list((d / "keys").glob("sha256_*.enc.json"))) == 2
    assert not (d / "keys" / "rekey-pending.enc.json").exists()
    second = st.rekey_pending(ALICE)  # the next rekey makes a new key, not the committed one again
    assert pki.spki_der(second.public_key()) != pki.spki_der(pending.public_key())


# ── one daemon per state dir ─────────────────────────────────────────────────

TRY_LOCK = """
    import sys
    from aund.identity.store import StateLock
    from aund.identity.errors import StateDirLocked
    try:
        StateLock(sys.argv[1]).acquire()
    except StateDirLocked as exc:
        print(f"refused holder={exc.holder_pid}: {exc}")
        sys.exit(3)
    print("acquired")
"""


def test_state_lock_refuses_a_second_process(state):
    with StateLock(state) as lock:
        assert lock.locked and (state / "aund.lock").read_text().strip() == str(os.getpid())
        done = run_child(TRY_LOCK, str(state))
        assert done.returncode == 3, done.stderr[-2000:]
        assert f"refused holder={os.getpid()}: state dir {state} is in use by aund pid {os.getpid()}" in done.stdout
    assert not lock.locked and (state / "aund.lock").exists()
    done = run_child(TRY_LOCK, str(state))
    assert done.returncode == 0 and done.stdout.strip() == "acquired"


def test_state_lock_is_released_when_the_holder_is_sigkilled(state):
    holder = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent("""
            import sys
            from aund.identity.store import StateLock
            lock = StateLock(sys.argv[1]).acquire()
            print("locked", flush=True)
            sys.stdin.read()
        """), str(state)],
        cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(StateDirLocked) as err:
            StateLock(state).acquire()
        assert err.value.holder_pid == holder.pid and err.value.path == str(state)
        assert f"in use by aund pid {holder.pid}" in str(err.value)
        holder.kill()
        assert holder.wait(10) == -signal.SIGKILL
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait(10)
        holder.stdin.close()
        holder.stdout.close()
    with StateLock(state) as lock:  # the kernel released it with the dead process
        assert lock.locked and (state / "aund.lock").read_text().strip() == str(os.getpid())


# ── import from the official SDK ─────────────────────────────────────────────

FASTAUN_MAKER = """
    # Runs in its own process: fastaun (asyncio) is never imported into the test process.
    import datetime, json, sys
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.x509.oid import NameOID
    from aun_core import AIDStore
    from aun_core.crypto import CryptoProvider

    aun_path, aid, seed = sys.argv[1:4]
    ident = CryptoProvider().generate_identity()  # fastaun's own key generation
    key = serialization.load_pem_private_key(ident["private_key_pem"].encode(), password=None)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, aid)])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=1)).sign(key, hashes.SHA256()))
    store = AIDStore(aun_path=aun_path, encryption_seed=seed)
    made = store.import_group_identity(aid, private_key_pem=ident["private_key_pem"],
                                       public_key_der_b64=ident["public_key_der_b64"],
                                       cert_pem=cert.public_bytes(serialization.Encoding.PEM).decode())
    assert made.ok, made.error
    store._keystore.set_metadata_value(aid, "gateway_url", "ws://127.0.0.1:9/aun")
    loaded = store.load(aid)  # fastaun reads back its own key.json
    assert loaded.ok, loaded.error
    me = loaded.data["aid"]
    signed = me.sign(b"probe from fastaun")
    assert signed.ok, signed.error
    store.close()
    print(json.dumps({"public_key": me.public_key, "cert_fingerprint": me.cert_fingerprint,
                      "private_key_valid": me.is_private_key_valid(), "signature": signed.data["signature"]}))
"""


@pytest.fixture(scope="module")
def fastaun_identity(tmp_path_factory):
    aun_path = tmp_path_factory.mktemp("fastaun") / "aun"
    done = run_child(FASTAUN_MAKER, str(aun_path), ALICE, "fastaun-seed", timeout=60)
    assert done.returncode == 0, done.stderr[-3000:]
    made = json.loads([line for line in done.stdout.splitlines() if line.startswith("{")][-1])
    assert made["private_key_valid"] is True
    assert (aun_path / "AIDs" / ALICE / "private" / "key.json").exists()
    return aun_path, made


async def test_import_of_a_fastaun_identity(state, fastaun_identity, ca):
    aun_path, made = fastaun_identity
    fastaun_before = snapshot(aun_path)
    st = IdentityStore(state, SEED)

    with pytest.raises(SeedMismatch, match="fastaun seed does not decrypt"):
        st.import_fastaun(aun_path, ALICE, "wrong-seed")
    assert st.list() == [] and not (state / "AIDs" / "_pending" / ALICE).exists()
    with pytest.raises(IdentityNotFound):
        st.import_fastaun(aun_path, "bob.aid.test", "fastaun-seed")

    ident = st.import_fastaun(aun_path, ALICE, "fastaun-seed")
    assert ident.public_key_b64 == made["public_key"]
    assert ident.cert_fingerprint == made["cert_fingerprint"]
    # fastaun's signature verifies under the key aund decrypted: the same key pair
    assert pki.verify_signature(ident.public_key, base64.b64decode(made["signature"]), b"probe from fastaun")
    loaded = IdentityStore(state, SEED).load(ALICE)  # re-encrypted under aund's seed
    assert loaded.public_key_b64 == made["public_key"]
    meta = st.load_meta(ALICE)
    assert meta["gateway_url"] == "ws://127.0.0.1:9/aun"
    assert meta["imported_from"]["sdk"] == "fastaun" and meta["imported_from"]["aun_path"] == str(aun_path)
    assert "fastaun-seed" not in "".join(p.read_text() for p in state.rglob("*") if p.is_file())
    assert snapshot(aun_path) == fastaun_before  # fastaun's files are only read

    after = snapshot(state)
    assert st.import_fastaun(aun_path, ALICE, "fastaun-seed").public_key_b64 == made["public_key"]
    assert snapshot(state) == after  # idempotent

    other = IdentityStore(state.parent / "other", SEED)
    await other.ensure(ALICE, ca.register)  # same AID, different key
    with pytest.raises(IdentityConflict, match="different key"):
        other.import_fastaun(aun_path, ALICE, "fastaun-seed")
    assert other.load(ALICE).public_key_b64 != made["public_key"]


async def test_group_identities_live_apart_from_agents_and_are_never_deleted(state, ca):
    st, alice = await make_alice(state, ca)
    groups = st.groups()
    assert groups is st.groups() and groups.aids_dir == state / "AIDs" / "_groups"
    team = "team.aid.test"
    key = groups.create_pending(team)
    assert groups.create_pending(team).private_numbers() == key.private_numbers()  # a crash reuses the key
    groups.promote(team, key, ca.issue(team, key.public_key()), meta={"entity": "group", "owner_aid": ALICE})
    assert st.list() == [ALICE] and groups.list() == [team]  # never listed (nor connected) as an agent
    with pytest.raises(ResourceNotExistError):
        st.load(team)
    assert groups.load(team).private_key.private_numbers() == key.private_numbers()
    assert groups.load_meta(team)["owner_aid"] == ALICE
    # a renewal keeps the old key and certificate; the view shares the store's seed
    new = groups.rekey_pending(team)
    groups.commit_rekey(team, new, ca.issue(team, new.public_key()))
    assert [k.private_numbers() for k in groups.past_keys(team)] == [key.private_numbers()]
    assert len(list((state / "AIDs" / "_groups" / team / "certs").glob("*.pem"))) == 2
    again = IdentityStore(state, SEED).groups()
    assert again.load(team).private_key.private_numbers() == new.private_numbers()
    with pytest.raises(SeedMismatch):
        IdentityStore(state, b"not the seed").groups().load(team)


async def test_a_new_prekey_writes_one_file_and_the_old_list_file_is_still_read(state, ca):
    st, _ = await make_alice(state, ca)
    d = state / "AIDs" / ALICE
    # a store written by an older aund: the whole list sealed in prekeys.enc.json
    atomic_write(d / "prekeys.enc.json", st.sealer.seal("e2ee/prekeys", ALICE, b'[{"spk_id": "old-1"}]'))
    st.append_prekey(ALICE, {"spk_id": "p1"})
    before = {p.name: p.stat().st_mtime_ns for p in d.rglob("*.enc.json")}
    st.append_prekey(ALICE, {"spk_id": "p2"})
    after = {p.name: p.stat().st_mtime_ns for p in d.rglob("*.enc.json")}
    assert set(after) - set(before) == {"00000001.enc.json"}  # one new file ...
    assert all(after[name] == stamp for name, stamp in before.items())  # ... and nothing rewritten
    assert [r["spk_id"] for r in st.load_prekeys(ALICE)] == ["old-1", "p1", "p2"]  # order = age
    st.save_prekeys(ALICE, [*st.load_prekeys(ALICE), {"spk_id": "p3"}])  # appends what is new only
    assert [r["spk_id"] for r in IdentityStore(state, SEED).load_prekeys(ALICE)] == ["old-1", "p1", "p2", "p3"]
    with pytest.raises(ValueError, match="never deleted"):
        st.save_prekeys(ALICE, [{"spk_id": "p1"}])
    st.append_group_prekey(ALICE, {"spk_id": "g1", "group_id": "g.aid.test"})
    assert [r["spk_id"] for r in st.load_group_prekeys(ALICE)] == ["g1"] and len(st.load_prekeys(ALICE)) == 4
