"""The broker over real Unix sockets: handshake, every op through the real Client and AsyncClient,
concurrency, quotas, policy, slow consumers, cleanup on disconnect, socket hygiene and activation.

The backend is the scripted FakeBackend (answers and faults only); everything else is real.
"""
from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import trio
from structlog.testing import capture_logs

import client_stub._core as client_core
import client_stub.client as client_module
from aund.broker import (
    DISPATCH, CallBorrower, DaemonAlreadyRunning, Limits, Policy, SocketPathInUse, activated_listeners,
    bind_unix,
)
from client_stub import (
    AundError, AsyncClient, Client, DaemonUnavailable, GatewayUnavailable, InvalidParams, LimitsExceeded, NotReady,
    PermissionDenied, ProtocolError, ResourceNotExistError, RpcTimeout, StorageError, UnknownOp, wire,
)
from tests.broker.conftest import in_asyncio, in_thread, wait_until
from tests.broker.fakebackend import FakeBackend
from tests.broker.rawclient import RawConn
from tests.helpers import ROOT, read_line

ALICE = "alice.aid.test"
BOB = "bob.aid.test"


def ping_once(path: Path, **kw) -> float:
    with Client(path, **kw) as aund:
        return aund.ping()


def connect_once(path: Path) -> None:
    with Client(path):
        pass


def events_named(logs: list[dict], name: str) -> list[dict]:
    return [entry for entry in logs if entry["event"] == name]


# --- handshake ---------------------------------------------------------------------------------
async def test_request_before_hello_is_refused_and_closed(start_broker):
    b = await start_broker()
    with trio.fail_after(10), capture_logs() as logs:
        raw = await RawConn.open(b.path)
        await raw.send(wire.make_request(7, "ping"))
        frames = await raw.read_until_eof()
        await raw.aclose()
        # a frame of the wrong kind first is a violation too
        raw = await RawConn.open(b.path)
        await raw.send(wire.make_reply(1, {}))
        frames2 = await raw.read_until_eof()
        await raw.aclose()
    assert len(frames) == 1 and frames[0]["kind"] == "err" and frames[0]["id"] is None
    assert isinstance(wire.validate_reply(frames[0]).exception(), ProtocolError)
    assert "hello" in frames[0]["error"]["message"]
    assert len(frames2) == 1 and frames2[0]["error"]["type"] == "ProtocolError"
    assert len(events_named(logs, "broker.protocol_violation")) == 2
    assert b.server.statistics().protocol_violations == 2


async def test_silent_connection_is_closed_after_hello_timeout(start_broker):
    b = await start_broker(limits=Limits(hello_timeout=0.2))
    with trio.fail_after(10):
        raw = await RawConn.open(b.path)
        frames = await raw.read_until_eof()  # says nothing at all
        await raw.aclose()
        await wait_until(lambda: not b.server.apps)
    assert len(frames) == 1 and frames[0]["id"] is None
    assert frames[0]["error"]["type"] == "ProtocolError" and "no hello" in frames[0]["error"]["message"]


async def test_version_negotiation_failure(start_broker):
    b = await start_broker()
    with trio.fail_after(10):
        raw = await RawConn.open(b.path)
        await raw.send(wire.make_request(1, "hello", {"protocol": 9, "min_protocol": 7, "app": "future"}))
        frames = await raw.read_until_eof()
        await raw.aclose()
    assert len(frames) == 1 and frames[0]["kind"] == "err" and frames[0]["id"] == 1
    exc = wire.validate_reply(frames[0]).exception()
    assert isinstance(exc, ProtocolError)
    assert exc.data == {"client": [7, 9], "server": [wire.MIN_PROTOCOL_VERSION, wire.PROTOCOL_VERSION]}


async def test_hello_reply_and_negotiated_frame_limit(start_broker):
    b = await start_broker()
    with trio.fail_after(10):
        raw = await RawConn.open(b.path)
        hello = await raw.hello("small-frames", max_frame=8192)
        assert hello["max_frame"] == 8192
        assert (await raw.request(2, "ping"))["result"] == {"pong": True}
        # a hello again is an ordinary error; the connection stays
        again = await raw.request(3, "hello", {"protocol": 1, "min_protocol": 1, "app": "x"})
        assert again["error"]["type"] == "InvalidParams"
        # larger than the negotiated 8 KiB: a protocol violation
        await raw.send(wire.make_request(4, "ping", {"pad": "x" * 9000}))
        frames = await raw.read_until_eof()
        await raw.aclose()
    assert hello["protocol"] == wire.PROTOCOL_VERSION
    assert hello["ops"] == sorted(DISPATCH) and "session.wait_ready" in hello["ops"]
    assert "fake" in hello["features"] and "subscriptions" in hello["features"]
    assert hello["daemon_version"] == "0.0.0-fake" and hello["limits"]["calls"] == 64
    assert [f["error"]["type"] for f in frames] == ["ProtocolError"]
    assert frames[0]["error"]["data"]["max_frame"] == 8192


# --- every op through the real clients ---------------------------------------------------------
async def test_every_op_through_blocking_client(start_broker):
    b = await start_broker()
    b.backend.identities[BOB] = {"aid": BOB, "cert_fingerprint": "sha256:b"}

    def app() -> dict:
        out: dict = {}
        with Client(b.path, app="blocking-app") as aund:
            out["hello"] = aund.hello
            out["rtt"] = aund.ping()
            out["ensure"] = aund.ensure_identity(ALICE)
            out["list"] = aund.list_identities()
            out["status"] = aund.status()
            with pytest.raises(ResourceNotExistError):
                aund.agent_md(ALICE)
            out["card_set"] = aund.set_agent_md(ALICE, "---\naid: x\n---\n")
            out["card"] = aund.agent_md(ALICE)
            with pytest.raises(InvalidParams):
                aund.set_agent_md(ALICE, "no front matter")
            with pytest.raises(InvalidParams):
                aund.set_agent_md(ALICE, "")
            s = aund.session(ALICE, slot_id="main")
            out["ready"] = s.wait_ready(timeout=5)
            out["echo"] = s.call("echo", {"x": [1, 2]}, timeout=3, background=True)
            s.set_protected_headers({"x-trace": "t1"})
            s.invalidate_prekey_cache(BOB)
            s.call("publish", {"count": 3})
            stream = s.events(consumer="c1", kinds=("message.received",), start="last_ack")
            got = [next(stream) for _ in range(3)]
            got[-1].ack()
            out["events"] = [(e.kind, e.cursor, e.data) for e in got]
            out["during"] = trio.from_thread.run_sync(lambda: b.app("blocking-app").statistics())
            stream.close()
            s.close()
            with pytest.raises(UnknownOp):
                aund.request("no.such.op")
            with pytest.raises(InvalidParams):
                aund.request("session.open", {"aid": 5})
            with pytest.raises(ResourceNotExistError):
                aund.request("call", {"session": 99, "method": "echo"})
            out["rtt2"] = aund.ping()
            out["after"] = trio.from_thread.run_sync(lambda: b.app("blocking-app").statistics())
        return out

    with trio.fail_after(20):
        out = await in_thread(app)
        await wait_until(lambda: not b.server.apps)
    assert out["hello"]["protocol"] == 1 and out["rtt"] > 0 and out["rtt2"] > 0
    assert out["ensure"]["aid"] == ALICE and out["ensure"]["cert_fingerprint"].startswith("sha256:")
    assert {i["aid"] for i in out["list"]} == {ALICE, BOB}  # the default policy: root and self see all
    assert out["status"]["fake"] is True
    assert out["card"] == out["card_set"] and out["card"]["content"] == "---\naid: x\n---\n"
    assert [a["app"] for a in out["status"]["broker"]["apps"]] == ["blocking-app"]
    assert out["ready"] == {"aid": ALICE, "slot_id": "main", "state": "ready"}
    assert out["echo"]["echo"] == {"x": [1, 2]} and out["echo"]["background"] is True
    assert 2.9 < out["echo"]["timeout"] <= 3
    conn_id = out["echo"]["conn_id"]
    assert b.backend.headers == {(conn_id, ALICE): {"x-trace": "t1"}}
    assert b.backend.invalidated == [(ALICE, BOB)]
    assert out["events"] == [("message.received", i + 1, {"i": i}) for i in range(3)]
    assert b.backend.acks == {(ALICE, "c1"): 3}
    assert out["during"].subscriptions == 1 and out["during"].sessions == 1
    assert out["after"].subscriptions == 0 and out["after"].sessions == 0  # unsubscribe, session.close
    assert b.backend.released == [(conn_id, ALICE, "main")]
    assert b.backend.active_subscriptions == 0


async def test_every_op_through_async_client(start_broker):
    b = await start_broker()

    async def app() -> dict:
        out: dict = {}
        async with AsyncClient(b.path, app="async-app") as aund:
            out["hello"] = aund.hello
            out["rtt"] = await aund.ping()
            out["ensure"] = await aund.ensure_identity(ALICE)
            out["list"] = await aund.list_identities()
            out["status"] = await aund.status()
            out["card_set"] = await aund.set_agent_md(ALICE, "---\naid: y\n---\n")
            out["card"] = await aund.agent_md(ALICE)
            with pytest.raises(InvalidParams):
                await aund.set_agent_md(ALICE, "x" * (64 * 1024 + 1))
            s = aund.session(ALICE)
            out["ready"] = await s.wait_ready(timeout=5)
            out["echo"] = await s.call("echo", {"y": "z"})
            await s.set_protected_headers({"x-a": "b"})
            await s.invalidate_prekey_cache(BOB)
            await s.call("publish", {"count": 4, "kind": "message.received"})
            await s.call("publish", {"count": 1, "kind": "group.message"})
            got = []
            async with s.events(consumer="c2", kinds=("message.received",), start=1) as stream:
                async for ev in stream:
                    got.append((ev.kind, ev.cursor))
                    if len(got) == 3:
                        await ev.ack()
                        break
            out["events"] = got
            with pytest.raises(UnknownOp):
                await aund.request("nope")
            with pytest.raises(InvalidParams):
                await aund.request("subscribe", {"aid": ALICE, "consumer": "c", "start": "yesterday"})
            with pytest.raises(ResourceNotExistError):
                await aund.request("unsubscribe", {"sub": 12345})
            # ack by subscription id, straight through the generic request
            sub = await aund.request("subscribe", {"aid": ALICE, "consumer": "c3", "start": "now"})
            out["ack_by_sub"] = await aund.request("ack", {"sub": sub["sub"], "cursor": 2})
            await aund.request("unsubscribe", {"sub": sub["sub"]})
            await s.close()
            out["rtt2"] = await aund.ping()
        return out

    with trio.fail_after(20):
        out = await in_asyncio(app)
        await wait_until(lambda: not b.server.apps)
    assert out["hello"]["ops"] == sorted(DISPATCH) and out["rtt"] > 0
    assert out["ensure"]["aid"] == ALICE and out["list"] == [out["ensure"]]
    assert out["status"]["broker"]["apps"][0]["app"] == "async-app"
    assert out["card"] == out["card_set"] and out["card"]["etag"].startswith('"')
    assert out["ready"]["state"] == "ready"
    assert out["echo"]["echo"] == {"y": "z"} and out["echo"]["timeout"] is None
    assert list(b.backend.headers.values()) == [{"x-a": "b"}]
    assert b.backend.invalidated == [(ALICE, BOB)]
    assert out["events"] == [("message.received", 2), ("message.received", 3), ("message.received", 4)]
    assert b.backend.acks == {(ALICE, "c2"): 4, (ALICE, "c3"): 2}
    assert out["ack_by_sub"] == {"cursor": 2}
    assert len(b.backend.released) == 1
    await wait_until(lambda: b.backend.active_subscriptions == 0)


async def test_async_client_event_kinds_and_start(start_broker):
    """`start` as a cursor skips what came before it; `kinds` filters."""
    b = await start_broker()
    for i in range(3):
        b.backend.publish(ALICE, "message.received", {"n": i})
    b.backend.publish(ALICE, "group.message", {"n": 3})
    b.backend.publish(ALICE, "message.received", {"n": 4})

    async def app() -> list:
        async with AsyncClient(b.path, app="kinds") as aund:
            stream = aund.session(ALICE).events("k", kinds=["message.received"], start=1)
            got = [await stream.get(timeout=5) for _ in range(3)]
            await stream.aclose()
            return [(e.kind, e.cursor, e.data["n"]) for e in got]

    with trio.fail_after(15):
        got = await in_asyncio(app)
    assert got == [("message.received", 2, 1), ("message.received", 3, 2), ("message.received", 5, 4)]


# --- concurrency -------------------------------------------------------------------------------
async def test_concurrent_calls_on_one_connection(start_broker):
    b = await start_broker()
    n_threads, n_async = 12, 40
    with trio.fail_after(20):
        aund = await in_thread(lambda: Client(b.path, app="threads").connect())  # never block the trio thread
        session = aund.session(ALICE)
        results: list = []
        async with trio.open_nursery() as nursery:
            for _ in range(n_threads):
                nursery.start_soon(lambda: _append(results, in_thread(session.call, "hold", timeout=30)))
            await wait_until(lambda: b.backend.in_flight == n_threads)
            assert b.app("threads").statistics().calls_in_flight == n_threads
            b.backend.gate.set()
        await in_thread(aund.close)
        assert results == [{"held": True}] * n_threads
        b.backend.gate = trio.Event()

        async def gather_holds() -> list:
            async with AsyncClient(b.path, app="tasks") as aund:
                s = aund.session(ALICE)
                return await asyncio.gather(*(s.call("hold") for _ in range(n_async)))

        async with trio.open_nursery() as nursery:
            out: list = []
            nursery.start_soon(lambda: _append(out, in_asyncio(gather_holds)))
            await wait_until(lambda: b.backend.in_flight == n_async)
            b.backend.gate.set()
    assert out == [[{"held": True}] * n_async]
    assert b.backend.max_in_flight == n_async


async def _append(results: list, awaitable) -> None:
    results.append(await awaitable)


# --- quotas and the global limiter --------------------------------------------------------------
async def test_quotas_exact_limit_ok_one_more_refused(start_broker):
    b = await start_broker(limits=Limits(calls_per_app=4, subscriptions_per_app=2, sessions_per_app=2))

    async def app() -> dict:
        out: dict = {}
        async with AsyncClient(b.path, app="greedy") as aund:
            s = aund.session(ALICE)
            await s.open()
            holds = [asyncio.ensure_future(s.call("hold")) for _ in range(4)]
            while (await aund.status())["broker"]["apps"][0]["calls_in_flight"] < 4:
                await asyncio.sleep(0.005)
            for _ in range(2):
                with pytest.raises(LimitsExceeded) as info:
                    await s.call("echo")
            out["calls_error"] = info.value.data
            for consumer in ("a", "b"):
                await aund.request("subscribe", {"aid": ALICE, "consumer": consumer})
            with pytest.raises(LimitsExceeded) as info:
                await aund.request("subscribe", {"aid": ALICE, "consumer": "c"})
            out["subs_error"] = info.value.data
            await aund.session(ALICE, "second").open()
            with pytest.raises(LimitsExceeded):
                await aund.session(ALICE, "third").open()
            trio.from_thread.run_sync(b.backend.gate.set)
            out["held"] = await asyncio.gather(*holds)
            out["echo"] = await s.call("echo")  # the budget is back
        return out

    with trio.fail_after(20), capture_logs() as logs:
        out = await in_asyncio(app)
    assert out["calls_error"] == {"quota": "calls", "limit": 4}
    assert out["subs_error"] == {"quota": "subscriptions", "limit": 2}
    assert out["held"] == [{"held": True}] * 4 and "echo" in out["echo"]
    hits = events_named(logs, "broker.limits_exceeded")
    assert sorted(h["quota"] for h in hits) == ["calls", "sessions", "subscriptions"]  # one line per quota


async def test_global_limiter_shared_between_apps(start_broker):
    b = await start_broker(limits=Limits(global_calls=3))
    with trio.fail_after(20):
        a1 = await in_thread(lambda: Client(b.path, app="app1").connect())
        a2 = await in_thread(lambda: Client(b.path, app="app2").connect())
        s1, s2 = a1.session(ALICE), a2.session(BOB)
        async with trio.open_nursery() as nursery:
            for s in (s1, s1, s2, s2):
                nursery.start_soon(in_thread, s.call, "hold")
            await wait_until(lambda: b.limiter.statistics().borrowed_tokens == 3
                             and b.limiter.statistics().tasks_waiting == 1)
            borrowers = b.limiter.statistics().borrowers
            assert all(isinstance(x, CallBorrower) for x in borrowers)
            assert {x.app for x in borrowers} == {"app1", "app2"}
            assert b.server.statistics().calls_waiting == 1
            with pytest.raises(RpcTimeout) as info:  # queued behind the others, then timed out
                await in_thread(s2.call, "echo", timeout=0.2)
            assert info.value.data["queue"] == "global" and info.value.retryable
            b.backend.gate.set()
        await in_thread(a1.close)
        await in_thread(a2.close)
    assert b.limiter.statistics().borrowed_tokens == 0 and b.server.statistics().calls_in_flight == 0
    assert b.backend.calls_started == 4


async def test_max_connections(start_broker):
    b = await start_broker(limits=Limits(max_connections=2))
    with trio.fail_after(10), capture_logs() as logs:
        raws = [await RawConn.open(b.path) for _ in range(2)]
        for raw in raws:
            await raw.hello()
        with pytest.raises(LimitsExceeded) as info:
            await in_thread(connect_once, b.path)
        with pytest.raises(LimitsExceeded):
            await in_thread(connect_once, b.path)
        await raws[0].aclose()
        await wait_until(lambda: len(b.server.apps) == 1)
        rtt = await in_thread(ping_once, b.path)
        await raws[1].aclose()
    assert info.value.data == {"quota": "connections", "limit": 2} and rtt > 0
    assert len(events_named(logs, "broker.connection_rejected")) == 1
    assert b.server.statistics().connections_rejected == 2


# --- policy ------------------------------------------------------------------------------------
async def test_permission_denied_is_logged_once(start_broker):
    uid = os.getuid()
    policy = Policy({ALICE: {"uids": [uid]}, "*.other.aid.test": {"uids": [uid + 1]}}, owners={4242})
    backend = FakeBackend(policy)
    backend.identities.update({BOB: {"aid": BOB}, ALICE: {"aid": ALICE}})
    b = await start_broker(backend=backend)

    def app() -> dict:
        with Client(b.path, app="nosy") as aund:
            for _ in range(3):
                with pytest.raises(PermissionDenied) as info:
                    aund.session(BOB).open()
            with pytest.raises(PermissionDenied):
                aund.ensure_identity(BOB)
            with pytest.raises(PermissionDenied):
                aund.request("subscribe", {"aid": BOB, "consumer": "x"})
            return {"error": info.value, "list": aund.list_identities(), "ok": aund.session(ALICE).open()}

    with trio.fail_after(10), capture_logs() as logs:
        out = await in_thread(app)
    assert out["error"].data == {"aid": BOB} and not out["error"].retryable
    assert [i["aid"] for i in out["list"]] == [ALICE]  # others' identities are not listed
    assert out["ok"]["aid"] == ALICE
    denials = events_named(logs, "broker.permission_denied")
    assert len(denials) == 1
    assert denials[0]["aid"] == BOB and denials[0]["uid"] == uid and denials[0]["pid"] == os.getpid()


async def test_policy_refuses_connections_of_unknown_uids(start_broker):
    b = await start_broker(policy=Policy(owners={4242}))
    with trio.fail_after(10), capture_logs() as logs:
        with pytest.raises(PermissionDenied) as info:
            await in_thread(connect_once, b.path)
    assert info.value.data == {"uid": os.getuid()}
    assert [e["reason"] for e in events_named(logs, "broker.connection_rejected")] == ["policy"]


async def test_set_policy_takes_away_what_the_new_policy_no_longer_allows(start_broker):
    """One AID taken away ends its session, subscription and call
    in flight and nothing else; the uid no longer admitted loses its connection."""
    import threading

    uid = os.getuid()
    both = Policy({ALICE: {"uids": [uid]}, BOB: {"uids": [uid]}}, owners={4242})
    backend = FakeBackend(both)
    b = await start_broker(backend=backend, policy=both)
    step, out = threading.Event(), {}

    def outcome(fn) -> str:
        try:
            fn()
        except AundError as exc:
            return type(exc).__name__
        return "ok"

    def app() -> None:
        with Client(b.path, app="loser", reconnect_attempts=0) as aund:
            alice, bob = aund.session(ALICE), aund.session(BOB)
            alice.open(), bob.open()
            sub_a = alice.events("c", start="now").open()
            sub_b = bob.events("c", start="now").open()
            held = threading.Thread(target=lambda: out.__setitem__("held", outcome(lambda: bob.call("hold", {}, 30))))
            held.start()
            step.wait(10)  # the trio side took BOB away
            step.clear()
            held.join(10)
            out["sub_b"] = outcome(lambda: sub_b.get(timeout=5))
            out["call_b"] = outcome(lambda: bob.call("echo", {}))
            out["call_a"] = outcome(lambda: alice.call("echo", {}))
            alice.call("publish", {"count": 1})
            out["event_a"] = sub_a.get(timeout=5).kind
            step.wait(10)  # the trio side took everything away
            out["sub_a"] = outcome(lambda: sub_a.get(timeout=5))
            out["after"] = outcome(lambda: alice.call("echo", {}))

    with trio.fail_after(20), capture_logs() as logs:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(in_thread, app)
            await wait_until(lambda: backend.in_flight == 1)
            backend.policy = Policy({ALICE: {"uids": [uid]}}, owners={4242})
            b.server.set_policy(backend.policy)
            step.set()
            await wait_until(lambda: "event_a" in out)
            backend.policy = Policy(owners={4242})
            b.server.set_policy(backend.policy)
            step.set()
    assert out == {"held": "PermissionDenied", "sub_b": "PermissionDenied", "call_b": "PermissionDenied",
                   "call_a": "ok", "event_a": "message.received", "sub_a": "PermissionDenied",
                   "after": "PermissionDenied"}, out
    assert backend.calls_cancelled == 1 and (backend.opened[1][1], backend.released[0][1]) == (BOB, BOB)
    revoked = events_named(logs, "broker.access_revoked")
    assert [(e["scope"], e.get("aids")) for e in revoked] == [("aid", [BOB]), ("aid", [ALICE]), ("connection", None)]
    assert not b.server.apps


def test_policy_rules():
    p = Policy({"alice.aid.test": {"uids": [1000]}, "*.bots.aid.test": {"gids": [50], "uids": ["root"]}},
               owners={7})
    assert p.allows(7, 7, "anything.aid.test")
    assert p.allows(1000, 1, "alice.aid.test") and not p.allows(1000, 1, "bob.aid.test")
    assert p.allows(5, 50, "x.bots.aid.test") and p.allows(0, 1, "y.bots.aid.test")
    assert not p.allows(5, 51, "x.bots.aid.test") and not p.allows(0, 0, "alice.aid.test")
    assert p.admits(1000, 1) and p.admits(9, 50) and not p.admits(9, 9)
    assert p.allows(5, 51, "x.bots.aid.test", groups=(9, 50)) and p.admits(9, 9, groups=[50])  # supplementary
    assert Policy({"Alice.AID.test": {"uids": [1]}}).allows(1, 1, "alice.aid.test")  # keys compare lower-case
    assert p == Policy({"*.bots.aid.test": {"gids": [50], "uids": ["root"]}, "alice.aid.test": {"uids": [1000]}},
                       owners={7}) != Policy(owners={7})
    assert Policy().allows(os.geteuid(), 0, "x.aid.test") and Policy().allows(0, 0, "x.aid.test")
    assert not Policy().allows(os.geteuid() + 12345, 5, "x.aid.test")
    for bad in ({"a": {"uids": 5}}, {"a": {"users": [1]}}, {"a": {"uids": ["no-such-user-xyz"]}}, {"": {}}):
        with pytest.raises(ValueError):
            Policy(bad)


# --- slow consumers ----------------------------------------------------------------------------
async def test_stalled_consumer_is_disconnected_and_others_keep_going(start_broker):
    limits = Limits(outbox_bytes_per_app=64 * 1024, stall_timeout=1.5)
    b = await start_broker(limits=limits)
    with trio.fail_after(30), capture_logs() as logs:
        stalled = await RawConn.open(b.path)
        await stalled.hello("stalled")
        assert (await stalled.request(1, "subscribe", {"aid": BOB, "consumer": "s", "start": "now"}))["kind"] == "rep"
        stalled_conn = b.app("stalled").app.conn_id
        subscribed = trio.Event()

        def healthy() -> dict:
            with Client(b.path, app="healthy") as aund:
                stream = aund.session(ALICE).events("h", start="now").open()
                assert stream.get(timeout=0.01) is None  # nothing there yet
                trio.from_thread.run_sync(subscribed.set)
                got = [stream.get(timeout=10) for _ in range(50)]
                still_there = trio.from_thread.run_sync(lambda: stalled_conn in b.server.apps)
                stream.close()
                while trio.from_thread.run_sync(lambda: stalled_conn in b.server.apps):
                    time.sleep(0.01)
                return {"cursors": [e.cursor for e in got], "still_there": still_there,
                        "echo": aund.session(ALICE).call("echo", {"after": True})}

        out: dict = {}
        async with trio.open_nursery() as nursery:
            nursery.start_soon(lambda: _store(out, "healthy", in_thread(healthy)))
            await subscribed.wait()
            for i in range(400):  # ~1.6 MB for an app that reads nothing
                b.backend.publish(BOB, "message.received", {"blob": "x" * 4000, "i": i})
            for i in range(50):
                b.backend.publish(ALICE, "message.received", {"i": i})
            await wait_until(lambda: stalled_conn not in b.server.apps)
        # the stalled app sees what was buffered, then the end of the connection
        rest = await stalled.read_until_eof()
        await stalled.aclose()
    assert out["healthy"]["cursors"] == list(range(1, 51))
    assert out["healthy"]["still_there"] is True  # the healthy app was served while the other stalled
    assert out["healthy"]["echo"]["echo"] == {"after": True}
    assert 0 < len(rest) < 400
    assert b.server.statistics().stalled_disconnects == 1
    stalls = events_named(logs, "broker.consumer_stalled")
    assert len(stalls) == 1 and stalls[0]["app"] == "stalled"
    assert b.backend.active_subscriptions == 0


async def _store(out: dict, key: str, awaitable) -> None:
    out[key] = await awaitable


async def test_request_flood_without_reading_is_cut_off(start_broker):
    """The reader stops taking requests while replies pile up unread, then hangs up after stall_timeout."""
    b = await start_broker(limits=Limits(outbox_bytes_per_app=16 * 1024, max_frame=64 * 1024, stall_timeout=0.5))
    with trio.fail_after(20), capture_logs() as logs:
        flooder = await RawConn.open(b.path)
        await flooder.hello("flooder")
        conn_id = b.app("flooder").app.conn_id
        status = wire.encode_frame(wire.make_request(1, "status"))
        with pytest.raises(trio.BrokenResourceError):
            for _ in range(200):  # the daemon stops reading; then it hangs up
                await flooder.send_raw(status * 500)
        await wait_until(lambda: conn_id not in b.server.apps)
        await flooder.aclose()
        rtt = await in_thread(ping_once, b.path)
    assert rtt > 0
    assert [e["app"] for e in events_named(logs, "broker.consumer_stalled")] == ["flooder"]


async def test_big_replies_unread_overflow_the_outbox(start_broker):
    """Replies of requests already in flight cannot wait: past outbox + one frame the app is cut off."""
    b = await start_broker(limits=Limits(outbox_bytes_per_app=16 * 1024, max_frame=64 * 1024))
    with trio.fail_after(20), capture_logs() as logs:
        raw = await RawConn.open(b.path)
        await raw.hello("hoarder")
        conn_id = b.app("hoarder").app.conn_id
        await raw.request(1, "session.open", {"aid": ALICE})
        blob = {"session": 1, "method": "blob", "params": {"size": 60_000}}
        try:
            for i in range(60):  # ~3.6 MB of replies the app never reads
                await raw.send(wire.make_request(f"b{i}", "call", blob))
        except trio.BrokenResourceError:
            pass  # cut off already
        finally:
            await wait_until(lambda: conn_id not in b.server.apps)
            await raw.aclose()
        rtt = await in_thread(ping_once, b.path)
    assert rtt > 0 and b.backend.released and b.limiter.statistics().borrowed_tokens == 0
    assert len(events_named(logs, "broker.outbox_overflow")) == 1


# --- disconnects release everything --------------------------------------------------------------
async def _hold_everything(raw: RawConn) -> None:
    await raw.hello("holder")
    for i, slot in enumerate(("a", "b")):
        assert (await raw.request(f"open{i}", "session.open", {"aid": ALICE, "slot_id": slot}))["kind"] == "rep"
    for consumer in ("c1", "c2"):
        assert (await raw.request(consumer, "subscribe", {"aid": ALICE, "consumer": consumer}))["kind"] == "rep"
    for i in range(3):
        await raw.send(wire.make_request(f"hold{i}", "call", {"session": 1, "method": "hold"}))


def _assert_released(b) -> None:
    stats = b.server.statistics()
    assert stats.apps == () and stats.calls_in_flight == 0
    assert b.limiter.statistics().borrowed_tokens == 0
    assert b.backend.calls_cancelled == 3 and b.backend.in_flight == 0
    assert sorted(slot for _, _, slot in b.backend.released) == ["a", "b"]
    assert b.backend.active_subscriptions == 0


@pytest.mark.parametrize("how", ["clean", "error"])
async def test_disconnect_releases_everything(start_broker, how):
    b = await start_broker()
    with trio.fail_after(15):
        raw = await RawConn.open(b.path)
        await _hold_everything(raw)
        await wait_until(lambda: b.backend.in_flight == 3)
        st = b.app("holder").statistics()
        assert (st.sessions, st.subscriptions, st.calls_in_flight) == (2, 2, 3)
        assert b.limiter.statistics().borrowed_tokens == 3
        if how == "clean":
            await raw.aclose()
        else:
            await raw.send_raw(b"\x00\x00\x00\x05garbage")
            await raw.read_until_eof()
            await raw.aclose()
        await wait_until(lambda: not b.server.apps)
    _assert_released(b)


KILLED_APP = """
import sys, threading, time
from client_stub import Client
aund = Client(sys.argv[1], app="doomed").connect()
s1, s2 = aund.session("alice.aid.test", "a"), aund.session("alice.aid.test", "b")
s1.open(); s2.open()
aund.request("subscribe", {"aid": "alice.aid.test", "consumer": "c1"})
aund.request("subscribe", {"aid": "alice.aid.test", "consumer": "c2"})
for _ in range(3):
    threading.Thread(target=s1.call, args=("hold",), daemon=True).start()
time.sleep(60)
"""


async def test_killed_app_releases_everything(start_broker):
    b = await start_broker()
    proc = subprocess.Popen([sys.executable, "-c", KILLED_APP, str(b.path)], cwd=ROOT)
    try:
        with trio.fail_after(20):
            await wait_until(lambda: b.backend.in_flight == 3)
            st = b.app("doomed").statistics()
            assert (st.pid, st.sessions, st.subscriptions, st.calls_in_flight) == (proc.pid, 2, 2, 3)
            proc.kill()
            await in_thread(proc.wait, 10)
            await wait_until(lambda: not b.server.apps)
    finally:
        proc.kill()
        proc.wait()
    _assert_released(b)


# --- events: errors, oversize, overflow, reconnect ---------------------------------------------
async def test_subscription_error_ends_the_iterator(start_broker):
    b = await start_broker()
    b.backend.subscribe_error = StorageError("inbox unreadable")

    def app():
        with Client(b.path) as aund:
            with pytest.raises(StorageError) as info:
                next(aund.session(ALICE).events("e"))
            return info.value, aund.status()["broker"]["apps"][0]["subscriptions"]

    with trio.fail_after(10):
        error, subs = await in_thread(app)
    assert error.message == "inbox unreadable" and error.retryable and subs == 0


async def test_oversize_event_becomes_a_stub_the_app_can_ack(start_broker):
    b = await start_broker(limits=Limits(max_frame=64 * 1024, outbox_bytes_per_app=64 * 1024))
    b.backend.publish(ALICE, "message.received", {"blob": "x" * 100_000})
    b.backend.publish(ALICE, "message.received", {"small": 1})

    def app():
        with Client(b.path) as aund:
            stream = aund.session(ALICE).events("big")
            first, second = next(stream), next(stream)
            first.ack()
            with pytest.raises(LimitsExceeded):  # a reply over max_frame is an error, not a hang-up
                aund.session(ALICE).call("blob", {"size": 100_000})
            return first, second, aund.ping()

    with trio.fail_after(10), capture_logs() as logs:
        first, second, rtt = await in_thread(app)
    assert (first.kind, first.cursor) == ("event.undeliverable", 1)
    assert first.data == {"kind": "message.received", "reason": "too_large"}
    assert (second.kind, second.cursor, second.data) == ("message.received", 2, {"small": 1})
    assert b.backend.acks[(ALICE, "big")] == 1 and rtt > 0
    assert len(events_named(logs, "broker.event_undeliverable")) == 1


async def test_client_side_overflow_resubscribes_without_gaps(start_broker, monkeypatch):
    monkeypatch.setattr(client_core, "EVENT_QUEUE_MAX", 5)
    b = await start_broker()
    for i in range(60):
        b.backend.publish(ALICE, "message.received", {"i": i})
    subscribes = []
    original = b.backend.subscribe
    b.backend.subscribe = lambda *a: (subscribes.append(a[-1]), original(*a))[1]

    def app():
        with Client(b.path) as aund:
            stream = aund.session(ALICE).events("slow", start=0)
            return [next(stream).cursor for _ in range(60)]

    with trio.fail_after(15):
        cursors = await in_thread(app)
    assert cursors == list(range(1, 61))
    assert len(subscribes) > 1 and subscribes[0] == 0 and all(isinstance(s, int) for s in subscribes)


async def test_events_iterator_survives_a_daemon_restart(start_broker):
    backend = FakeBackend()
    first = await start_broker(backend=backend)
    path = first.path
    for i in range(2):
        backend.publish(ALICE, "message.received", {"i": i})
    got: list = []

    def app():
        with Client(path, app="survivor", reconnect_attempts=30) as aund:
            session = aund.session(ALICE)
            session.open()
            for ev in session.events("durable"):
                got.append(ev.cursor)
                if ev.cursor == 2:
                    ev.ack()
                    acked.set()  # its reply is in: the daemon may go away now
                if ev.cursor == 4:
                    ev.ack()
                    break
            return session.call("echo", {"again": True})  # the session re-opens on the new connection

    out: dict = {}
    acked = threading.Event()
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_store, out, "echo", in_thread(app))
            await wait_until(lambda: backend.acks.get((ALICE, "durable")) == 2 and acked.is_set())
            await first.stop()
            assert not path.exists()  # the socket file went with the daemon
            for i in range(2, 4):
                backend.publish(ALICE, "message.received", {"i": i})
            await start_broker(backend=backend, path=path)
    assert got == [1, 2, 3, 4]
    assert backend.acks[(ALICE, "durable")] == 4
    assert out["echo"]["echo"] == {"again": True} and [aid for _, aid, _ in backend.opened] == [ALICE, ALICE]


async def test_async_events_survive_restart_and_client_overflow(start_broker, monkeypatch):
    """The AsyncClient twin of the two tests above: same resume logic, asyncio I/O."""
    monkeypatch.setattr(client_core, "EVENT_QUEUE_MAX", 4)
    backend = FakeBackend()
    first = await start_broker(backend=backend)
    path = first.path
    for i in range(20):
        backend.publish(ALICE, "message.received", {"i": i})
    starts: list = []
    original = backend.subscribe
    backend.subscribe = lambda *a: (starts.append(a[-1]), original(*a))[1]
    got: list = []

    async def app():
        async with AsyncClient(path, app="async-survivor", reconnect_attempts=30) as aund:
            async for ev in aund.session(ALICE).events("durable"):
                got.append(ev.cursor)
                if ev.cursor in (20, 24):
                    await ev.ack()
                    if ev.cursor == 20:
                        acked.set()  # its reply is in: the daemon may go away now
                if ev.cursor == 24:
                    return

    acked = threading.Event()
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(in_asyncio, app)
            await wait_until(lambda: backend.acks.get((ALICE, "durable")) == 20 and acked.is_set())
            await first.stop()
            for i in range(20, 24):
                backend.publish(ALICE, "message.received", {"i": i})
            await start_broker(backend=backend, path=path)
    assert got == list(range(1, 25))
    assert starts[0] == "last_ack" and 4 in starts and starts[-1] == "last_ack"  # overflow, then restart


async def test_wait_ready_timeout_and_failed_link(start_broker):
    b = await start_broker()
    b.backend.ready = trio.Event()

    def app():
        with Client(b.path) as aund:
            s = aund.session(ALICE)
            with pytest.raises(NotReady) as info:
                s.wait_ready(timeout=0.1)
            trio.from_thread.run_sync(b.backend.ready.set)
            ready = s.wait_ready(timeout=5)
            b.backend.link_failed = True
            with pytest.raises(GatewayUnavailable) as failed:
                s.wait_ready()
            return info.value, ready, failed.value

    with trio.fail_after(10):
        not_ready, ready, failed = await in_thread(app)
    assert not_ready.data["state"] == "connecting" and not_ready.retryable
    assert ready["state"] == "ready" and not failed.retryable


async def test_daemon_unavailable(sock_dir):
    missing = sock_dir / "nothing-here.sock"
    dead = sock_dir / "dead.sock"
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(dead))
    s.close()  # the file stays, nobody listens
    with trio.fail_after(10):
        for path in (missing, dead):
            with pytest.raises(DaemonUnavailable) as info:
                await in_thread(lambda: Client(path).ping())
            assert info.value.socket_path == str(path) and str(path) in str(info.value)
            assert "systemctl" in info.value.hint and info.value.retryable

            async def async_app():
                async with AsyncClient(path):
                    pass

            with pytest.raises(DaemonUnavailable):
                await in_asyncio(async_app)


async def test_in_flight_request_fails_when_daemon_goes_away(start_broker):
    b = await start_broker()

    def app():
        aund = Client(b.path, reconnect_attempts=0).connect()
        try:
            with pytest.raises(DaemonUnavailable):
                aund.session(ALICE).call("hold")
            with pytest.raises(DaemonUnavailable):
                aund.ping()  # reconnecting fails: nothing listens any more
        finally:
            aund.close()
        with pytest.raises(RuntimeError):
            aund.ping()

    with trio.fail_after(15):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(in_thread, app)
            await wait_until(lambda: b.backend.in_flight == 1)
            await b.stop()


# --- sockets -----------------------------------------------------------------------------------
async def test_socket_file_modes_and_unlink_on_exit(start_broker, sock_dir):
    path = sock_dir / "fresh" / "aund.sock"
    b = await start_broker(path=path)
    assert stat.S_ISSOCK(path.stat().st_mode)
    assert stat.S_IMODE(path.stat().st_mode) == 0o660
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o750
    await b.stop()
    assert not path.exists()


async def test_stale_socket_is_replaced(start_broker, sock_dir):
    path = sock_dir / "stale.sock"
    dead = socket.socket(socket.AF_UNIX)
    dead.bind(str(path))
    dead.close()
    b = await start_broker(path=path)
    with trio.fail_after(10):
        rtt = await in_thread(ping_once, path)
    assert rtt > 0 and stat.S_ISSOCK(path.stat().st_mode)
    assert b.server.statistics().connections_total == 1


async def test_live_daemon_is_detected(start_broker, sock_dir):
    b = await start_broker()
    with pytest.raises(DaemonAlreadyRunning) as info:
        bind_unix(b.path)
    assert info.value.path == b.path and "already" in str(info.value)
    not_a_socket = sock_dir / "plain-file"
    not_a_socket.write_text("keep me")
    with pytest.raises(SocketPathInUse):
        bind_unix(not_a_socket)
    assert not_a_socket.read_text() == "keep me"
    with trio.fail_after(10):
        assert await in_thread(ping_once, b.path) > 0  # still serving


ACTIVATE = ("import os, sys; fd = int(sys.argv[1]); os.dup2(fd, 3); fd != 3 and os.close(fd); "
            "os.environ.update(LISTEN_FDS='1', LISTEN_PID=str(os.getpid()), LISTEN_FDNAMES='aund.socket'); "
            "os.execv(sys.executable, [sys.executable, '-m', 'tests.broker.serve_fake', 'unused', '--activated'])")


def test_socket_activation_with_fd_3(sock_dir, tmp_path):
    path = sock_dir / "activated.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(16)
    stderr = open(tmp_path / "serve_fake.stderr", "wb")
    proc = subprocess.Popen([sys.executable, "-c", ACTIVATE, str(listener.fileno())], pass_fds=(listener.fileno(),),
                            stdout=subprocess.PIPE, stderr=stderr, text=True, cwd=ROOT)
    try:
        listener.close()  # only the daemon holds it now
        ready = json.loads(read_line(proc, time.monotonic() + 20))
        assert ready == {"ready": True, "pid": proc.pid, "listeners": 1, "listen_env": []}
        with Client(path, app="activated", timeout=10) as aund:
            assert aund.ping() > 0
            assert aund.session(ALICE).call("echo", {"via": "fd3"})["echo"] == {"via": "fd3"}
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0
        assert path.exists()  # an activated socket belongs to systemd: not unlinked
    finally:
        proc.kill()
        proc.wait()
        proc.stdout.close()
        stderr.close()


def test_activated_listeners_env_handling():
    assert activated_listeners({}) == []
    env = {"LISTEN_PID": str(os.getpid() + 1), "LISTEN_FDS": "1", "LISTEN_FDNAMES": "x", "OTHER": "1"}
    assert activated_listeners(env) == [] and env == {"OTHER": "1"}  # not ours, and unset anyway
    with pytest.raises(ValueError):
        activated_listeners({"LISTEN_PID": "abc", "LISTEN_FDS": "1"})
    a, b = socket.socketpair()
    try:
        with pytest.raises(ValueError, match="not listening"):
            activated_listeners({"LISTEN_PID": str(os.getpid()), "LISTEN_FDS": "1"}, first_fd=a.fileno())
    finally:
        a.close()
        b.close()


def test_default_socket_path_rule_matches_client(monkeypatch):
    from aund.config import default_socket

    monkeypatch.setattr(os, "geteuid", lambda: 0)
    assert default_socket({}) == Path("/run/aund/aund.sock")
    assert client_module.default_socket_path({"AUND_SOCKET": "/x/y.sock"}) == Path("/x/y.sock")
    assert client_module.default_socket_path({}) == default_socket({})
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    monkeypatch.setattr(os, "getuid", lambda: 1000)
    for env in ({"XDG_RUNTIME_DIR": "/run/user/1000"}, {}):
        expected = default_socket(env)
        if not SYSTEM_EXISTS:
            assert client_module.default_socket_path(env) == expected
    assert default_socket({"XDG_RUNTIME_DIR": "/r"}) == Path("/r/aund/aund.sock")
    # no fixed name under /tmp that another uid can create first
    assert default_socket({"HOME": "/home/u"}) == Path("/home/u/.local/state/aund/run/aund.sock")
    assert default_socket({"HOME": "/home/u", "XDG_STATE_HOME": "/s"}) == Path("/s/aund/run/aund.sock")
    assert default_socket({"HOME": "/home/u", "XDG_RUNTIME_DIR": "relative"}) == \
        Path("/home/u/.local/state/aund/run/aund.sock")


SYSTEM_EXISTS = Path("/run/aund/aund.sock").exists()


def test_statistics_and_repr_summarise_state():
    from aund.broker import BrokerServer

    server = BrokerServer(FakeBackend(), limits=Limits(global_calls=7))
    stats = server.statistics()
    assert stats.connections == 0 and stats.global_calls == 7 and stats.as_dict()["apps"] == []
    assert repr(server) == "<BrokerServer 0 apps | calls 0/7, 0 waiting>"
    with pytest.raises(ValueError):
        Limits(calls_per_app=0)
    with pytest.raises(ValueError):
        Limits(calls_per_app=10, requests_per_app=5)
