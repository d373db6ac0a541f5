"""Per-session connect options: `delivery_mode: "queue"` shares one AID's load across two aund
daemons (separate state dirs, the AID registered in one and imported into the other): each
message reaches exactly one of them, by push or by pull, and nothing is delivered twice. A
conflicting option for a running link is refused, naming the link and what it runs with."""
from __future__ import annotations

import os
import threading
import time

import pytest

from aund.identity.store import FastaunIdentity, IdentityStore
from client_stub import Client, InvalidParams
from tests.helpers import AundProcess, wait_until

pytestmark = pytest.mark.timeout(180)
N = 24
SEED = "test-seed-not-secret"  # AundProcess's AUND_ENCRYPTION_SEED


def _daemon(tmp_path, devnet, name: str) -> AundProcess:
    cfg = tmp_path / f"{name}.toml"
    cfg.write_text(f'gateway_url = ["{devnet.gateway_url}"]\nroot_ca = ["{devnet.root_ca}"]\nsync_poll_seconds = 1.0\n')
    proc = AundProcess(tmp_path / name / "state", tmp_path / name / "aund.sock", cfg)
    proc.start()
    return proc


def _ready(session) -> bool:
    try:
        return session.wait_ready(timeout=1)["state"] == "ready"
    except Exception:  # noqa: BLE001 (NotReady while it connects)
        return False


def _collect(client: Client, aid: str, into: list, stop: threading.Event) -> None:
    with client.session(aid).events(consumer="queue-test", kinds=("message.received",)) as events:
        while not stop.is_set():
            event = events.get(timeout=0.2)
            if event is not None:
                into.append(event.data["payload"]["text"])
                event.ack()


def test_queue_mode_across_two_daemons_delivers_each_message_once(devnet, tmp_path):
    alice, bob = f"queue-{os.getpid() % 10000}.aid.test", f"qsend-{os.getpid() % 10000}.aid.test"
    one = _daemon(tmp_path, devnet, "one")
    two = None
    try:
        with Client(one.socket, app="queue-one", timeout=30) as c1:
            c1.ensure_identity(alice)
            c1.ensure_identity(bob)
            # the same AID in a second daemon: the identity store's import (the daemon is not running yet)
            src = IdentityStore(tmp_path / "one" / "state", SEED).load(alice)
            dst = IdentityStore(tmp_path / "two" / "state", SEED)
            dst.import_read(FastaunIdentity(alice, str(tmp_path / "one"), src.private_key, src.cert, (),
                                            devnet.gateway_url))
            two = _daemon(tmp_path, devnet, "two")
            with Client(two.socket, app="queue-two", timeout=30) as c2:
                queue = {"delivery_mode": "queue"}
                s1, s2 = c1.session(alice, options=queue), c2.session(alice, options=queue)
                for s in (s1, s2):
                    wait_until(lambda s=s: _ready(s), 30, 0.2, "a queue-mode link")
                assert c1.status()["links"][0]["delivery_mode"] == "queue"
                # one delivery mode per AID: a fanout session on another slot is refused, clearly
                with pytest.raises(InvalidParams) as refused:
                    c1.session(alice, "other", options={"delivery_mode": "fanout"}).open()
                assert refused.value.data["arg"] == "options.delivery_mode"
                assert refused.value.data["current"]["delivery_mode"] == "queue" and "queue" in refused.value.message
                with pytest.raises(InvalidParams) as bad:
                    c1.session(alice, "third", options={"connection_kind": "short"}).open()
                assert bad.value.data["arg"] == "options.connection_kind"
                assert _ready(c1.session(alice))  # no options: the running link, as it is

                sender = c1.session(bob)
                wait_until(lambda: _ready(sender), 30, 0.2, "the sender's link")
                got1, got2, stop = [], [], threading.Event()
                readers = [threading.Thread(target=_collect, args=(c, alice, got, stop), daemon=True)
                           for c, got in ((c1, got1), (c2, got2))]
                for t in readers:
                    t.start()
                texts = [f"job {i}" for i in range(N)]
                for text in texts:
                    r = sender.call("message.send", {"to": alice, "payload": {"type": "text", "text": text}},
                                    timeout=20)
                    assert r["status"] == "delivered"
                wait_until(lambda: len(got1) + len(got2) >= N, 60, 0.1, "every message at one instance")
                # three sync polls later (1 s each, real daemons) nothing more has arrived: a pull never
                # hands one instance what the other was given
                time.sleep(3.5)
                stop.set()
                for t in readers:
                    t.join(10)
                assert sorted(got1 + got2) == sorted(texts)  # every message, each exactly once
                assert not set(got1) & set(got2)
                assert got1 and got2, (len(got1), len(got2))  # round robin: both instances did work
    finally:
        for proc in (one, two):
            if proc is not None:
                assert proc.stop() == 0
