"""An operator's identity operations, with real `aund run` processes on a devnet: disable and enable
an AID (links close and come back, sessions and subscriptions refused meanwhile, the flag survives
a restart), move an AID to another aund with an encrypted bundle (the new daemon logs in as it and
decrypts what is sent to it), and back up a running daemon's state dir (a daemon started on the
copy has the inbox rows)."""
from __future__ import annotations

import json
import os
import sqlite3
import stat
import subprocess
import sys
import threading

import pytest

from client_stub import Client, PermissionDenied
from tests.helpers import ROOT, AundProcess, wait_until

pytestmark = pytest.mark.timeout(240)

SEED = "test-seed-not-secret"  # AundProcess's
PASSPHRASE = "a long passphrase, not secret"


def aund(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    full = {**os.environ, "AUND_ENCRYPTION_SEED": SEED, **(env or {})}
    full.pop("AUND_CONFIG", None)
    return subprocess.run([sys.executable, "-m", "aund", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=60, env=full)


def one_line(r: subprocess.CompletedProcess, *words: str) -> str:
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 1 and len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    assert all(w in lines[0] for w in words), lines[0]
    return lines[0]


def config(tmp_path, devnet, name: str, identities: list[str] = ()) -> os.PathLike:
    cfg = tmp_path / f"{name}.toml"
    cfg.write_text(f'gateway_url = ["{devnet.gateway_url}"]\nroot_ca = ["{devnet.root_ca}"]\n'
                   f'identities = {json.dumps(list(identities))}\n')
    return cfg


def link_state(sock, aid: str) -> str | None:
    r = aund("status", "--json", "--socket", str(sock))
    states = [link["state"] for link in json.loads(r.stdout)["links"] if link["aid"] == aid]
    return states[0] if states else None


def test_disable_and_enable(devnet, tmp_path):
    aid = f"pausable-{os.getpid() % 10000}.aid.test"
    daemon = AundProcess(tmp_path / "state", tmp_path / "aund.sock", config(tmp_path, devnet, "a", [aid]))
    daemon.start()
    sock = str(daemon.socket)
    try:
        with Client(sock, app="disable-test", timeout=30) as app:
            app.ensure_identity(aid)
            session = app.session(aid)
            session.wait_ready(timeout=30)
            events = session.events("watcher", kinds=["state_change"], start="now")
            assert events.get(timeout=0.5) is None  # subscribed (nothing yet)
            r = aund("aid", "disable", aid, "--socket", sock)
            assert r.returncode == 0 and f"{aid} disabled: 1 link(s) closed" in r.stdout, r.stderr
            assert link_state(sock, aid) == "closed"
            with pytest.raises(PermissionDenied) as refused:  # the subscription it had ends, saying why
                for _ in range(10):  # after the state changes of the closing link
                    events.get(timeout=30)
            assert refused.value.data["reason"] == "identity_disabled"
            with pytest.raises(PermissionDenied, match=f"aund aid enable {aid}"):  # the open session
                session.call("meta.ping", timeout=10)
            with pytest.raises(PermissionDenied, match="is disabled"):  # a new session
                app.session(aid, slot_id="other").wait_ready(timeout=10)
            with pytest.raises(PermissionDenied, match="is disabled"):  # a new subscription
                app.request("subscribe", {"aid": aid, "consumer": "late", "kinds": [], "start": "now"})
            with pytest.raises(PermissionDenied, match="is disabled"):  # nor does it sign
                app.sign(aid, b"while disabled")
            listed = json.loads(aund("aid", "list", "--json", "--socket", sock).stdout)
            assert [i["disabled"] for i in listed if i["aid"] == aid] == [True]
            shown = aund("aid", "show", aid, "--socket", sock)
            assert shown.returncode == 0 and "DISABLED since" in shown.stdout
            status = json.loads(aund("status", "--json", "--socket", sock).stdout)
            assert aid in status["disabled"]
            assert [w["code"] for w in status["warnings"] if w.get("aid") == aid] == ["identity.disabled"]
            assert "disabled (not held" in aund("status", "--socket", sock).stdout
            assert [link["disabled"] for link in status["links"] if link["aid"] == aid] == [True]

            r = aund("aid", "enable", aid, "--socket", sock)
            assert r.returncode == 0 and f"{aid} enabled" in r.stdout, r.stderr
            wait_until(lambda: link_state(sock, aid) == "ready", 30, 0.2, "the link back")
            session.wait_ready(timeout=30)
            assert session.call("meta.ping", timeout=10)["pong"] is True  # the same session follows
            assert aund("aid", "disable", aid, "--socket", sock).returncode == 0
        assert daemon.stop() == 0

        daemon.start()  # still disabled after a restart: the configured identity is not connected
        with Client(sock, app="disable-test", timeout=30) as app:
            status = app.status()
            assert aid in status["disabled"] and all(link["aid"] != aid for link in status["links"])
            assert any(w["code"] == "identity.disabled" for w in status["warnings"])
            with pytest.raises(PermissionDenied, match="is disabled"):
                app.session(aid).wait_ready(timeout=10)
            r = aund("aid", "enable", aid, "--socket", sock)
            assert r.returncode == 0 and "its configured link is starting" in r.stdout
            wait_until(lambda: link_state(sock, aid) == "ready", 30, 0.2, "the configured link")
            assert app.session(aid).call("meta.ping", timeout=10)["pong"] is True
        r = aund("aid", "disable", "nobody-here.aid.test", "--socket", sock)
        one_line(r, "nobody-here.aid.test")
    finally:
        daemon.stop()
    aid_dir = tmp_path / "state" / "AIDs" / aid
    meta = json.loads((aid_dir / "meta.json").read_text())
    assert meta["disabled"] is None and meta["enabled"]["at"] > 0 and meta["gateway_urls"]
    assert (aid_dir / "key.enc.json").exists() and (aid_dir / "tokens.enc.json").exists()  # nothing deleted


def test_export_and_import_into_another_daemon(devnet, tmp_path):
    mover = f"mover-{os.getpid() % 10000}.aid.test"
    sender = f"sender-{os.getpid() % 10000}.aid.test"
    first = AundProcess(tmp_path / "one", tmp_path / "one.sock", config(tmp_path, devnet, "one"))
    first.start()
    bundle = tmp_path / "mover.aundid"
    env = {"AUND_EXPORT_PASSPHRASE": PASSPHRASE}
    try:
        with Client(first.socket, app="sender", timeout=30) as app:
            app.ensure_identity(mover)
            app.session(mover).wait_ready(timeout=30)  # it logs in and publishes its prekey here first
            app.ensure_identity(sender)
            app.session(sender).wait_ready(timeout=30)
            r = aund("aid", "export", mover, "--to", str(bundle), "--state-dir", str(first.state_dir),
                     env={"AUND_EXPORT_PASSPHRASE": "short"})
            one_line(r, "shorter than 12 characters")
            r = aund("aid", "export", mover, "--to", str(bundle), "--state-dir", str(first.state_dir), env=env)
            assert r.returncode == 0 and f"exported {mover}" in r.stdout and "no tokens" in r.stdout, r.stderr
            assert stat.S_IMODE(bundle.stat().st_mode) == 0o600
            assert PASSPHRASE not in bundle.read_text() and "BEGIN" not in bundle.read_text()
            before = bundle.read_bytes()
            r = aund("aid", "export", mover, "--to", str(bundle), "--state-dir", str(first.state_dir), env=env)
            one_line(r, str(bundle), "never overwrites")
            assert bundle.read_bytes() == before
            assert aund("aid", "disable", mover, "--socket", str(first.socket)).returncode == 0  # moved away

            second_state = tmp_path / "two"
            other_seed = {"AUND_ENCRYPTION_SEED": "the second machine's seed"}
            r = aund("aid", "import", mover, "--from", str(bundle), "--state-dir", str(second_state),
                     env={**other_seed, "AUND_EXPORT_PASSPHRASE": "not the passphrase"})
            one_line(r, "the passphrase does not open", str(bundle))
            r = aund("aid", "import", sender, "--from", str(bundle), "--state-dir", str(second_state),
                     env={**other_seed, **env})
            one_line(r, f"holds {mover}, not {sender}")
            passfile = tmp_path / "pass"
            passfile.write_text(PASSPHRASE + "\n")
            r = aund("aid", "import", mover, "--from", str(bundle), "--state-dir", str(second_state),
                     "--passphrase-file", str(passfile), env=other_seed)
            assert r.returncode == 0 and r.stdout.startswith(f"imported {mover}  sha256:"), r.stderr
            assert not (second_state / "AIDs" / mover / "tokens.enc.json").exists()  # tokens are not moved

            second = AundProcess(second_state, tmp_path / "two.sock", config(tmp_path, devnet, "two"), env=other_seed)
            second.start()
            try:
                with Client(second.socket, app="receiver", timeout=30) as there:
                    moved = there.session(mover)
                    moved.wait_ready(timeout=30)  # logged in as the AID with the imported key
                    with moved.events("inbox") as inbox:
                        app.session(sender).call("message.send", {"to": mover, "payload": {
                            "type": "text", "text": "found you"}}, timeout=30)
                        got = inbox.get(timeout=30)
                    assert got.kind == "message.received" and got.data["encrypted"] is True
                    assert got.data["payload"]["text"] == "found you"
            finally:
                assert second.stop() == 0
    finally:
        first.stop()


def stored_identity(state_dir, seed: str, aid: str) -> None:
    """An identity in an aund store under `state_dir`: a fresh key and a self-signed certificate for it."""
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.x509.oid import NameOID

    from aund.identity import pki
    from aund.identity.store import IdentityStore

    store = IdentityStore(state_dir, seed)
    key = store.create_pending(aid)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, aid)])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now)
            .not_valid_after(now + datetime.timedelta(days=30)).sign(key, hashes.SHA256()))
    store.promote(aid, key, pki.cert_pem(cert))


def test_import_refuses_an_aid_held_with_another_key(tmp_path):
    """A bundle of an AID the target already holds with another key: refused, nothing replaced."""
    aid = "clash-1234.aid.test"
    stored_identity(tmp_path / "src", SEED, aid)
    bundle = tmp_path / "clash.aundid"
    env = {"AUND_EXPORT_PASSPHRASE": PASSPHRASE}
    r = aund("aid", "export", aid, "--to", str(bundle), "--state-dir", str(tmp_path / "src"), env=env)
    assert r.returncode == 0, r.stderr
    stored_identity(tmp_path / "dst", SEED, aid)  # the same name, another key
    key_file = tmp_path / "dst" / "AIDs" / aid / "key.enc.json"
    before = key_file.read_bytes()
    r = aund("aid", "import", aid, "--from", str(bundle), "--state-dir", str(tmp_path / "dst"), env=env)
    one_line(r, f"{aid} is already in aund with a different key")
    assert key_file.read_bytes() == before
    r = aund("aid", "import", aid, "--from", str(bundle), "--state-dir", str(tmp_path / "src"), env=env)
    assert r.returncode == 0, r.stderr  # the same key again: nothing to do, no error
    r = aund("aid", "export", aid, "--to", str(tmp_path / "x"), "--state-dir", str(tmp_path / "src"))
    one_line(r, "AUND_EXPORT_PASSPHRASE", "never on the command line")


def test_backup_while_messages_flow(devnet, tmp_path):
    aid = f"backed-{os.getpid() % 10000}.aid.test"
    daemon = AundProcess(tmp_path / "state", tmp_path / "aund.sock", config(tmp_path, devnet, "a", [aid]))
    daemon.start()
    target = tmp_path / "backup"
    sent: list[str] = []
    stop = threading.Event()
    try:
        with Client(daemon.socket, app="flow", timeout=30) as app:
            app.ensure_identity(aid)
            session = app.session(aid)
            session.wait_ready(timeout=30)

            def flow():
                while not stop.is_set():
                    text = f"m{len(sent)}"
                    session.call("message.send", {"to": aid, "payload": {"type": "text", "text": text},
                                                  "encrypt": False}, timeout=30)
                    sent.append(text)

            sender = threading.Thread(target=flow, daemon=True)
            sender.start()
            wait_until(lambda: len(sent) >= 5, 30, 0.05, "messages flowing")
            r = aund("backup", "--to", str(target), "--state-dir", str(daemon.state_dir))
            assert r.returncode == 0 and "inbox.sqlite3" in r.stdout, r.stderr
            wait_until(lambda: len(sent) >= 10, 30, 0.05, "messages still flowing")
            stop.set()
            sender.join(30)
        r = aund("backup", "--to", str(target), "--state-dir", str(daemon.state_dir))
        one_line(r, str(target), "is not empty")
        r = aund("backup", "--to", str(tmp_path / "b2"), "--state-dir", str(tmp_path / "no-state"))
        one_line(r, str(tmp_path / "no-state"), "is not an aund state dir")
        r = aund("backup", "--to", str(tmp_path / "missing" / "b3"), "--state-dir", str(daemon.state_dir))
        one_line(r, str(tmp_path / "missing" / "b3"), "does not exist")
    finally:
        stop.set()
        assert daemon.stop() == 0

    assert stat.S_IMODE(target.stat().st_mode) == 0o700
    files = [p for p in target.rglob("*") if p.is_file()]
    assert all(stat.S_IMODE(p.stat().st_mode) == 0o600 for p in files)
    names = {p.name for p in files}
    assert {".kdf.json", ".device_id", "inbox.sqlite3", "key.enc.json", "cert.pem"} <= names
    assert not names & {"aund.lock", "inbox.sqlite3-wal", "inbox.sqlite3-shm", "encryption_seed"}
    with sqlite3.connect(target / "inbox.sqlite3") as db:
        rows = db.execute("SELECT COUNT(*) FROM events WHERE aid = ?", (aid,)).fetchone()[0]
    assert rows >= 1

    restored = AundProcess(target, tmp_path / "restored.sock", config(tmp_path, devnet, "b"))
    restored.start()
    try:
        with Client(restored.socket, app="restored", timeout=30) as app:
            with app.session(aid).events("check", start=0) as events:
                texts = [events.get(timeout=30).data["payload"]["text"] for _ in range(rows)]
        assert texts == [f"m{i}" for i in range(rows)]  # the rows of the copy, in order, decrypted
    finally:
        assert restored.stop() == 0
