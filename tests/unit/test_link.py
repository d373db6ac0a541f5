"""aund.aun.link.Link against aund.testing.FakeGateway (in memory), on trio's MockClock: the
reconnect backoff, the heartbeat, token refresh timing, kicks and close codes, the per-link RPC
budget, call timeouts, the admission retry, aclose and wait_ready, with exact virtual times."""
from __future__ import annotations

import types

import pytest
import trio
import trio.testing

from aund.aun import auth as auth_mod, link as link_mod
from aund.aun.auth import GatewayTrust
from aund.aun.link import NO_RECONNECT_CODES, Link, LinkConfig, LinkState
from aund.devnet.gateway import RpcError
from aund.errors import AuthError, GatewayUnavailable, RpcTimeout
from aund.testing import FakeGateway

AID = "link-test.aid.test"
EPOCH = 1_800_000_000.0


@pytest.fixture
def wall(monkeypatch):
    """time.time() in the link and auth modules follows the virtual clock (token lifetimes are
    wall-clock times), so refresh timing is exact."""
    def clock() -> float:
        return EPOCH + trio.current_time()

    fake = types.SimpleNamespace(time=clock)
    monkeypatch.setattr(link_mod, "time", fake)
    monkeypatch.setattr(auth_mod, "time", fake)
    return clock


class Harness:
    def __init__(self, gw: FakeGateway, rng=lambda: 0.0, creds=None, **config) -> None:
        self.gw = gw
        self.states: list[tuple[float, LinkState, dict]] = []
        self.events: list[tuple[float, str, dict]] = []
        self.creds = creds or gw.credentials(AID)
        self.link = Link(self.creds, LinkConfig((gw.url,), device_id="dev1", **config), GatewayTrust([]),
                         connector=gw.connect, rng=rng,
                         on_state=lambda link, state, info: self.states.append((trio.current_time(), state, info)),
                         on_event=lambda link, name, params: self.events.append((trio.current_time(), name, params)))

    def times(self, state: LinkState) -> list[float]:
        return [t for t, s, _ in self.states if s == state]


async def started(nursery, gw: FakeGateway, **kw) -> Harness:
    h = Harness(gw, **kw)
    await nursery.start(h.link.run)
    return h


async def test_handshake_and_a_call(autojump_clock):
    gw = FakeGateway()
    gw.on("meta.status", lambda params: {"mode": "gateway", "echo": params})
    with trio.fail_after(60):
        async with trio.open_nursery() as n:
            h = await started(n, gw, slot_id="s1")
            await h.link.wait_ready()
            assert trio.current_time() == 0 and gw.sessions == 1 and h.link.is_ready
            hello = gw.connections[0].connect_params
            assert hello["nonce"] == gw.connections[0].nonce
            assert hello["auth"] == {"method": "kite_token", "token": h.creds.tokens.access_token}
            assert hello["client"]["slot_id"] == "s1" and hello["device"]["id"] == "dev1"
            assert hello["capabilities"]["p2p_peer_pull_v1"] is True
            assert await h.link.call("meta.status", {"x": 1}) == {"mode": "gateway", "echo": {"x": 1}}
            assert (await h.link.call("meta.ping"))["pong"] is True
            assert [c.method for c in gw.calls] == ["auth.connect", "meta.status", "meta.ping"]
            stats = h.link.statistics()
            assert (stats.connects, stats.reconnects, stats.rpcs, stats.state) == (1, 0, 2, "ready")
            assert [s for _, s, _ in h.states] == [LinkState.CONNECTING, LinkState.READY]
            await h.link.aclose()
    assert gw.connections[0].closed_by == "client" and gw.connections[0].close_code == 1000


async def test_a_gateway_without_peer_pull_fails_the_link_for_good(autojump_clock):
    gw = FakeGateway()
    gw.capabilities.pop("p2p_peer_pull_v1")
    with trio.fail_after(600):
        async with trio.open_nursery() as n:
            h = await started(n, gw)
            with pytest.raises(GatewayUnavailable) as info:
                await h.link.wait_ready()
            assert not info.value.retryable and "p2p_peer_pull_v1" in h.link.last_error
            await trio.sleep(500)
            assert len(gw.attempts) == 1 and h.link.state == LinkState.CONNECTION_FAILED
            await h.link.wait_stopped()


async def test_backoff_doubles_over_consecutive_refused_connects_to_the_maximum(autojump_clock):
    """rng 0: 1, 2, 4, ... 64 s (backoff_max), then 64 again; the waiters wake at the connect."""
    gw = FakeGateway()
    gw.refuse(8)
    woke = []
    with trio.fail_after(1000):
        async with trio.open_nursery() as n:
            h = await started(n, gw)

            async def waiter():
                await h.link.wait_ready()
                woke.append(trio.current_time())
            for _ in range(3):
                n.start_soon(waiter)
            await gw.wait_until(lambda: gw.sessions == 1)
            await trio.testing.wait_all_tasks_blocked()
            assert gw.attempts == [0, 1, 3, 7, 15, 31, 63, 127, 191]
            assert woke == [191] * 3 and gw.refused == 8
            assert [round(i["delay"], 6) for _, s, i in h.states if s == LinkState.RETRY_BACKOFF] == \
                [1, 2, 4, 8, 16, 32, 64, 64]
            assert "connection refused" in h.link.last_error
            await h.link.aclose()


async def test_backoff_jitter_is_base_plus_u_times_min_of_base_and_headroom(autojump_clock):
    gw = FakeGateway()
    gw.refuse(5)
    with trio.fail_after(1000):
        async with trio.open_nursery() as n:
            h = await started(n, gw, rng=lambda: 0.5, backoff_max=10)
            await gw.wait_until(lambda: gw.sessions == 1)
            delays = [i["delay"] for _, s, i in h.states if s == LinkState.RETRY_BACKOFF]
            # bases 1, 2, 4, 8, 10: + 0.5 * min(base, 10 - base)
            assert delays == [1.5, 3.0, 6.0, 9.0, 10.0]
            await h.link.aclose()


async def test_backoff_after_drops_local_codes_one_second_server_codes_sixteen_reset_on_connect(autojump_clock):
    gw = FakeGateway()
    with trio.fail_after(1000):
        async with trio.open_nursery() as n:
            h = await started(n, gw)
            await h.link.wait_ready()
            gw.close(1006)                    # the network dropped it: 1 s
            await gw.wait_until(lambda: gw.sessions == 2)
            assert gw.attempts[-1] == 1
            gw.close(1006)                    # again: reset by the connect, 1 s again
            await gw.wait_until(lambda: gw.sessions == 3)
            assert gw.attempts[-1] == 2
            gw.close(4000)                    # a server-side code: 16 s
            gw.refuse(1)                      # ... then a failed attempt doubles it: 32 s
            await gw.wait_until(lambda: gw.sessions == 4)
            assert gw.attempts[-2:] == [18, 50]
            await trio.testing.wait_all_tasks_blocked()
            stats = h.link.statistics()
            assert (stats.connects, stats.reconnects, stats.state) == (4, 3, "ready")
            gw.close(1006)                    # reset again after that connect
            await gw.wait_until(lambda: gw.sessions == 5)
            assert gw.attempts[-1] == 51
            await h.link.aclose()


@pytest.mark.parametrize("code", sorted(NO_RECONNECT_CODES))
async def test_no_reconnect_close_codes_stop_the_link(autojump_clock, code):
    gw = FakeGateway()
    with trio.fail_after(3000):
        async with trio.open_nursery() as n:
            h = await started(n, gw)
            await h.link.wait_ready()
            gw.close(code)
            await h.link.wait_stopped()
            with pytest.raises(GatewayUnavailable) as info:
                await h.link.wait_ready()
            assert not info.value.retryable and info.value.data["state"] == "connection_failed"
            await trio.sleep(2000)
            assert len(gw.attempts) == 1 and h.link.state == LinkState.CONNECTION_FAILED
            assert f"code {code}" in h.link.last_error
            with pytest.raises(GatewayUnavailable):
                await h.link.call("meta.ping", timeout=5)


async def test_4012_shutdown_reconnects_after_the_server_close_backoff(autojump_clock):
    gw = FakeGateway()
    with trio.fail_after(100):
        async with trio.open_nursery() as n:
            h = await started(n, gw)
            await h.link.wait_ready()
            gw.push("event/gateway.disconnect", {"code": 4012, "reason": "gateway shutting down"})
            gw.close(4012)
            await gw.wait_until(lambda: gw.sessions == 2)
            assert gw.attempts == [0, 16]
            assert [name for _, name, _ in h.events] == ["gateway.disconnect"]
            await h.link.aclose()


async def test_a_kick_stops_the_link_even_with_a_retryable_close_code(autojump_clock):
    """`event/gateway.disconnect` marks the session kicked: whatever code the close carries, the
    link does not come back (the SDK's rule); the event reaches on_event first."""
    gw = FakeGateway()
    with trio.fail_after(100):
        async with trio.open_nursery() as n:
            h = await started(n, gw)
            await h.link.wait_ready()
            gw.kick(4000, "revoked by the operator")
            await h.link.wait_stopped()
            assert h.link.state == LinkState.CONNECTION_FAILED and len(gw.attempts) == 1
            assert "kicked by the gateway: code=4000 reason=revoked by the operator" == h.link.last_error
            assert [(name, p["code"]) for _, name, p in h.events] == [("gateway.disconnect", 4000)]


async def test_a_duplicate_connection_notice_is_not_a_kick(autojump_clock):
    gw = FakeGateway()
    with trio.fail_after(100):
        async with trio.open_nursery() as n:
            h = await started(n, gw)
            await h.link.wait_ready()
            gw.kick(4000, "long_connection_already_exists")
            await gw.wait_until(lambda: gw.sessions == 2)
            assert gw.attempts == [0, 16]
            await h.link.aclose()


async def test_heartbeat_pings_every_interval_and_a_silent_gateway_is_dead_after_the_pong_timeout(autojump_clock):
    gw = FakeGateway()
    with trio.fail_after(1000):
        async with trio.open_nursery() as n:
            h = await started(n, gw, heartbeat_interval=30, pong_timeout=10)
            await h.link.wait_ready()
            await trio.sleep(100)
            assert gw.connections[0].pings == [30, 60, 90] and gw.sessions == 1
            gw.answer_pings = False                # from now on no pong
            await gw.wait_until(lambda: gw.sessions == 2)
            first = gw.connections[0]
            assert first.pings[-1] == 120 and (first.closed_at, first.closed_by) == (130, "client")
            assert gw.attempts == [0, 131]         # a local drop (1006): 1 s
            gw.answer_pings = True
            await trio.sleep(100)
            assert gw.connections[1].pings == [161, 191, 221]
            await h.link.aclose()


async def test_the_token_is_refreshed_refresh_before_seconds_ahead_of_expiry(autojump_clock, wall):
    gw = FakeGateway(token_lifetime=3600, wall_clock=wall)
    with trio.fail_after(10_000):
        async with trio.open_nursery() as n:
            h = await started(n, gw, refresh_before=1800)
            await h.link.wait_ready()
            first_access = h.link.access_token
            await trio.sleep(5500)
            refreshes = [c for c in gw.calls if c.method == "auth.refresh_token"]
            assert [c.at for c in refreshes] == [1800, 3600, 5400]
            assert not any(c.connection.authenticated for c in refreshes)  # each on a pre-auth socket
            assert all(c.connection.closed_by == "client" for c in refreshes)
            assert gw.sessions == 1 and h.link.state == LinkState.READY  # the long connection stays
            assert [t.expires_at - EPOCH for t in h.creds.saved] == [5400, 7200, 9000]
            assert h.link.access_token == h.creds.saved[-1].access_token != first_access
            assert [(t, name) for t, name, _ in h.events] == [(1800, "token.refreshed"), (3600, "token.refreshed"),
                                                              (5400, "token.refreshed")]
            gw.close(1006)  # the reconnect uses the latest token, which the gateway accepts
            await gw.wait_until(lambda: gw.sessions == 2)
            assert gw.connections[-1].connect_params["auth"]["token"] == h.creds.saved[-1].access_token
            await h.link.aclose()


async def test_three_failed_refreshes_end_the_session_then_it_reconnects(autojump_clock, wall):
    gw = FakeGateway(token_lifetime=3600, wall_clock=wall)
    gw.on("auth.refresh_token", lambda params: (_ for _ in ()).throw(RpcError(-32603, "backend down")))
    with trio.fail_after(10_000):
        async with trio.open_nursery() as n:
            h = await started(n, gw, refresh_before=1800, refresh_check=30)
            await h.link.wait_ready()
            await gw.wait_until(lambda: gw.sessions == 2)
            assert [c.at for c in gw.calls if c.method == "auth.refresh_token"][:3] == [1800, 1830, 1860]
            assert gw.connections[0].closed_at == 1860 and gw.attempts[-1] == 1861
            # the access token still had 1740 s left: the reconnect used it
            assert gw.open_sessions[0].connect_params["auth"]["token"] == h.creds.tokens.access_token
            await h.link.aclose()


async def test_a_token_near_expiry_is_refreshed_before_the_connect(autojump_clock, wall):
    gw = FakeGateway(wall_clock=wall)
    with trio.fail_after(100):
        async with trio.open_nursery() as n:
            h = await started(n, gw, creds=gw.credentials(AID, lifetime=20))  # under the 30 s reuse margin
            await h.link.wait_ready()
            assert [c.method for c in gw.calls] == ["auth.refresh_token", "auth.connect"]
            assert gw.connections[1].connect_params["auth"]["token"] == h.creds.saved[0].access_token
            await h.link.aclose()


async def test_the_budget_keeps_16_in_flight_and_8_background_under_load(autojump_clock):
    gw = FakeGateway()
    gw.on("meta.work", lambda params: {"n": params["n"]})
    gw.delay("meta.work", 1.0)
    peak = {"fg": 0, "bg": 0}
    with trio.fail_after(100):
        async with trio.open_nursery() as n:
            h = await started(n, gw)
            await h.link.wait_ready()
            results = []

            async def one(i):
                results.append((await h.link.call("meta.work", {"n": i}, background=i % 2 == 1))["n"])
                s = h.link.budget.statistics()
                peak["fg"], peak["bg"] = max(peak["fg"], s.in_flight), max(peak["bg"], s.background_in_flight)
            async with trio.open_nursery() as calls:
                for i in range(200):
                    calls.start_soon(one, i)
            # t=0: 8 + 8 in the order started; t=1..5: 16 foreground each (queued foreground first);
            # t=6: the last 12 foreground + 4 background; then 88 background at 8 a second: done at 18
            assert sorted(results) == list(range(200)) and trio.current_time() == 18
            work = [c for c in gw.calls if c.method == "meta.work"]
            at_gateway = max(sum(c.at <= t < c.answered_at for c in work) for t in {c.at for c in work})
            assert at_gateway == 16
            s = h.link.budget.statistics()
            assert (s.max_in_flight, s.max_background_in_flight, s.in_flight) == (16, 8, 0)
            # the foreground half went first: every foreground call was sent before the last background one
            assert max(c.at for c in work if c.params["n"] % 2 == 0) == 6
            assert max(c.at for c in work if c.params["n"] % 2 == 1) == 17
            await h.link.aclose()


async def test_call_timeouts_are_exact_and_a_late_reply_is_ignored(autojump_clock):
    gw = FakeGateway()
    gw.on("meta.slow", lambda params: {"late": True})
    gw.on("meta.status", lambda params: {"ok": True})
    with trio.fail_after(200):
        async with trio.open_nursery() as n:
            h = await started(n, gw, call_timeout=35)
            await h.link.wait_ready()
            gw.drop("meta.slow", 1)
            with pytest.raises(RpcTimeout) as info:
                await h.link.call("meta.slow")
            assert trio.current_time() == 35 and info.value.retryable and "rpc timeout: meta.slow" in str(info.value)
            gw.delay("meta.slow", 10)
            with pytest.raises(RpcTimeout):
                await h.link.call("meta.slow", timeout=4)
            assert trio.current_time() == 39
            await trio.sleep(10)  # the late answer arrives and is dropped
            assert await h.link.call("meta.status") == {"ok": True}
            assert h.link.state == LinkState.READY and gw.sessions == 1
            await h.link.aclose()


async def test_calls_in_flight_when_the_connection_drops_fail_at_once_with_the_close_code(autojump_clock):
    gw = FakeGateway()
    gw.drop("meta.slow")
    errors = []
    with trio.fail_after(100):
        async with trio.open_nursery() as n:
            h = await started(n, gw)
            await h.link.wait_ready()

            async def call():
                with pytest.raises(GatewayUnavailable) as info:
                    await h.link.call("meta.slow")
                errors.append((trio.current_time(), info.value.retryable, info.value.data.get("close_code")))
            async with trio.open_nursery() as calls:
                for _ in range(3):
                    calls.start_soon(call)
                await gw.wait_until(lambda: gw.count("meta.slow") == 3)
                gw.close(4000)
            assert errors == [(0, True, 4000)] * 3
            await h.link.aclose()


async def test_an_admission_refusal_is_answered_then_retried_after_0_50_100_200_ms(autojump_clock):
    refused_calls = []
    refusals = {"left": 0}

    def create(params):
        if refusals["left"] > 0:
            refusals["left"] -= 1
            raise RpcError(-32003, "valid agent.md is required")
        return {"created": True}

    async def on_refused(link, exc, method, params):
        refused_calls.append((trio.current_time(), method, params))
        return True

    gw = FakeGateway()
    gw.on("group.create", create)
    with trio.fail_after(100):
        async with trio.open_nursery() as n:
            h = Harness(gw)
            h.link.on_admission_refused = on_refused
            await n.start(h.link.run)
            await h.link.wait_ready()

            def attempts():
                return [round(c.at - start, 6) for c in gw.calls if c.method == "group.create"]

            refusals["left"], start = 3, trio.current_time()
            assert await h.link.call("group.create", {"name": "g"}) == {"created": True}
            assert attempts() == [0, 0, 0.05, 0.15] and refused_calls == [(0, "group.create", {"name": "g"})]
            await trio.sleep(1)
            refusals["left"], start = 99, trio.current_time()
            with pytest.raises(AuthError):
                await h.link.call("group.create", {})
            assert attempts()[-5:] == [0, 0, 0.05, 0.15, 0.35] and len(refused_calls) == 2
            refusals["left"] = 99
            h.link.on_admission_refused = None  # nobody can publish what is missing: no retry
            with pytest.raises(AuthError):
                await h.link.call("group.create", {})
            assert gw.count("group.create") == 10
            await h.link.aclose()


async def test_aclose_fails_waiting_calls_and_closes_at_once(autojump_clock):
    gw = FakeGateway()
    gw.drop("meta.slow")
    outcomes = []
    with trio.fail_after(100):
        async with trio.open_nursery() as n:
            h = await started(n, gw, rpc_in_flight=2, rpc_background=1)
            await h.link.wait_ready()

            async def call():
                try:
                    await h.link.call("meta.slow")
                except GatewayUnavailable as exc:
                    outcomes.append((trio.current_time(), exc.retryable))
            for _ in range(3):  # two at the gateway, one queued in the budget
                n.start_soon(call)
            await gw.wait_until(lambda: gw.count("meta.slow") == 2)
            await trio.testing.wait_all_tasks_blocked()
            assert h.link.budget.statistics().queued_foreground == 1
            await h.link.aclose()
            assert trio.current_time() == 0 and h.link.state == LinkState.CLOSED
            await trio.testing.wait_all_tasks_blocked()
            assert outcomes == [(0, False)] * 3
            assert (gw.connections[0].closed_by, gw.connections[0].close_code) == ("client", 1000)
            with pytest.raises(GatewayUnavailable):
                await h.link.wait_ready()


async def test_aclose_in_backoff_wakes_the_waiters_and_stops(autojump_clock):
    gw = FakeGateway()
    gw.refuse()
    outcomes = []
    with trio.fail_after(100):
        async with trio.open_nursery() as n:
            h = await started(n, gw)

            async def call():
                try:
                    await h.link.call("meta.ping")
                except GatewayUnavailable as exc:
                    outcomes.append((trio.current_time(), exc.retryable))
            for _ in range(2):
                n.start_soon(call)
            await trio.sleep(5)  # attempts at 0, 1, 3; sleeping 4 s until 7
            await h.link.aclose()
            await trio.testing.wait_all_tasks_blocked()
            assert h.link.state == LinkState.CLOSED and gw.attempts == [0, 1, 3]
            assert outcomes == [(5, False)] * 2
            assert trio.current_time() == 5
            await h.link.wait_stopped()


async def test_events_reach_on_event_in_order_without_the_event_prefix(autojump_clock):
    gw = FakeGateway()
    with trio.fail_after(100):
        async with trio.open_nursery() as n:
            h = await started(n, gw)
            await h.link.wait_ready()
            for i in range(3):
                gw.push("event/message.received", {"seq": i})
            gw.push("event/custom.thing", {"x": 1})
            await trio.testing.wait_all_tasks_blocked()
            assert [(name, p) for _, name, p in h.events] == [("message.received", {"seq": 0}),
                                                              ("message.received", {"seq": 1}),
                                                              ("message.received", {"seq": 2}),
                                                              ("custom.thing", {"x": 1})]
            await h.link.aclose()


async def test_no_answer_to_auth_connect_times_out_and_retries(autojump_clock):
    gw = FakeGateway()
    gw.drop("auth.connect", 1)
    with trio.fail_after(100):
        async with trio.open_nursery() as n:
            h = await started(n, gw, connect_timeout=10)
            await h.link.wait_ready()
            assert gw.attempts == [0, 11] and gw.connections[0].closed_at == 10
            await h.link.aclose()


async def test_a_message_above_max_frame_drops_the_connection_and_it_comes_back_soon(autojump_clock):
    gw = FakeGateway()
    with trio.fail_after(100):
        async with trio.open_nursery() as n:
            h = await started(n, gw, max_frame=1024)
            await h.link.wait_ready()
            gw.push("event/message.received", {"blob": "x" * 2000})
            await gw.wait_until(lambda: gw.sessions == 2)
            assert gw.connections[0].close_code == 1009 and gw.attempts == [0, 1]
            assert h.events == []
            await h.link.aclose()


async def test_a_refused_access_token_is_dropped_and_the_refresh_token_serves(autojump_clock, wall):
    gw = FakeGateway(wall_clock=wall)
    creds = gw.credentials(AID)
    gw._access.clear()  # the gateway forgot the access token (a restart); the refresh token is still known
    with trio.fail_after(100):
        async with trio.open_nursery() as n:
            h = await started(n, gw, creds=creds)
            await h.link.wait_ready()
            assert [c.method for c in gw.calls] == ["auth.connect", "auth.refresh_token", "auth.connect"]
            assert gw.attempts == [0, 1, 1] and len(creds.saved) == 1
            await h.link.aclose()


async def test_the_fake_gateway_docstring_example_runs(autojump_clock):
    """aund.testing.FakeGateway's example, as written there."""
    from aund.aun.auth import GatewayTrust as Trust

    gw = FakeGateway()
    gw.on("meta.status", lambda params: {"mode": "gateway"})
    link = Link(gw.credentials("me.aid.test"), LinkConfig((gw.url,), device_id="dev"),
                Trust([]), connector=gw.connect, rng=lambda: 0.0)
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            await nursery.start(link.run)
            await link.wait_ready()
            gw.close(1006)
            await gw.wait_until(lambda: gw.sessions == 2)
            assert gw.connections[1].opened_at - gw.connections[0].closed_at == 1.0
            assert (await link.call("meta.status"))["mode"] == "gateway"
            await link.aclose()


async def test_a_refused_gateway_fails_over_to_the_next_candidate(autojump_clock):
    first, second = FakeGateway("ws://127.0.0.1:9/first"), FakeGateway("ws://127.0.0.1:9/second")
    first.refuse()
    gateways = {gw.url: gw for gw in (first, second)}

    async def connector(nursery, url, **kw):
        return await gateways[url].connect(nursery, url, **kw)

    creds = first.credentials(AID)
    second._access.update(first._access)  # one token service behind both (as a cluster shares it)
    link = Link(creds, LinkConfig((first.url, second.url), device_id="dev1"), GatewayTrust([]),
                connector=connector, rng=lambda: 0.0)
    with trio.fail_after(60):
        async with trio.open_nursery() as n:
            await n.start(link.run)
            await link.wait_ready()
            assert first.attempts == [0] and second.attempts == [1] and link.gateway == second.url
            second.close(1006)  # the next attempt goes back to the first, still refused, then the second
            await second.wait_until(lambda: second.sessions == 2)
            assert first.attempts == [0, 2] and second.attempts == [1, 4]
            await link.aclose()


async def test_notify_writes_one_frame_without_an_id(autojump_clock):
    gw = FakeGateway()
    with trio.fail_after(60):
        async with trio.open_nursery() as n:
            h = await started(n, gw)
            await h.link.wait_ready()
            await h.link.notify("message.typing", {"to": "peer.aid.test"})
            await gw.wait_until(lambda: gw.notifications)
            (note,) = gw.notifications
            assert (note.method, note.params, note.id) == ("message.typing", {"to": "peer.aid.test"}, None)
            assert gw.count("message.typing") == 0  # not a request: nothing was answered
            await h.link.aclose()


async def test_aclose_during_the_handshake_never_lets_the_link_become_ready(autojump_clock):
    """aclose() while auth.connect is on its way (its waiter fails at once) or while the
    post-connect resync runs (the link closes when the resync ends): never ready in between."""
    for phase in ("auth.connect", "resync"):
        gw = FakeGateway()
        resync_started = trio.Event()
        h = Harness(gw)
        if phase == "auth.connect":
            gw.delay("auth.connect", 1.0)
        else:
            async def on_connected(link):
                resync_started.set()
                await trio.sleep(1.0)
            h.link.on_connected = on_connected
        with trio.fail_after(60):
            async with trio.open_nursery() as n:
                await n.start(h.link.run)
                start = trio.current_time()
                if phase == "auth.connect":
                    await gw.wait_until(lambda: gw.count("auth.connect") == 1)
                else:
                    await resync_started.wait()
                await trio.sleep(0.5)
                await h.link.aclose()
                # at once, or when the resync ends; not after the 2 s grace
                assert trio.current_time() - start == (0.5 if phase == "auth.connect" else 1.0), phase
                assert LinkState.READY not in [s for _, s, _ in h.states], phase
                assert h.link.state == LinkState.CLOSED and len(gw.attempts) == 1
                assert gw.connections[0].closed_by == "client"


async def test_calls_made_while_reconnecting_wait_for_ready_within_their_timeout(autojump_clock):
    gw = FakeGateway()
    gw.on("meta.status", lambda params: {"ok": True})
    with trio.fail_after(100):
        async with trio.open_nursery() as n:
            h = await started(n, gw)
            await h.link.wait_ready()
            gw.refuse(2)
            gw.close(1006)  # attempts at 1 (refused), 3 (refused), 7
            await trio.testing.wait_all_tasks_blocked()
            with pytest.raises(RpcTimeout) as info:
                await h.link.call("meta.status", timeout=5)
            assert trio.current_time() == 5 and "queue timeout before send" in str(info.value)
            assert await h.link.call("meta.status", timeout=5) == {"ok": True}
            sent = [c.at for c in gw.calls if c.method == "meta.status"]
            assert sent == [7] and gw.attempts == [0, 1, 3, 7]
            await h.link.aclose()


# --- at scale: the handshake gate, the drop spread, the loop-lag excuse ------------------------------
def test_backoff_spread_widens_only_the_first_retry_after_the_gateway_closed():
    b = link_mod.Backoff(1.0, 16.0, 64.0, rng=lambda: 0.5, spread=10.0)
    b.on_drop(1006)                              # the gateway vanished: 1 + 0.5 * 1 + 0.5 * 10
    assert [b.next_delay(), b.next_delay()] == [6.5, 3.0]
    b.reset()
    b.on_drop(None)                              # our own connect failed: no spread
    assert b.next_delay() == 1.5
    b.reset()
    b.on_drop(1012)                              # a server restart code: its 16 s base, and the spread
    assert b.next_delay() == 16 + 8 + 5
    plain = link_mod.Backoff(1.0, 16.0, 64.0, rng=lambda: 0.5)  # default: the SDK's schedule
    plain.on_drop(1006)
    assert plain.next_delay() == 1.5


async def test_the_connect_gate_bounds_handshakes_in_progress_across_links(autojump_clock):
    """6 links, a gate of 2, every auth.connect answered after 5 s: ready in pairs at 5, 10, 15 s;
    the gate is free again once they are ready (the resync is not handshake work)."""
    gw = FakeGateway()
    gw.delay("auth.connect", 5)
    gate = trio.CapacityLimiter(2)
    ready: list[float] = []
    with trio.fail_after(100):
        async with trio.open_nursery() as n:
            links = []
            for i in range(6):
                aid = f"gate{i}.aid.test"
                link = Link(gw.credentials(aid), LinkConfig((gw.url,), device_id="dev1"), GatewayTrust([]),
                            connector=gw.connect, rng=lambda: 0.0, connect_gate=gate)
                await n.start(link.run)
                links.append(link)

            async def wait(link: Link) -> None:
                await link.wait_ready()
                ready.append(trio.current_time())
            async with trio.open_nursery() as waiters:
                for link in links:
                    waiters.start_soon(wait, link)
            assert ready == [5, 5, 10, 10, 15, 15]
            assert gate.borrowed_tokens == 0
            for link in links:
                await link.aclose()


async def test_a_refused_handshake_gives_its_gate_token_back(autojump_clock):
    gw = FakeGateway()
    gw.refuse(3)
    gate = trio.CapacityLimiter(1)
    with trio.fail_after(100):
        async with trio.open_nursery() as n:
            h = Harness(gw)
            h.link.connect_gate = gate
            await n.start(h.link.run)
            await h.link.wait_ready()
            assert gw.refused == 3 and gate.borrowed_tokens == 0
            await h.link.aclose()


async def test_a_pong_timeout_while_the_loop_runs_late_is_excused_three_times(autojump_clock):
    """The loop is late all along (a LoopLag noting 1 s lag every second): the pong timeouts at
    130, 170 and 210 are excused (ping again), the fourth (250) drops the link."""
    gw = FakeGateway()
    lag = link_mod.LoopLag(threshold=0.5)

    async def late_loop() -> None:
        while True:
            await trio.sleep(1)
            lag.note(1.0, trio.current_time())
    with trio.fail_after(1000):
        async with trio.open_nursery() as n:
            n.start_soon(late_loop)
            h = Harness(gw, heartbeat_interval=30, pong_timeout=10)
            h.link.loop_lag = lag
            await n.start(h.link.run)
            await h.link.wait_ready()
            await trio.sleep(100)
            gw.answer_pings = False
            await gw.wait_until(lambda: gw.sessions == 2)
            first = gw.connections[0]
            assert first.pings == [30, 60, 90, 120, 160, 200, 240]
            assert (first.closed_at, first.closed_by) == (250, "client")
            assert lag.late_count > 200 and lag.max_lag == 1.0
            await h.link.aclose()
            n.cancel_scope.cancel()


async def test_loop_lag_notes_late_wakeups_only(autojump_clock):
    lag = link_mod.LoopLag(tick=0.25, threshold=0.5)
    lag.note(0.1, 5.0)
    assert not lag.late_since(0.0) and lag.max_lag == 0.1
    lag.note(0.7, 6.0)
    assert lag.late_since(6.0) and not lag.late_since(6.5) and lag.last_lag == 0.7 and lag.late_count == 1
    with trio.move_on_after(2):
        await lag.run()               # on the MockClock every wake-up is on time
    assert lag.late_count == 1


async def test_wait_ready_or_forever_returns_at_ready_and_blocks_on_a_failed_link(autojump_clock):
    """What a background loop waits on while its link is down, instead of a timer (no wake-ups)."""
    gw = FakeGateway()
    gw.refuse(2)
    with trio.fail_after(100):
        async with trio.open_nursery() as n:
            h = await started(n, gw)
            await link_mod.wait_ready_or_forever(h.link)
            assert trio.current_time() == 3 and h.link.is_ready
            gw.close(4015)                            # kicked: failed for good
            await h.link.wait_stopped()
            with trio.move_on_after(50) as scope:
                await link_mod.wait_ready_or_forever(h.link)
            assert scope.cancelled_caught
