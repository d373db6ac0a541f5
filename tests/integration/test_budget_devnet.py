"""The RPC budget and the pull gate, as the gateway (a real devnet process) sees them."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import trio

from aund.aun import auth
from aund.aun.link import Link, LinkConfig
from aund.daemon import StoreCredentials
from aund.identity.store import IdentityStore

pytestmark = pytest.mark.timeout(120)


async def _ready_link(devnet, tmp_path, name):
    store = IdentityStore(tmp_path / "state", "seed")
    aid = f"{name}-{os.getpid() % 10000}.aid.test"
    identity = await store.ensure(aid, lambda a, pk: auth.create_aid(devnet.gateway_url, a, pk))
    trust = auth.GatewayTrust.from_files([Path(devnet.root_ca)])
    link = Link(StoreCredentials(store, identity), LinkConfig((devnet.gateway_url,), device_id=identity.device_id),
                trust)
    return link


async def test_200_concurrent_calls_stay_within_16_and_8(lenient_devnet, tmp_path):
    devnet = lenient_devnet
    await trio.to_thread.run_sync(lambda: devnet.set_faults(reply_delay_ms=40))  # let calls pile up
    link = await _ready_link(devnet, tmp_path, "budget")
    answered = []
    with trio.fail_after(60):
        async with trio.open_nursery() as n:
            await n.start(link.run)
            await link.wait_ready()

            async def one(i: int) -> None:
                background = i % 2 == 1  # background calls are meta.status, foreground meta.ping
                r = await link.call("meta.status" if background else "meta.ping", {}, background=background)
                answered.append(r)

            async with trio.open_nursery() as calls:
                for i in range(200):
                    calls.start_soon(one, i)
            await link.aclose()
    stats = await trio.to_thread.run_sync(devnet.stats)
    assert len(answered) == 200
    assert stats["max_inflight"] == 16  # reached, never exceeded
    assert stats["max_inflight_by_method"]["meta.status"] <= 8
    assert stats["max_inflight_by_method"]["meta.status"] >= 1
    local = link.budget.statistics()
    assert (local.max_in_flight, local.max_background_in_flight) == (16, 8)


async def test_identical_pulls_are_coalesced_at_the_gateway(lenient_devnet, tmp_path):
    devnet = lenient_devnet
    await trio.to_thread.run_sync(lambda: devnet.set_faults(reply_delay_ms=100))
    link = await _ready_link(devnet, tmp_path, "puller")
    with trio.fail_after(60):
        async with trio.open_nursery() as n:
            await n.start(link.run)
            await link.wait_ready()
            before = (await trio.to_thread.run_sync(devnet.stats))["rpc"].get("message.v2.pull", 0)
            params = {"cursor_scope": "peer", "sender_aid": link.aid, "after_seq": 0, "limit": 50}
            results = []

            async def pull() -> None:
                results.append(await link.pull(f"p2p.peer.v1/{link.aid}", "forward|0|50", "message.v2.pull", params))

            async with trio.open_nursery() as pulls:
                for _ in range(20):
                    pulls.start_soon(pull)
            await link.aclose()
    after = (await trio.to_thread.run_sync(devnet.stats))["rpc"].get("message.v2.pull", 0)
    assert len(results) == 20 and all(r == results[0] for r in results)
    assert after - before == 1  # twenty identical pulls, one request at the gateway


async def test_one_budget_serves_the_socket_and_the_links_an_app_call_holds_one_token(tmp_path):
    """The app socket and every link share the daemon's one limiter: an app's call takes its token
    at the socket and the gateway RPCs it makes in its task take none (a group.create makes several).
    With a budget of two tokens (one for apps, one kept for the daemon's own work), a second token
    per call would wait for itself, and an app call waiting on the group's proposal lock (held by
    the daemon's own proposal, which needs a token) would wait forever without the reserve."""
    from client_stub import Client

    from aund.testing import local_aund

    aid = f"onebudget-{os.getpid() % 10000}.aid.test"
    with trio.fail_after(60):
        async with local_aund(tmp_path, [aid], global_in_flight=2) as env:
            assert env.broker.call_limiter is env.daemon.global_budget
            assert env.daemon.global_budget.total_tokens == 2 and env.daemon.global_budget.reserve == 1

            def app() -> tuple[dict, dict]:
                with Client(env.socket, app="one-budget", timeout=30) as client:
                    client.ensure_identity(aid)
                    with client.session(aid) as s:
                        s.wait_ready(20)
                        pong = s.call("meta.ping", {}, timeout=20)
                        created = s.call("group.create", {"name": "one budget"}, timeout=20)
                        return pong, created

            pong, created = await trio.to_thread.run_sync(app)
            assert isinstance(pong, dict) and created["group"]["group_id"]
            stats = env.daemon.global_budget.statistics()
            assert stats.total_tokens == 2 and env.daemon.global_budget.app_statistics().total_tokens == 1
