"""Fault suite: a gateway that stalls mid-frame, answers garbage, or closes with each code.
The link under test is aund's own; the gateway is a scripted fake (it only injects faults)."""
from __future__ import annotations

import time

import pytest
import trio

from aund.aun import auth
from aund.aun.link import NO_RECONNECT_CODES, Link, LinkConfig, LinkState
from aund.identity import pki
from tests.fault.fakegw import FakeGateway

pytestmark = pytest.mark.timeout(120)


class Creds:
    def __init__(self):
        key = pki.generate_key()
        self.aid, self.private_key, self.cert_pem, self.cert_fingerprint = "fault.aid.test", key, "", "sha256:00"
        self.tokens = auth.Tokens("token", "refresh", time.time() + 3600)  # usable: no login needed

    async def load_tokens(self):
        return self.tokens

    async def save_tokens(self, tokens):
        self.tokens = tokens


def _link(gw, states, **overrides):
    cfg = dict(gateways=(gw.url,), device_id="dev1", backoff_initial=0.05, backoff_after_server_close=0.2,
               backoff_max=0.4, heartbeat_interval=0.3, pong_timeout=0.3, connect_timeout=2.0)
    cfg.update(overrides)
    return Link(Creds(), LinkConfig(**cfg), auth.GatewayTrust([]), rng=lambda: 0.0,
                on_state=lambda link, state, info: states.append((state, info)))


async def _until(predicate, seconds=10.0):
    with trio.fail_after(seconds):
        while not predicate():
            await trio.sleep(0.01)


async def test_garbage_frames_are_ignored_and_the_link_keeps_serving():
    gw = FakeGateway(lambda i: ("garbage",))
    states = []
    async with trio.open_nursery() as n:
        await n.start(gw.serve)
        link = _link(gw, states)
        await n.start(link.run)
        with trio.fail_after(10):
            await link.wait_ready()
            await trio.sleep(0.2)  # the junk arrives
            assert (await link.call("meta.ping", {}))["pong"] is True
        assert link.state == LinkState.READY and gw.connections == 1
        await link.aclose()
        n.cancel_scope.cancel()


async def test_a_stall_mid_frame_is_detected_by_the_heartbeat_and_the_link_reconnects():
    gw = FakeGateway(lambda i: ("stall",) if i == 0 else ("serve",))
    states = []
    async with trio.open_nursery() as n:
        await n.start(gw.serve)
        link = _link(gw, states)
        await n.start(link.run)
        await _until(lambda: gw.connections >= 2 and link.state == LinkState.READY)
        with trio.fail_after(5):
            assert (await link.call("meta.ping", {}))["pong"] is True
        assert ("stalled", 0) in gw.events
        assert [s for s, _ in states].count(LinkState.RETRY_BACKOFF) >= 1
        await link.aclose()
        n.cancel_scope.cancel()


@pytest.mark.parametrize("code", [1000, 1001, 1011, 4000, 4001, 4003, 4008, 4009, 4010, 4011, 4012, 4013, 4014,
                                  4015])
async def test_each_close_code(code):
    gw = FakeGateway(lambda i: ("close", code) if i == 0 else ("serve",))
    states = []
    async with trio.open_nursery() as n:
        await n.start(gw.serve)
        link = _link(gw, states)
        await n.start(link.run)
        if code in NO_RECONNECT_CODES:
            await _until(lambda: link.state == LinkState.CONNECTION_FAILED)
            await trio.sleep(0.6)  # longer than any backoff here: it must not come back
            assert gw.connections == 1 and link.state == LinkState.CONNECTION_FAILED
            with pytest.raises(Exception) as info:
                await link.call("meta.ping", {}, timeout=1)
            assert "connection_failed" in str(info.value)
        else:
            await _until(lambda: gw.connections >= 2 and link.state == LinkState.READY)
            backoff = next(info["delay"] for state, info in states if state == LinkState.RETRY_BACKOFF)
            # the SDK's rule: 1 s base after 1000/1006 (here 0.05), 16 s after any other code (here 0.2)
            assert backoff == (0.05 if code == 1000 else 0.2)
        await link.aclose()
        n.cancel_scope.cancel()


async def test_a_gateway_that_never_answers_the_handshake_is_a_mapped_error():
    """Regression (found by the 1,000-link benchmark): a pre-auth RPC whose connect timed out let
    trio.TooSlowError escape inside an exception group, which crashed the daemon from a link's
    token-refresh task. It must be GatewayUnavailable like any unreachable gateway."""
    from aund.aun import auth as auth_mod
    from aund.errors import GatewayUnavailable

    async def silent(stream):  # accepts TCP, never answers the WebSocket handshake
        await trio.sleep_forever()

    async with trio.open_nursery() as n:
        listeners = await n.start(lambda task_status: trio.serve_tcp(silent, 0, host="127.0.0.1",
                                                                     task_status=task_status))
        port = listeners[0].socket.getsockname()[1]
        old = auth_mod.CONNECT_TIMEOUT
        auth_mod.CONNECT_TIMEOUT = 0.3
        try:
            with trio.fail_after(5), pytest.raises(GatewayUnavailable):
                await auth_mod.short_rpc(f"ws://127.0.0.1:{port}/aun", "auth.refresh_token", {})
        finally:
            auth_mod.CONNECT_TIMEOUT = old
        n.cancel_scope.cancel()
