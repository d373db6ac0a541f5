"""Hostile input on the receive path. A tampered envelope, one for someone else, a replay
and a lying gateway page are each rejected with a logged reason and an event to apps; nothing
that was not committed is acked upstream."""
from __future__ import annotations

import copy
import os
import time
import uuid
from contextlib import aclosing
from pathlib import Path

import pytest
import structlog
import trio

from aund.aun.peers import PeerDirectory
from aund.aun import auth
from aund.aun.e2ee import encrypt_p2p
from aund.aun.link import Link, LinkConfig
from aund.aun.messaging import P2PKeys
from aund.daemon import StoreCredentials
from aund.errors import InvalidParams
from aund.identity.store import IdentityStore
from tests.inproc import APP, start_daemon

pytestmark = pytest.mark.timeout(120)


class Peer:
    """An AUN client built from aund's own parts, used here as the attacker."""

    def __init__(self, devnet, tmp_path, name):
        self.devnet, self.dir, self.name = devnet, tmp_path / name, name
        self.aid = f"{name}-{os.getpid() % 100000}.aid.test"

    async def start(self, nursery):
        store = IdentityStore(self.dir, "seed")
        identity = await store.ensure(self.aid, lambda a, pk: auth.create_aid(self.devnet.gateway_url, a, pk))
        trust = auth.GatewayTrust.from_files([Path(self.devnet.root_ca)])
        self.session = P2PKeys(identity, store, PeerDirectory(trust))
        await self.session.load()
        self.link = Link(StoreCredentials(store, identity),
                         LinkConfig((self.devnet.gateway_url,), device_id=identity.device_id), trust)
        await nursery.start(self.link.run)
        await self.link.wait_ready()
        await self.session.publish_prekey(self.link)

    def envelope(self, targets, to, text, message_id):
        return encrypt_p2p(sender_aid=self.aid, sender_device_id=self.link.config.device_id,
                           sender_ik_private=self.session.identity.private_key, targets=targets,
                           payload={"type": "text", "text": text}, message_id=message_id,
                           timestamp_ms=int(time.time() * 1000), to_aid=to)

    async def send_raw(self, to, envelope, message_id):
        return await self.link.call("message.send", {"to": to, "message_id": message_id, "payload": envelope})


async def _daemon(nursery, devnet, tmp_path, aid):
    daemon = await start_daemon(nursery, devnet, tmp_path, [aid])
    while not any(e.link.state.value == "ready" for e in daemon.links.values()):
        await trio.sleep(0.02)
    return daemon


async def _next_events(daemon, aid, kinds, n, start="last_ack"):
    out = []
    async with aclosing(daemon.subscribe(APP, aid, kinds, "t", start)) as events:
        async for event in events:
            out.append(event)
            await daemon.ack(APP, aid, "t", event.cursor)
            if len(out) >= n:
                return out


async def test_tampered_wrong_recipient_and_replayed_messages_are_rejected(lenient_devnet, tmp_path):
    devnet = lenient_devnet
    alice = f"alice-{os.getpid() % 100000}.aid.test"
    with trio.fail_after(90), structlog.testing.capture_logs() as logs:
        async with trio.open_nursery() as nursery:
            daemon = await _daemon(nursery, devnet, tmp_path, alice)
            mallory, carol = Peer(devnet, tmp_path, "mallory"), Peer(devnet, tmp_path, "carol")
            await mallory.start(nursery)
            await carol.start(nursery)
            to_alice = await mallory.session._targets(mallory.link, alice)
            to_carol = await mallory.session._targets(mallory.link, carol.aid)
            # 1. tampered ciphertext
            mid = "m-" + uuid.uuid4().hex
            env = mallory.envelope(to_alice, alice, "tampered", mid)
            ct = bytearray(env["ciphertext"].encode())
            ct[5] = ord("A") if ct[5] != ord("A") else ord("B")
            env["ciphertext"] = ct.decode()
            await mallory.send_raw(alice, env, mid)
            # 2. an envelope made for carol, delivered to alice
            mid = "m-" + uuid.uuid4().hex
            await mallory.send_raw(alice, mallory.envelope(to_carol, carol.aid, "for carol", mid), mid)
            # 3. a valid message that the gateway replays (its push arrives twice), and that the
            #    sender re-sends with the same message_id (the gateway answers duplicate)
            await trio.to_thread.run_sync(lambda: devnet.set_faults(replay_pushes=1))
            mid = "m-" + uuid.uuid4().hex
            good = mallory.envelope(to_alice, alice, "genuine", mid)
            await mallory.send_raw(alice, good, mid)
            again = await mallory.send_raw(alice, copy.deepcopy(good), mid)
            assert again["status"] == "duplicate"
            # (re-sending it under a new message_id is refused by the gateway: the AAD binds the id)
            with pytest.raises(InvalidParams):
                await mallory.send_raw(alice, copy.deepcopy(good), "m-" + uuid.uuid4().hex)
            await mallory.session.send(mallory.link, {"to": alice, "payload": {"type": "text", "text": "after"}}, None)
            events = await _next_events(daemon, alice, ("message.received", "message.undecryptable"), 4)
            sync = next(iter(daemon.links.values())).sync
            with trio.fail_after(5):  # the replayed copy of the push is seen (and dropped) soon after
                while sync.stats["duplicates"] < 1:
                    await trio.sleep(0.01)
            duplicates = sync.stats["duplicates"]
            assert await daemon.inbox.head(alice) == 4  # and nothing more was committed
            await daemon.aclose()
            nursery.cancel_scope.cancel()
    kinds = [(e.kind, e.data.get("reason"), (e.data.get("payload") or {}).get("text")) for e in events]
    assert kinds[0] == ("message.undecryptable", "bad_signature", None)
    assert kinds[1][0] == "message.undecryptable" and kinds[1][1] in ("no_recipient_row", "aad_mismatch")
    assert kinds[2] == ("message.received", None, "genuine")
    assert kinds[3] == ("message.received", None, "after")  # "genuine" came once, though pushed twice
    assert duplicates >= 1
    logged = [e for e in logs if e["event"] == "e2ee.undecryptable"]
    assert [e["reason"] for e in logged][:1] == ["bad_signature"] and len(logged) == 2


async def test_a_page_that_breaks_the_coverage_proof_is_not_trusted_or_acked(lenient_devnet, tmp_path):
    devnet = lenient_devnet
    alice = f"alice-{os.getpid() % 100000}.aid.test"
    with trio.fail_after(90), structlog.testing.capture_logs() as logs:
        async with trio.open_nursery() as nursery:
            daemon = await _daemon(nursery, devnet, tmp_path, alice)
            mallory = Peer(devnet, tmp_path, "mallory")
            await mallory.start(nursery)
            await trio.to_thread.run_sync(lambda: devnet.set_faults(drop_push_every=1, break_proof=1))
            notices = []

            async def watch():
                async with aclosing(daemon.subscribe(APP, alice, ("sync.proof_rejected",), "w", "now")) as evs:
                    async for ev in evs:
                        notices.append(ev)
                        return

            nursery.start_soon(watch)
            await trio.sleep(0)  # let the watcher subscribe before the fault fires
            for i in range(3):
                await mallory.session.send(mallory.link, {"to": alice, "payload": {"type": "text", "text": f"m{i}"}},
                                           None)
            entry = next(iter(daemon.links.values()))
            entry.sync.request_resync()  # pushes were dropped: make alice pull (the lying page comes first)
            while not notices:
                await trio.sleep(0.02)
            peers = await entry.link.call("message.peers", {"filter": "all"})
            acked = {p["sender_aid"]: p["server_ack_seq"] for p in peers["peers"]}
            assert acked[mallory.aid] == 0  # the rejected page was not acked upstream
            assert await daemon.inbox.head(alice) == 0  # and nothing from it was committed
            await trio.to_thread.run_sync(lambda: devnet.set_faults(drop_push_every=0, break_proof=0))
            entry.sync.request_resync()
            events = await _next_events(daemon, alice, ("message.received",), 3)
            await daemon.aclose()
            nursery.cancel_scope.cancel()
    assert notices[0].data["sender"] == mallory.aid and notices[0].data["reason"]
    assert [e.data["payload"]["text"] for e in events] == ["m0", "m1", "m2"]
    assert any(e["event"] == "sync.proof_rejected" for e in logs)
