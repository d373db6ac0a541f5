"""The state dir's disk fills up (a small tmpfs, filled by the test). Apps get a
StorageError naming the problem, not "lost the connection ... is aund running?"; the inbox's
failure is reported as the disk being full (not SQLite's "cannot rollback"); `aund health` says so;
and once space is freed the daemon recovers without a restart (the held message arrives)."""
from __future__ import annotations

import contextlib
import errno
import json
import os
import secrets
import subprocess
from pathlib import Path

import pytest

from client_stub import Client
from client_stub.errors import StorageError
from tests.helpers import AundProcess, wait_until
from tests.hostile.common import aund_cli, require_root
from tests.system.harness import write_config

pytestmark = pytest.mark.timeout(90)


@contextlib.contextmanager
def small_tmpfs(path: Path, size: str):
    path.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(path)], check=True,
                   timeout=10)
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False, timeout=10)


def fill(path: Path) -> None:
    """Write `path` until the file system has not one byte left."""
    with open(path, "wb", buffering=0) as f:
        for chunk in (1 << 16, 4096, 1):
            try:
                while True:
                    f.write(b"\0" * chunk)
            except OSError as exc:
                assert exc.errno == errno.ENOSPC, exc


def _health(sock: Path) -> tuple[int, dict]:
    done = aund_cli("health", "--socket", str(sock), "--json")
    return done.returncode, json.loads(done.stdout)


class FullDisk:
    """A daemon whose state dir is a 4 MiB tmpfs (its log outside), alice and bob online and one
    message exchanged (so that nothing but the inbox needs to grow for the next); `fill()` then
    takes the last byte."""

    def __init__(self, devnet, tmp_path: Path) -> None:
        self.alice, self.bob, self.late = (f"{n}-{secrets.token_hex(3)}.aid.test" for n in ("fa", "fb", "fc"))
        self.cfg = write_config(tmp_path / "aund.toml", devnet, [self.alice, self.bob])
        self.state = tmp_path / "disk" / "state"
        self.filler = self.state / "filler"

    @contextlib.contextmanager
    def running(self):
        require_root("mounts a small tmpfs as the state dir")
        self.state.parent.mkdir()
        with small_tmpfs(self.state, "4m"):
            daemon = AundProcess(self.state, self.state.parent / "aund.sock", self.cfg)
            daemon.start()
            try:
                with Client(daemon.socket, app="full-disk", reconnect_attempts=0) as client:
                    for a in (self.alice, self.bob):
                        client.ensure_identity(a)
                        client.session(a).wait_ready(15)
                    self.exchange(client, "warm")
                    assert _health(daemon.socket)[0] == 0
                    yield daemon, client
            finally:
                assert daemon.stop() == 0

    def send(self, client: Client, text: str) -> None:
        client.session(self.alice).call("message.send", {"to": self.bob, "payload": {"type": "text", "text": text}})

    def exchange(self, client: Client, text: str, send: bool = True, timeout: float = 10) -> None:
        with client.session(self.bob).events("c", start="last_ack") as events:
            if send:
                self.send(client, text)
            ev = events.get(timeout=timeout)
            assert ev is not None and ev.data["payload"]["text"] == text, ev
            ev.ack()


def test_full_disk_new_identity_is_a_storage_error(devnet, tmp_path):
    disk = FullDisk(devnet, tmp_path)
    with disk.running() as (daemon, client):
        fill(disk.filler)
        # a new identity needs files: the app is told why it cannot have one, and stays connected
        with pytest.raises(StorageError) as caught:
            client.ensure_identity(disk.late)
        text = str(caught.value)
        assert "No space left on device" in text and "disk is full" in text, text
        assert str(disk.state) in text, text
        client.ping()
        code, report = _health(daemon.socket)
        assert code == 1 and any(r["code"] == "storage.error" and "No space left" in r["text"]
                                 for r in report["reasons"]), report
        os.unlink(disk.filler)  # space again: the same call succeeds, health clears
        client.ensure_identity(disk.late)
        client.session(disk.late).wait_ready(15)
        assert _health(daemon.socket)[0] == 0


def test_full_disk_inbox_error_is_named_and_the_message_waits(devnet, tmp_path):
    disk = FullDisk(devnet, tmp_path)
    with disk.running() as (daemon, client):
        fill(disk.filler)
        disk.send(client, "held")  # bob's daemon side cannot commit it to the inbox

        def inbox_error():
            code, report = _health(daemon.socket)
            found = [r for r in report["reasons"] if r["code"] == "storage.error" and "inbox" in r["text"]]
            return (code, found) if found else None

        code, found = wait_until(inbox_error, 10, interval=0.2, what="health to report the inbox's write error")
        assert code == 1 and "full" in found[0]["text"] and "rollback" not in found[0]["text"], found
        os.unlink(disk.filler)  # space again: the held message arrives (the gateway kept it), health clears
        disk.exchange(client, "held", send=False, timeout=20)
        wait_until(lambda: _health(daemon.socket)[0] == 0, 10, interval=0.2, what="health to clear")
