"""An app iterating events with the blocking ``Client`` keeps iterating across a daemon
restart (SIGTERM, then `aund run` again on the same state dir and socket), and sees the link's
own events across a gateway restart.

A fastaun process (the independent SDK) sends E2EE messages in three phases: while aund runs,
while it is down (the gateway keeps them), and after it came back. The app, a separate process,
acks every event as it goes. It must get every message exactly once, in per-sender order, and
resume after its last ack: no message comes again after it was acked, and the consumer's acks
survived the restart (a fresh subscription from its last ack finds nothing left).
"""
from __future__ import annotations

import json
import socket
import threading
import time

import pytest

from client_stub import Client, wire
from tests.helpers import wait_until
from tests.system.harness import (
    aid, by_key, finish, finish_flood, kill_all, read_jsonl, spawn_app, start_aund, start_flood,
    strictly_increasing, wait_file,
)

pytestmark = pytest.mark.timeout(120)

PHASES = [20, 40, 20]  # sent before the restart, while aund is down, after it is back


def test_event_iteration_resumes_after_a_daemon_restart(devnet, tmp_path):
    reader = aid("reader")
    daemon = start_aund(tmp_path, devnet, [reader])
    sock = str(daemon.socket)
    work, out = tmp_path / "sdk", tmp_path / "events.jsonl"
    flood = app = None
    try:
        with Client(sock, app="monitor") as mon:
            mon.ensure_identity(reader)
            mon.session(reader).wait_ready(30)  # connected once: its prekey is published
        flood = start_flood(devnet, work, [reader], PHASES, senders=2)
        app = spawn_app("consume", {"socket": sock, "aid": reader, "consumer": "reader", "out": str(out),
                                    "expect": sum(PHASES), "deadline": 90, "app": "reader"}, tmp_path / "reader.log")
        wait_file(work / "senders.json", 60)

        (work / "go-1").touch()
        wait_file(work / "done-1", 30)
        wait_until(lambda: len(read_jsonl(out)) >= PHASES[0], 30, 0.05, "phase 1 consumed")
        before = read_jsonl(out)

        assert daemon.stop() == 0  # SIGTERM: graceful
        down_at = time.monotonic()
        (work / "go-2").touch()
        wait_file(work / "done-2", 30)  # the gateway holds these for the absent daemon
        assert app.poll() is None, "the app gave up while the daemon was down"
        daemon.start()
        down_s = time.monotonic() - down_at
        (work / "go-3").touch()
        finish_flood(flood, 30)
        result = finish(app, 60, tmp_path / "reader.log")
        events = read_jsonl(out)

        sent = json.loads((work / "sent.json").read_text())
        assert {e["message_id"] for e in events} == {m["message_id"] for m in sent}, "messages lost"
        acked: set[str] = set()
        for e in events:  # a repeat is allowed only for an event whose ack had failed
            assert e["message_id"] not in acked, f"{e['message_id']} came again after it was acked"
            if e["acked"]:
                acked.add(e["message_id"])
        assert len(events) == len(sent), f"{len(events) - len(sent)} duplicates (unacked redeliveries)"
        assert all(e["acked"] and e["encrypted"] for e in events)
        for sender, ns in by_key(events, "sender", "n").items():
            assert strictly_increasing(ns), f"sender {sender} out of order: {ns}"
        for sender, seqs in by_key(events, "from", "seq").items():
            assert strictly_increasing(seqs), f"seqs of {sender} out of order: {seqs}"
        cursors = [e["cursor"] for e in events]
        assert strictly_increasing(cursors) and cursors[len(before)] > before[-1]["cursor"]

        with Client(sock, app="monitor") as mon:
            # the acks were durable: the same consumer, from its last ack, has nothing left
            with mon.session(reader).events(consumer="reader", start="last_ack") as rest:
                assert rest.get(timeout=1.0) is None
        print(f"\nstub-reconnect: {len(events)} events, daemon down {down_s:.2f} s, app errors {result['errors']}")
    finally:
        kill_all([flood, app])
        assert daemon.stop() == 0


class StubDroppedLinkEvents(AssertionError):
    """The daemon sent the link events (seen on a raw connection) but the stub's iterator did not yield them."""


def test_link_events_reach_an_iterating_app_through_a_gateway_restart(devnet, tmp_path):
    a, b = aid("lkeva"), aid("lkevb")
    daemon = start_aund(tmp_path, devnet, [a, b])
    kinds = ["message.received", "state_change"]
    try:
        with Client(str(daemon.socket), app="linkwatch", timeout=15) as client:
            for x in (a, b):
                client.ensure_identity(x)
                client.session(x).wait_ready(30)
            client.session(b).call("message.send", {"to": a, "payload": {"text": "before"}}, timeout=15)
            stream = client.session(a).events("watch", kinds=tuple(kinds), start="last_ack")
            first = stream.get(timeout=15)
            assert first is not None and first.kind == "message.received"
            first.ack()
            raw = RawSubscriber(daemon.socket, a, kinds)  # the same subscription, without the stub

            devnet.kill()
            devnet.start()  # same port and state: the link goes reconnecting -> ready
            stub_states: list[str] = []
            deadline = time.monotonic() + 30
            while "ready" not in stub_states and time.monotonic() < deadline:
                ev = stream.get(timeout=max(0.1, min(1.0, deadline - time.monotonic())))
                if ev is not None and ev.kind == "state_change":
                    stub_states.append(ev.data["state"])
                if "ready" in raw.states() and time.monotonic() > raw.ready_at + 3:
                    break  # the daemon sent "ready" 3 s ago: the stub had its chance
            stream.close()
            raw_events = raw.close()
        raw_states = [e["data"]["state"] for e in raw_events if e["kind"] == "state_change"]
        assert "ready" in raw_states, f"the daemon sent no state_change ready: {raw_events}"
        cursors = {e["cursor"] for e in raw_events if e["kind"] == "state_change"}
        if "ready" not in stub_states:
            raise StubDroppedLinkEvents(f"the stub yielded {stub_states}; the daemon sent {raw_states} "
                                        f"with cursors {sorted(cursors)} (the message's cursor: {first.cursor})")
    finally:
        assert daemon.stop() == 0


class RawSubscriber:
    """A raw local-protocol connection subscribed to `aid` (consumer "raw"), read by a thread."""

    def __init__(self, path, aid_: str, kinds: list[str]) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(0.2)
        self.sock.connect(str(path))
        self.sock.sendall(wire.encode_frame(wire.make_hello(1, "raw-watch")) + wire.encode_frame(
            wire.make_request(2, "subscribe", {"aid": aid_, "consumer": "raw", "kinds": kinds, "start": "now"})))
        self.decoder = wire.FrameDecoder(wire.HARD_MAX_FRAME)
        self.events: list[dict] = []
        self.ready_at = float("inf")
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        while not self.stop.is_set():
            try:
                chunk = self.sock.recv(65536)
            except socket.timeout:
                continue
            if not chunk:
                return
            self.decoder.feed(chunk)
            while (f := self.decoder.next_frame()) is not None:
                if f.get("kind") == "evt":
                    self.events.append(f["event"])
                    if f["event"]["kind"] == "state_change" and f["event"]["data"].get("state") == "ready":
                        self.ready_at = min(self.ready_at, time.monotonic())

    def states(self) -> list[str]:
        return [e["data"].get("state") for e in list(self.events) if e["kind"] == "state_change"]

    def close(self) -> list[dict]:
        self.stop.set()
        self.thread.join(5)
        self.sock.close()
        return list(self.events)
