"""Where the generated blocking client and its asyncio source must differ (client_stub._thread_io /
_asyncio_io): asyncio cancellation, ``hello`` before connecting, the names a client gives itself.
Real broker, real Unix socket, the scripted FakeBackend."""
from __future__ import annotations

import asyncio

import pytest
import trio

from client_stub import AsyncClient, Client
from tests.broker.conftest import in_asyncio, in_thread

ALICE = "alice.aid.test"


async def test_a_cancelled_asyncio_call_or_get_leaves_the_client_usable(start_broker):
    b = await start_broker()

    async def app() -> dict:
        out: dict = {}
        async with AsyncClient(b.path, app="canceller") as aund:
            s = aund.session(ALICE)
            await s.open()
            held = asyncio.ensure_future(s.call("hold"))
            while (await aund.status())["broker"]["apps"][0]["calls_in_flight"] < 1:
                await asyncio.sleep(0.005)
            held.cancel()
            with pytest.raises(asyncio.CancelledError):
                await held
            out["pending_after_cancel"] = dict(aund._conn.core._pending)
            out["echo"] = await s.call("echo", {"after": "cancel"})

            stream = await s.events("c", start="now").open()
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(stream.get(), 0.05)  # cancels the waiting get
            out["quiet"] = await stream.get(timeout=0.05)
            await s.call("publish", {"count": 1})
            ev = await stream.get(timeout=5)
            out["event"] = (ev.kind, ev.cursor)
            await stream.aclose()

            trio.from_thread.run_sync(b.backend.gate.set)  # the cancelled call's late reply is dropped
            out["rtt"] = await aund.ping()
        return out

    with trio.fail_after(20):
        out = await in_asyncio(app)
    assert out["pending_after_cancel"] == {}
    assert out["echo"]["echo"] == {"after": "cancel"}
    assert out["quiet"] is None and out["event"] == ("message.received", 1)
    assert out["rtt"] > 0


async def test_hello_names_and_closed_errors_per_flavour(start_broker):
    b = await start_broker()

    def blocking() -> tuple:
        aund = Client(b.path, app="sync-hello")
        idle = repr(aund)
        hello = aund.hello  # connects for it
        connected = repr(aund)
        aund.close()
        with pytest.raises(RuntimeError, match="this aund Client is closed"):
            aund.ping()
        return idle, hello, connected, repr(aund), repr(aund.session(ALICE))

    async def nonblocking() -> tuple:
        aund = AsyncClient(b.path, app="async-hello")
        with pytest.raises(RuntimeError, match="not connected yet"):
            aund.hello  # noqa: B018 (a property cannot await the connect)
        await aund.connect()
        hello, connected = aund.hello, repr(aund)
        await aund.close()
        with pytest.raises(RuntimeError, match="this aund AsyncClient is closed"):
            await aund.ping()
        return hello, connected, repr(aund), repr(aund.session(ALICE))

    with trio.fail_after(20):
        idle, hello, connected, closed, session = await in_thread(blocking)
        a_hello, a_connected, a_closed, a_session = await in_asyncio(nonblocking)
    assert idle == f"<Client {b.path} idle>" and connected == f"<Client {b.path} connected>"
    assert closed == f"<Client {b.path} closed>" and session == f"<Session {ALICE}/main session=None>"
    assert a_connected == f"<AsyncClient {b.path} connected>" and a_closed == f"<AsyncClient {b.path} closed>"
    assert a_session == f"<AsyncSession {ALICE}/main session=None>"
    assert hello["protocol"] == a_hello["protocol"] and isinstance(hello["protocol"], int)
