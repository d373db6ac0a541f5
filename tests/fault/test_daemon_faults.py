"""Fault suite, with real devnet and daemon processes: gateway restarts under load, pushes
the gateway drops, a full disk, damaged state files."""
from __future__ import annotations

import hashlib
import os
import resource
import secrets
import threading
import time
import uuid

import pytest

from client_stub import AundError, Client
from tests.helpers import AundProcess, wait_until

pytestmark = pytest.mark.timeout(240)


def _daemon(devnet, tmp_path, aids, **env):
    cfg = tmp_path / "aund.toml"
    ids = ", ".join(f'"{a}"' for a in aids)
    cfg.write_text(f'gateway_url = ["{devnet.gateway_url}"]\nroot_ca = ["{devnet.root_ca}"]\nidentities = [{ids}]\n')
    proc = AundProcess(tmp_path / "state", tmp_path / "aund.sock", cfg, env={"AUND_SYNC_POLL_SECONDS": "1", **env})
    proc.start()
    return proc


def _wait_ready(sock, aids, timeout=60):
    def ready():
        try:
            with Client(sock, reconnect_attempts=0) as c:
                links = {link["aid"]: link["state"] for link in c.status()["links"]}
            return all(links.get(a) == "ready" for a in aids)
        except AundError:
            return False
    wait_until(ready, timeout, 0.1, f"links ready: {aids}")


class Consumer(threading.Thread):
    """Reads bob's messages through the stub, acking each; records message ids in arrival order."""

    def __init__(self, sock, aid, name="fault-consumer"):
        super().__init__(daemon=True)
        self.sock, self.aid, self.name_ = sock, aid, name
        self.seen: list[str] = []
        self.texts: list[str] = []
        self.stop = threading.Event()
        self.error: BaseException | None = None

    def run(self):
        try:
            with Client(self.sock) as c:
                with c.session(self.aid).events(self.name_, start="last_ack") as events:
                    while not self.stop.is_set():
                        event = events.get(timeout=0.5)
                        if event is None:
                            continue
                        self.seen.append(event.data["message_id"])
                        self.texts.append(event.data["payload"]["text"])
                        event.ack()
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            self.error = exc


def _send_reliably(session, to, text, message_id, deadline):
    """Retry a retryable failure with the SAME message_id: the gateway stores a message once."""
    while True:
        try:
            return session.call("message.send", {"to": to, "message_id": message_id,
                                                 "payload": {"type": "text", "text": text}}, timeout=10)
        except AundError as exc:
            if not exc.retryable or time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def test_devnet_killed_and_restarted_five_times_under_load(devnet, tmp_path):
    alice, bob = (f"{n}-{secrets.token_hex(3)}.aid.test" for n in ("alice", "bob"))
    daemon = _daemon(devnet, tmp_path, [alice, bob])
    try:
        _wait_ready(daemon.socket, [alice, bob])
        consumer = Consumer(daemon.socket, bob)
        consumer.start()
        sent: list[str] = []
        stop = threading.Event()

        def produce():
            deadline = time.monotonic() + 180
            with Client(daemon.socket) as c:
                s = c.session(alice)
                i = 0
                while not stop.is_set():
                    mid = f"m-{uuid.uuid4().hex}"
                    _send_reliably(s, bob, f"n{i}", mid, deadline)
                    sent.append(mid)
                    i += 1
                    time.sleep(0.01)

        producer = threading.Thread(target=produce, daemon=True)
        producer.start()
        for _ in range(5):
            time.sleep(1.0)
            devnet.kill()
            time.sleep(0.3)
            devnet.start()
        time.sleep(1.0)
        stop.set()
        producer.join(60)
        assert not producer.is_alive()
        wait_until(lambda: len(consumer.seen) >= len(sent), 90, 0.2, "every message consumed")
        time.sleep(1.5)  # anything delivered twice would show up now
        consumer.stop.set()
        consumer.join(10)
        assert consumer.error is None, consumer.error
        assert len(sent) > 20
        assert consumer.seen == sent  # all of them, once each, in the order they were sent
        _wait_ready(daemon.socket, [alice, bob])  # every link back to ready
    finally:
        assert daemon.stop() == 0


def test_pushes_dropped_by_the_gateway_still_arrive_in_order_once(devnet, tmp_path):
    alice, bob = (f"{n}-{secrets.token_hex(3)}.aid.test" for n in ("alice", "bob"))
    daemon = _daemon(devnet, tmp_path, [alice, bob])
    try:
        _wait_ready(daemon.socket, [alice, bob])
        consumer = Consumer(daemon.socket, bob)
        consumer.start()
        devnet.set_faults(drop_push_every=2)  # half the pushes vanish, the last one included
        with Client(daemon.socket) as c:
            s = c.session(alice)
            sent = [s.call("message.send", {"to": bob, "payload": {"type": "text", "text": f"d{i}"}})["message_id"]
                    for i in range(41)]
        wait_until(lambda: len(consumer.seen) >= len(sent), 60, 0.1, "all messages")
        time.sleep(1.5)
        consumer.stop.set()
        consumer.join(10)
        assert consumer.seen == sent
        assert devnet.stats()["pushes_dropped"] >= 20
    finally:
        assert daemon.stop() == 0


def test_disk_full_stops_acking_and_recovers(devnet, tmp_path):
    alice, bob = (f"{n}-{secrets.token_hex(3)}.aid.test" for n in ("alice", "bob"))
    daemon = _daemon(devnet, tmp_path, [alice, bob])
    try:
        _wait_ready(daemon.socket, [alice, bob])
        with Client(daemon.socket) as c:
            s = c.session(alice)
            s.call("message.send", {"to": bob, "payload": {"type": "text", "text": "before"}})
            wait_until(lambda: c.status()["inbox"].get(bob, 0) >= 1, 30, 0.1, "first message stored")
            # the state dir is "full": no file of the daemon may grow beyond what it has now
            wal = daemon.state_dir / "inbox.sqlite3-wal"
            limit = max(os.path.getsize(p) for p in (wal, daemon.state_dir / "inbox.sqlite3") if p.exists())
            acks_before = devnet.stats()["rpc"].get("message.v2.ack", 0)
            resource.prlimit(daemon.proc.pid, resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))
            mids = [s.call("message.send", {"to": bob, "payload": {"type": "text", "text": f"full{i}" + "x" * 4000}})[
                "message_id"] for i in range(30)]
            wait_until(lambda: any(e.get("event") == "sync.failed" and "full" in str(e.get("error", "")).lower()
                                   or e.get("event") == "sync.failed" and "disk" in str(e.get("error", "")).lower()
                                   for e in daemon.log_events()), 30, 0.1, "a loud storage error")
            assert c.status()["inbox"].get(bob, 0) <= 1  # nothing new was committed...
            assert devnet.stats()["rpc"].get("message.v2.ack", 0) == acks_before  # ...so nothing was acked
            resource.prlimit(daemon.proc.pid, resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
            consumer = Consumer(daemon.socket, bob)
            consumer.start()
            wait_until(lambda: len(consumer.seen) >= 31, 60, 0.1, "everything after space returns")
            time.sleep(1.0)
            consumer.stop.set()
            consumer.join(10)
            assert consumer.seen[1:] == mids and len(consumer.seen) == 31
    finally:
        assert daemon.stop() == 0


def _digest(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_a_damaged_inbox_stops_the_start_naming_the_file(devnet, tmp_path):
    alice = f"alice-{secrets.token_hex(3)}.aid.test"
    daemon = _daemon(devnet, tmp_path, [alice])
    _wait_ready(daemon.socket, [alice])
    assert daemon.stop() == 0
    inbox = daemon.state_dir / "inbox.sqlite3"
    inbox.write_bytes(b"this is not a database" * 100)
    before = _digest(inbox)
    key_files = sorted(daemon.state_dir.rglob("*.enc.json"))
    keys_before = {p: _digest(p) for p in key_files}
    again = AundProcess(daemon.state_dir, daemon.socket, daemon.config_file, env=daemon.env)
    with pytest.raises(AssertionError):
        again.start(timeout=20)
    assert again.proc.returncode == 1
    assert str(inbox) in again.log_path.read_text()
    assert _digest(inbox) == before  # never reset
    assert {p: _digest(p) for p in key_files} == keys_before and key_files  # keys untouched


def test_a_truncated_key_file_is_reported_and_left_alone(devnet, tmp_path):
    alice, bob = (f"{n}-{secrets.token_hex(3)}.aid.test" for n in ("alice", "bob"))
    daemon = _daemon(devnet, tmp_path, [alice, bob])
    _wait_ready(daemon.socket, [alice, bob])
    assert daemon.stop() == 0
    key = daemon.state_dir / "AIDs" / alice / "key.enc.json"
    key.write_bytes(key.read_bytes()[:40])
    before = _digest(key)
    again = AundProcess(daemon.state_dir, daemon.socket, daemon.config_file, env=daemon.env)
    again.start()
    try:
        _wait_ready(again.socket, [bob])  # the healthy identity works
        with Client(again.socket) as c:
            warnings = c.status()["warnings"]
        corrupt = [w for w in warnings if w["code"] == "identity.corrupt"]
        assert corrupt and corrupt[0]["aid"] == alice and "key.enc.json" in corrupt[0]["text"]
        assert any(e.get("event") == "identity.load_failed" and e.get("aid") == alice for e in again.log_events())
        assert _digest(key) == before and key.exists()
    finally:
        assert again.stop() == 0


def test_an_ack_the_gateway_lost_is_sent_again(devnet, tmp_path):
    """The inbox holds messages whose upstream ack failed: the next quiet-link check acks again, so
    the gateway's cursor catches up without any new message (it would otherwise show them unread)."""
    alice, bob = (f"{n}-{secrets.token_hex(3)}.aid.test" for n in ("alice", "bob"))
    daemon = _daemon(devnet, tmp_path, [alice, bob])
    try:
        _wait_ready(daemon.socket, [alice, bob])
        devnet.set_faults(fail_acks=1000)  # every ack fails for now
        with Client(daemon.socket) as c:
            s = c.session(alice)
            for i in range(3):
                s.call("message.send", {"to": bob, "payload": {"type": "text", "text": f"a{i}"}})
            wait_until(lambda: c.status()["inbox"].get(bob, 0) >= 3, 30, 0.1, "committed")
            wait_until(lambda: any(e.get("event") == "sync.ack_deferred" for e in daemon.log_events()), 30, 0.1,
                       "a failed ack")
            devnet.set_faults(fail_acks=0)
            acks_before = devnet.stats()["rpc"].get("message.v2.ack", 0)
            # the poll (AUND_SYNC_POLL_SECONDS=1) sees the gateway's cursor behind the inbox and acks again
            wait_until(lambda: devnet.stats()["rpc"].get("message.v2.ack", 0) > acks_before, 30, 0.1,
                       "a repeated ack")
            errors_before = devnet.stats()["rpc_errors"].get("message.v2.ack 5003", 0)
            time.sleep(2.5)  # two more polls: once the cursor caught up, nothing more is sent
            stats = devnet.stats()
            assert stats["rpc_errors"].get("message.v2.ack 5003", 0) == errors_before
            settled = stats["rpc"]["message.v2.ack"]
            time.sleep(2.0)
            assert devnet.stats()["rpc"]["message.v2.ack"] == settled
    finally:
        assert daemon.stop() == 0
