"""The daemon's link handling against aund.testing.FakeGateway (no socket, no gateway process):
link states in `status`, idle links reaped after `idle_link_seconds`, `restart_link` after a kick."""
from __future__ import annotations

import datetime as dt

import pytest
import trio
import trio.testing
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.x509.oid import NameOID

from aund.aun.auth import GatewayTrust
from aund.config import Config
from aund.daemon import Daemon
from aund.identity import pki
from aund.identity.store import IdentityStore
from aund.testing import TEST_APP, FakeGateway

AID = "dlink.aid.test"


@pytest.fixture
def clock():
    """A MockClock that jumps only after 10 ms of real idleness: the daemon does its file and
    SQLite work in worker threads, and a clock that jumped while a thread runs would fire timers
    (and the test's own deadline) that nothing but the thread was waiting for. The daemon starts
    outside the virtual deadline (its key derivation is slow); pytest-timeout bounds real time."""
    return trio.testing.MockClock(autojump_threshold=0.01)


def _store_with_identity(state_dir, gw: FakeGateway) -> IdentityStore:
    """An identity with a self-signed certificate, tokens the fake gateway accepts and its agent.md
    marked as published (so connecting makes no HTTP request)."""
    store = IdentityStore(state_dir, "seed")
    key = store.create_pending(AID)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, AID)])
    now = dt.datetime.now(dt.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(1).not_valid_before(now - dt.timedelta(days=1)).not_valid_after(now + dt.timedelta(days=30))
            .sign(key, hashes.SHA256()))
    store.promote(AID, key, pki.cert_pem(cert))
    store.save_tokens(AID, gw.issue_tokens(AID).to_json())
    store.update_meta(AID, agent_md_etag='"published"')
    return store


async def _daemon(nursery, tmp_path, gw, **settings):
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    store = await trio.to_thread.run_sync(_store_with_identity, state, gw)
    config = Config(state_dir=state, socket=tmp_path / "aund.sock", gateway_url=(gw.url,), **settings)
    daemon = Daemon(config, store, GatewayTrust([]), connector=gw.connect, rng=lambda: 0.0)
    await nursery.start(daemon.run)
    return daemon


def _gateway() -> FakeGateway:
    gw = FakeGateway()
    gw.on("*", lambda params, method: {})  # prekeys, peers, groups, sync: nothing there
    return gw


def _link_status(daemon) -> dict:
    (link,) = daemon.status()["links"]
    return link


async def test_status_follows_the_link_through_a_drop_and_back(clock, tmp_path):
    gw = _gateway()
    async with trio.open_nursery() as n:
        daemon = await _daemon(n, tmp_path, gw)
        with trio.fail_after(3600):
            handle = await daemon.open_session(TEST_APP, AID, "main")
            await handle.wait_ready()
            link = _link_status(daemon)
            assert (link["aid"], link["slot_id"], link["state"], link["connects"], link["holders"], link["pinned"]) \
                == (AID, "main", "ready", 1, 1, False)
            gw.refuse()
            gw.close(4000)
            await gw.wait_until(lambda: len(gw.attempts) == 3)
            link = _link_status(daemon)
            assert link["state"] in ("retry_backoff", "reconnecting") and "connection refused" in link["last_error"]
            gw.refuse(0)
            await handle.wait_ready()
            link = _link_status(daemon)
            assert (link["state"], link["connects"], link["reconnects"]) == ("ready", 2, 1)
            assert not [w for w in daemon.status()["warnings"] if w["code"].startswith("link.")]
            await daemon.aclose()


async def test_an_idle_link_is_closed_after_idle_link_seconds_and_a_held_one_never(clock, tmp_path):
    gw = _gateway()
    async with trio.open_nursery() as n:
        daemon = await _daemon(n, tmp_path, gw, idle_link_seconds=60)
        with trio.fail_after(3600):
            handle = await daemon.open_session(TEST_APP, AID, "main")
            await handle.wait_ready()
            await trio.sleep(200)  # held: never reaped
            assert gw.open_sessions and _link_status(daemon)["state"] == "ready"
            released = trio.current_time()
            await daemon.release_session(TEST_APP, handle)
            await gw.wait_until(lambda: not gw.open_sessions)
            closed = gw.connections[0]
            # the reaper looks every min(30, idle_link_seconds) s: closed at the first look >= 60 s idle
            assert released + 60 <= closed.closed_at <= released + 90
            assert (closed.closed_by, closed.close_code) == ("client", 1000)
            await trio.testing.wait_all_tasks_blocked()
            assert daemon.status()["links"] == [] and len(gw.attempts) == 1
            await daemon.aclose()


async def test_restart_link_after_a_kick_starts_it_anew_for_the_same_handle(clock, tmp_path):
    gw = _gateway()
    async with trio.open_nursery() as n:
        daemon = await _daemon(n, tmp_path, gw)
        with trio.fail_after(3600):
            handle = await daemon.open_session(TEST_APP, AID, "main")
            await handle.wait_ready()
            gw.kick(4015, "replaced by a newer long connection")
            await handle.entry.link.wait_stopped()
            await trio.sleep(600)
            assert len(gw.attempts) == 1 and _link_status(daemon)["state"] == "connection_failed"
            (warning,) = [w for w in daemon.status()["warnings"] if w["code"] == "link.failed"]
            assert "kicked by the gateway: code=4015" in warning["text"]
            answer = await daemon.restart_link(TEST_APP, AID, "main")
            assert answer["restarted"] is True
            await handle.wait_ready()
            assert gw.sessions == 2 and handle.state() == "ready"
            assert _link_status(daemon)["holders"] == 1
            again = await daemon.restart_link(TEST_APP, AID, "main")  # a running link is left alone
            assert again == {"aid": AID, "slot_id": "main", "restarted": False, "state": "ready"}
            assert len(gw.attempts) == 2
            await daemon.aclose()
