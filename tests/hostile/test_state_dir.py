"""Damaged or exposed state dirs, against real `aund run` processes and a devnet:

- item 5: `.kdf.json` removed from a state dir that holds encrypted data: aund refuses to start
  with one line naming the file, whatever the seed, and never makes a new one (no re-keying).
- item 11: a corrupt `tokens.enc.json` (tokens are disposable): the identity logs in again with
  its key and comes online; the key file is not touched.
- item 18 (files): run by hand with umask 022, nothing in the state dir is group/world readable
  (the inbox database and its -wal/-shm included).
"""
from __future__ import annotations

import hashlib
import json
import os
import secrets
import subprocess
import sys
from pathlib import Path

import pytest

from client_stub import Client
from tests.helpers import ROOT, AundProcess
from tests.hostile.common import in_shell, mode, modes_under
from tests.system.harness import write_config

pytestmark = pytest.mark.timeout(90)
SEED = "hostile-seed-" + secrets.token_hex(6)


def _aid(name: str) -> str:
    return f"{name}-{secrets.token_hex(3)}.aid.test"


def _daemon(tmp_path: Path, devnet, aids: list[str], seed: str = SEED, **kw) -> AundProcess:
    cfg = write_config(tmp_path / "aund.toml", devnet, aids)
    return AundProcess(tmp_path / "state", tmp_path / "aund.sock", cfg, env={"AUND_ENCRYPTION_SEED": seed}, **kw)


def _online(daemon: AundProcess, aids: list[str], timeout: float = 15.0) -> None:
    with Client(daemon.socket, app="hostile-test") as client:
        for aid in aids:
            client.ensure_identity(aid)  # a configured identity may still be registering
            client.session(aid).wait_ready(timeout)


def _snapshot(state: Path) -> dict[str, str]:
    return {str(p.relative_to(state)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(state.rglob("*")) if p.is_file() and p.name != "aund.lock"}  # the lock holds the pid


def test_missing_kdf_json_refuses_to_start_and_never_rekeys(devnet, tmp_path):
    alice = _aid("kdf")
    daemon = _daemon(tmp_path, devnet, [alice])
    daemon.start()
    try:
        _online(daemon, [alice])
    finally:
        assert daemon.stop() == 0
    state = daemon.state_dir
    kdf = state / ".kdf.json"
    assert kdf.exists()
    kdf.unlink()  # the attack (or a bad restore): the seed check is gone with it
    before = _snapshot(state)
    for seed in ("a-wrong-seed", SEED):
        env = {**os.environ, "AUND_ENCRYPTION_SEED": seed}
        env.pop("AUND_CONFIG", None)
        proc = subprocess.Popen([sys.executable, "-m", "aund", "run", "--state-dir", str(state), "--socket",
                                 str(tmp_path / "aund.sock"), "--config", str(daemon.config_file)],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT, env=env)
        try:
            _, err = proc.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            _, err = proc.communicate()
            raise AssertionError(f"aund started on a state dir without .kdf.json (seed {seed!r}): {err[-1500:]}")
        assert proc.returncode != 0
        lines = [x for x in err.splitlines() if x.strip()]
        assert len(lines) == 1 and ".kdf.json" in lines[0] and "Traceback" not in err, err
        assert not kdf.exists(), "aund made a new .kdf.json: the state dir was re-keyed"
        assert _snapshot(state) == before
    # putting a .kdf.json back is the operator's call; aund did not touch anything meanwhile


@pytest.mark.parametrize("damage", ["truncated", "bit_flipped"])
def test_corrupt_tokens_log_in_again_with_the_key(devnet, tmp_path, damage):
    alice = _aid("tok")
    daemon = _daemon(tmp_path, devnet, [alice])
    daemon.start()
    try:
        _online(daemon, [alice])
    finally:
        assert daemon.stop() == 0
    aid_dir = next(p for p in (daemon.state_dir / "AIDs").iterdir() if p.name == alice)
    tokens, key = aid_dir / "tokens.enc.json", aid_dir / "key.enc.json"
    raw = tokens.read_bytes()
    if damage == "truncated":
        tokens.write_bytes(raw[: len(raw) // 2])  # a torn write
    else:
        record = json.loads(raw)
        field = next(k for k in ("ciphertext", "ct", "data") if k in record)
        blob = bytearray(record[field].encode())
        blob[len(blob) // 2] ^= 0x01 if chr(blob[len(blob) // 2] ^ 0x01).isalnum() else 0x02
        record[field] = blob.decode()
        tokens.write_text(json.dumps(record))
    key_before = key.read_bytes()
    daemon.start()
    try:
        _online(daemon, [alice])
    finally:
        assert daemon.stop() == 0
    assert key.read_bytes() == key_before  # the key is never touched
    assert any(e.get("event") == "identity.tokens_unreadable" and e.get("aid") == alice for e in daemon.log_events())
    assert tokens.read_bytes() != raw and json.loads(tokens.read_bytes())  # replaced by fresh tokens


def test_run_by_hand_with_umask_022_keeps_the_state_dir_private(devnet, tmp_path):
    alice, bob = _aid("um-a"), _aid("um-b")
    daemon = _daemon(tmp_path, devnet, [alice, bob], wrap=in_shell("umask 022"))
    daemon.start()
    try:
        _online(daemon, [alice, bob])
        with Client(daemon.socket, app="hostile-test") as client:
            with client.session(bob).events("c", start="last_ack") as events:
                client.session(alice).call("message.send", {"to": bob, "payload": {"type": "text", "text": "hi"}})
                event = next(iter(events))
                assert event.data["payload"]["text"] == "hi"
                event.ack()
        state = daemon.state_dir
        inbox = [state / "inbox.sqlite3", state / "inbox.sqlite3-wal", state / "inbox.sqlite3-shm"]
        assert all(p.exists() for p in inbox), sorted(os.listdir(state))
        modes = modes_under(state)
        assert all(mode(p) == 0o600 for p in inbox), modes
        exposed = {k: v for k, v in modes.items() if int(v, 8) & 0o077}
        assert exposed == {}, f"group/world readable in the state dir: {exposed}"
    finally:
        assert daemon.stop() == 0
