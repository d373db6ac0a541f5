"""RpcBudget, PullGate, Backoff and refresh timing, under trio's MockClock (no real time passes)."""
from __future__ import annotations

import pytest
import trio
import trio.testing

from aund.aun.peers import PeerDirectory
from aund.aun.budget import PullGate, RpcBudget
from aund.aun.link import Backoff, refresh_delay


async def test_budget_caps_total_and_background(autojump_clock):
    budget = RpcBudget(16, 8)
    seen = []

    async def worker(background: bool):
        async with budget.slot(background):
            s = budget.statistics()
            seen.append((s.in_flight, s.background_in_flight))
            await trio.sleep(1)

    with trio.fail_after(100):
        async with trio.open_nursery() as n:
            for i in range(200):
                n.start_soon(worker, i % 2 == 0)
    assert max(a for a, _ in seen) == 16
    assert max(b for _, b in seen) == 8
    s = budget.statistics()
    assert (s.in_flight, s.background_in_flight, s.max_in_flight, s.max_background_in_flight) == (0, 0, 16, 8)


async def test_foreground_goes_before_queued_background(autojump_clock):
    budget = RpcBudget(2, 2)
    order = []
    await budget.acquire()
    await budget.acquire()

    async def take(name, background):
        async with budget.slot(background):
            order.append(name)
            await trio.sleep(1)

    async with trio.open_nursery() as n:
        n.start_soon(take, "bg1", True)
        await trio.testing.wait_all_tasks_blocked()
        n.start_soon(take, "fg1", False)
        await trio.testing.wait_all_tasks_blocked()
        budget.release()  # one place frees up: the later, foreground caller gets it
        await trio.testing.wait_all_tasks_blocked()
        assert order == ["fg1"]
        budget.release()
    assert order == ["fg1", "bg1"]


async def test_cancelled_waiter_releases_its_place_at_once(autojump_clock):
    budget = RpcBudget(1, 1)
    await budget.acquire()
    with trio.move_on_after(5):
        await budget.acquire()  # queued, then cancelled by the timeout
    assert budget.statistics().queued_foreground == 0
    budget.release()
    with trio.fail_after(1):
        await budget.acquire()  # the place is free again
    assert budget.statistics().in_flight == 1


async def test_queue_timeout_fires_at_the_call_timeout(autojump_clock):
    budget = RpcBudget(1, 1)
    await budget.acquire()
    start = trio.current_time()
    with trio.move_on_after(35) as scope:
        await budget.acquire()
    assert scope.cancelled_caught and trio.current_time() - start == pytest.approx(35)


async def test_pull_gate_serializes_and_coalesces(autojump_clock):
    gate = PullGate(max_namespaces=4)
    running: dict[str, int] = {}
    peak = {"ns": 0, "total": 0}
    calls = []

    async def pull(ns):
        running[ns] = running.get(ns, 0) + 1
        peak["ns"] = max(peak["ns"], running[ns])
        peak["total"] = max(peak["total"], sum(running.values()))
        calls.append(ns)
        await trio.sleep(1)
        running[ns] -= 1
        return {"ns": ns}

    results = []

    async def caller(ns, key):
        results.append(await gate.run(ns, key, lambda: pull(ns)))

    async with trio.open_nursery() as n:
        for i in range(10):  # 10 namespaces, 5 identical pulls each, and a second distinct key per namespace
            for _ in range(5):
                n.start_soon(caller, f"ns{i}", f"ns{i}|forward|0")
            n.start_soon(caller, f"ns{i}", f"ns{i}|forward|7")
    assert peak["ns"] == 1           # one pull in flight per namespace
    assert peak["total"] == 4        # at most 4 namespaces at once
    assert len(calls) == 20          # 60 callers, 20 distinct pulls
    assert gate.statistics().coalesced == 40
    assert len(results) == 60


async def test_pull_gate_leader_cancelled_follower_runs_itself(autojump_clock):
    gate = PullGate()
    async def slow():
        await trio.sleep(10)
        return "done"
    async with trio.open_nursery() as n:
        leader_scope = trio.CancelScope()

        async def leader():
            with leader_scope:
                await gate.run("ns", "k", slow)

        got = []

        async def follower():
            got.append(await gate.run("ns", "k", slow))

        n.start_soon(leader)
        await trio.testing.wait_all_tasks_blocked()
        n.start_soon(follower)
        await trio.testing.wait_all_tasks_blocked()
        leader_scope.cancel()
    assert got == ["done"]


def test_backoff_schedule_matches_the_sdk():
    b = Backoff(1.0, 16.0, 64.0, rng=lambda: 0.0)
    b.on_drop(1006)
    assert [b.next_delay() for _ in range(8)] == [1, 2, 4, 8, 16, 32, 64, 64]
    b.on_drop(4000)  # any other close code starts at 16 s
    assert b.next_delay() == 16
    b.reset()
    assert b.next_delay() == 1
    top = Backoff(1.0, 16.0, 64.0, rng=lambda: 0.999999)
    top.on_drop(None)
    delays = [top.next_delay() for _ in range(8)]
    assert delays[0] == pytest.approx(2.0, abs=1e-5)      # base + U * min(base, max - base)
    assert delays[-1] == pytest.approx(64.0, abs=1e-5)    # at the cap there is no room for jitter
    assert all(d <= 64.0 for d in delays)


def test_refresh_timing():
    assert refresh_delay(expires_at=10_000, now=5_000, refresh_before=1800) == 3200
    assert refresh_delay(expires_at=10_000, now=8_300, refresh_before=1800) == 0
    assert refresh_delay(expires_at=10_000, now=20_000, refresh_before=1800) == 0


async def test_token_refresh_runs_when_1800_s_remain_and_persists_first(autojump_clock, monkeypatch):
    """The link's refresh loop, on the virtual clock: first refresh 100 s in (1900 s left, refresh
    at <= 1800), the next one 1800 s after that; the rotated token is saved before it is used."""
    import time

    from aund.aun import auth, link as link_mod
    from aund.identity import pki

    saved, calls = [], []

    class Creds:
        aid, private_key, cert_pem, cert_fingerprint = "r1234.aid.test", pki.generate_key(), "", "sha256:0"

        async def load_tokens(self):
            return None

        async def save_tokens(self, tokens):
            saved.append(tokens.refresh_token)

    async def fake_refresh(url, aid, tokens, *, device_id, slot_id, connector=None):
        calls.append((trio.current_time(), tokens.refresh_token))
        assert saved == [f"r{i}" for i in range(1, len(calls))]  # previous rotations already persisted
        return auth.Tokens(f"a{len(calls)}", f"r{len(calls)}", time.time() + 3600)

    monkeypatch.setattr(link_mod.auth, "refresh", fake_refresh)
    link = link_mod.Link(Creds(), link_mod.LinkConfig(("ws://127.0.0.1:9/aun",), device_id="d"),
                         auth.GatewayTrust([]))
    link._tokens = auth.Tokens("a0", "r0", time.time() + 1900)

    class Session:
        url = "ws://127.0.0.1:9/aun"

        def end(self, code):
            raise AssertionError("refresh must not fail here")

    start = trio.current_time()
    with trio.move_on_after(3700):
        await link._refresh_loop(Session())
    offsets = [round(t - start) for t, _ in calls]
    assert offsets[0] == 100 and offsets[1] - offsets[0] == 1800
    assert [r for _, r in calls][:2] == ["r0", "r1"] and saved[:2] == ["r1", "r2"]


async def test_link_call_queue_timeout_is_a_retryable_rpc_timeout(autojump_clock):
    """16 calls hold the link's places (the gateway never answers); the 17th fails after its
    timeout with a retryable RpcTimeout that says it never left the queue; cancelled callers
    release their places at once."""
    from aund.aun import auth, link as link_mod
    from aund.errors import RpcTimeout
    from aund.identity import pki

    class Creds:
        aid, private_key, cert_pem, cert_fingerprint = "q1234.aid.test", pki.generate_key(), "", "sha256:0"

    class WS:
        async def send_message(self, text):
            pass

    link = link_mod.Link(Creds(), link_mod.LinkConfig(("ws://127.0.0.1:9/aun",), device_id="d"),
                         auth.GatewayTrust([]))
    link._session = link_mod._Socket(WS(), "ws://127.0.0.1:9/aun")
    link._session_open = True
    async with trio.open_nursery() as n:
        for _ in range(16):
            n.start_soon(lambda: link.call("meta.ping", {}, timeout=1000))
        await trio.testing.wait_all_tasks_blocked()
        assert link.budget.statistics().in_flight == 16
        start = trio.current_time()
        with pytest.raises(RpcTimeout) as info:
            await link.call("meta.ping", {}, timeout=35)
        assert trio.current_time() - start == pytest.approx(35)
        assert info.value.retryable and "queue timeout before send" in str(info.value)
        n.cancel_scope.cancel()
    assert link.budget.statistics().in_flight == 0


async def test_prekey_rotation_while_the_link_is_down_does_not_wait_for_it(tmp_path):
    """Regression: a rotation started as the link dropped held the prekey lock while waiting for the
    link to be ready, and the reconnect's own prekey publication waited on that lock (a 35 s stall).
    Now the rotation saves the new prekey and leaves its upload to the next connect."""
    from aund.aun import auth
    from aund.aun.messaging import P2PKeys
    from aund.identity.store import IdentityStore

    store = IdentityStore(tmp_path, "seed")
    key = store.create_pending("rot1.aid.test")
    import datetime as dt

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.x509.oid import NameOID

    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "rot1.aid.test")])
    now = dt.datetime.now(dt.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(1).not_valid_before(now - dt.timedelta(days=1)).not_valid_after(now + dt.timedelta(days=1))
            .sign(key, hashes.SHA256()))
    from aund.identity import pki
    store.promote("rot1.aid.test", key, pki.cert_pem(cert))
    session = P2PKeys(store.load("rot1.aid.test"), store, PeerDirectory(auth.GatewayTrust([])))
    await session.load()

    class DownLink:
        session_open = False

        async def call(self, *args, **kwargs):
            raise AssertionError("must not call a link that is down")

    with trio.fail_after(2):
        first = await session.publish_prekey(DownLink(), rotate=True)
        second = await session.publish_prekey(DownLink(), rotate=True)
    assert first != second and session.current_spk_id == second
    assert [r["spk_id"] for r in store.load_prekeys("rot1.aid.test")] == [first, second]
