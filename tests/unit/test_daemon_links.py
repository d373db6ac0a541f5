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


@pytest.mark.timeout(120)
def test_status_of_10000_links_fits_a_local_frame_and_counts_every_state(tmp_path):
    """10,000 pinned links, none ready: `status` counts them by state, lists the default page,
    names 32 link warnings one by one and counts the rest in one, and fits the 1 MiB frame."""
    from client_stub import wire

    from aund.aun.link import Link, LinkConfig, LinkState
    from aund.daemon import STATUS_LINK_WARNINGS, STATUS_LINKS, LinkEntry
    from aund.testing import MemoryCredentials

    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    store = IdentityStore(state, "seed")
    config = Config(state_dir=state, socket=tmp_path / "aund.sock", gateway_url=("ws://127.0.0.1:9/aun",))
    daemon = Daemon(config, store, GatewayTrust([]))
    n = 10_000
    for i in range(n):
        aid = f"scale{i:05d}.aid.test"
        link = Link(MemoryCredentials(aid), LinkConfig(config.gateway_url, device_id="dev1"), GatewayTrust([]))
        link.state = LinkState.READY if i % 4 == 0 else LinkState.RETRY_BACKOFF
        daemon.links[(aid, "main")] = LinkEntry(link, None, None, True)  # type: ignore[arg-type]
    status = daemon.status()
    assert status["link_counts"] == {"ready": 2500, "retry_backoff": 7500} and status["links_total"] == n
    assert len(status["links"]) == STATUS_LINKS and status["links_page"]["truncated"]
    not_ready = [w for w in status["warnings"] if w["code"] == "link.not_ready"]
    assert len(not_ready) == STATUS_LINK_WARNINGS + 1 and "and 7468 more" in not_ready[-1]["text"]
    assert len(wire.encode_frame(wire.make_reply(1, status))) < wire.DEFAULT_MAX_FRAME
    page = daemon.status(links=3, offset=9998)
    assert [e["aid"] for e in page["links"]] == ["scale09998.aid.test", "scale09999.aid.test"]
    assert page["links_page"] == {"offset": 9998, "limit": 3, "matching": n, "truncated": True}
    one = daemon.status(links=10, aids=["SCALE00004.aid.test", "not an aid"])
    assert [e["aid"] for e in one["links"]] == ["scale00004.aid.test"] and one["links_page"]["matching"] == 1
    assert daemon.status(links=0)["links"] == []
