"""aund.aun.ws, the link's WebSocket client: against a tiny wsproto server on loopback (handshake,
fragments, ping/pong, the close codes 1009/1002/1007, a refused handshake), the coalescing writer
and its high-water mark (send_all calls counted by a wrapper stream), and a fuzz of the decoder
(whatever a "server" sends ends in ConnectionClosed or HandshakeError, within a deadline)."""
from __future__ import annotations

import base64
import hashlib
import re
from collections.abc import Awaitable, Callable

import pytest
import trio
import trio.testing
from hypothesis import HealthCheck, given, settings, strategies as st
from wsproto import ConnectionType, WSConnection
from wsproto.events import AcceptConnection, BytesMessage, CloseConnection, Ping, Pong, Request, TextMessage

from aund.aun import transport, ws

pytestmark = pytest.mark.timeout(30)

Handler = Callable[[trio.SocketStream, WSConnection], Awaitable[None]]


async def _serve(nursery: trio.Nursery, handler: Handler, *, refuse: bytes | None = None) -> int:
    """A one-handler wsproto server on 127.0.0.1; returns its port. `refuse`: raw HTTP answered instead."""

    async def one(stream: trio.SocketStream) -> None:
        conn = WSConnection(ConnectionType.SERVER)
        while True:
            data = await stream.receive_some(65536)
            if refuse is not None:
                await stream.send_all(refuse)
                return
            conn.receive_data(data or None)
            if any(isinstance(e, Request) for e in conn.events()):
                break
        await stream.send_all(conn.send(AcceptConnection()))
        await handler(stream, conn)

    listeners = await nursery.start(trio.serve_tcp, one, 0)
    return listeners[0].socket.getsockname()[1]


async def _events(stream: trio.SocketStream, conn: WSConnection, kind: type) -> list:
    """Server side: read until an event of `kind` arrives; every event read so far, pings answered."""
    seen = []
    while True:
        for event in conn.events():
            seen.append(event)
            if isinstance(event, Ping):
                await stream.send_all(conn.send(event.response()))
            if isinstance(event, kind):
                return seen
        data = await stream.receive_some(65536)
        if not data:
            return seen
        conn.receive_data(data)


async def _open(nursery: trio.Nursery, port: int, **kw) -> tuple[ws.WebSocket, trio.abc.Stream]:
    return await transport.connect(nursery, f"ws://127.0.0.1:{port}/aun?x=1", timeout=5, **{"max_frame": 1 << 20, **kw})


async def test_handshake_messages_fragments_and_ping_pong_both_ways():
    got: dict[str, object] = {}

    async def handler(stream, conn):
        first = await _events(stream, conn, TextMessage)
        got["text"] = first[-1].data
        await stream.send_all(conn.send(TextMessage(data="hel", message_finished=False))
                              + conn.send(TextMessage(data="lo ünï", message_finished=True)))
        await stream.send_all(conn.send(BytesMessage(data=b"\x00\x01", message_finished=False)))
        await stream.send_all(conn.send(Ping(payload=b"srv")) + conn.send(BytesMessage(data=b"\x02")))
        seen = await _events(stream, conn, Pong)
        got["pong"] = seen[-1].payload
        await stream.send_all(conn.send(TextMessage(data="after pong")))
        got["close"] = (await _events(stream, conn, CloseConnection))[-1].code
        await stream.send_all(conn.send(CloseConnection(code=1000)))

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            port = await _serve(nursery, handler)
            client, stream = await _open(nursery, port)
            await client.send_message('{"jsonrpc":"2.0"}')
            assert await client.get_message() == "hello ünï"
            assert await client.get_message() == b"\x00\x01\x02"
            assert await client.get_message() == "after pong"
            ends: list[int] = []

            async def reader() -> None:
                with pytest.raises(ws.ConnectionClosed) as closed:
                    await client.get_message()
                ends.append(closed.value.code)

            nursery.start_soon(reader)
            with trio.fail_after(2):
                await client.ping(b"ours")  # the pong read by the reader
            await transport.close(client, stream)
            await trio.testing.wait_all_tasks_blocked()
            assert ends == [1000]
            nursery.cancel_scope.cancel()
    assert got == {"text": '{"jsonrpc":"2.0"}', "pong": b"srv", "close": 1000}


async def test_the_devnet_gateway_hypercorn_speaks_with_it(devnet):
    """The real server side: hypercorn's handshake, its challenge, an RPC's answer, our ping's pong."""
    with trio.fail_after(15):
        async with trio.open_nursery() as nursery:
            client, stream = await transport.connect(nursery, devnet.gateway_url, max_frame=1 << 20, timeout=5)
            assert '"challenge"' in await client.get_message()
            await client.send_message('{"jsonrpc":"2.0","id":"p1","method":"meta.ping","params":{}}')
            async with trio.open_nursery() as pinger:
                pinger.start_soon(client.ping)
                reply = await client.get_message()
            assert '"id":"p1"' in reply and "auth.connect" in reply  # refused before auth.connect, but answered
            await transport.close(client, stream)
            nursery.cancel_scope.cancel()


async def _until_closed(frames: Callable[[WSConnection], bytes], **kw) -> tuple[list, ws.ConnectionClosed, list[int]]:
    """The server sends `frames(conn)`, the client reads until closed (then closes at once: nothing
    left to wait for). Returns what it read, how it closed, and the close codes the server got."""
    seen: list = []

    async def handler(stream, conn):
        await stream.send_all(frames(conn))
        seen.extend(await _events(stream, conn, CloseConnection))

    messages: list = []
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            client, stream = await _open(nursery, await _serve(nursery, handler), **kw)
            with pytest.raises(ws.ConnectionClosed) as closed:
                while True:
                    messages.append(await client.get_message())
            with pytest.raises(ws.ConnectionClosed):  # and stays closed
                await client.send_message("late")
            started = trio.current_time()
            await transport.close(client, stream)
            assert trio.current_time() - started < 0.5
            await trio.testing.wait_all_tasks_blocked()
            nursery.cancel_scope.cancel()
    return messages, closed.value, [e.code for e in seen if isinstance(e, CloseConnection)]


@pytest.mark.parametrize(("raw", "code"), [
    (b"\x81\x02\xff\xfe", 1007),             # a text message that is not UTF-8
    (b"\x83\x00", 1002),                     # a reserved opcode
    (b"\x81\x81abcdx", 1002),                # a masked frame from a server
    (b"\x01\x01a\x01\x01b", 1002),           # a new message in the middle of a fragmented one
])
async def test_a_broken_frame_closes_with_the_protocol_error_code(raw, code):
    messages, closed, server_got = await _until_closed(lambda conn: raw)
    assert (messages, closed.code, server_got) == ([], code, [code])


@pytest.mark.parametrize("fragments", [1, 4])
async def test_a_message_over_the_limit_closes_with_1009(fragments):
    def frames(conn: WSConnection) -> bytes:
        part = "x" * (1200 // fragments)
        return conn.send(TextMessage(data="small")) + b"".join(
            conn.send(TextMessage(data=part, message_finished=i == fragments - 1)) for i in range(fragments))

    messages, closed, server_got = await _until_closed(frames, max_frame=1000)
    assert (messages, closed.code, server_got) == (["small"], 1009, [1009])


async def test_the_servers_close_code_and_reason_reach_the_reader_and_are_answered():
    messages, closed, server_got = await _until_closed(
        lambda conn: conn.send(TextMessage(data="last")) + conn.send(CloseConnection(code=4010, reason="kicked")))
    assert (messages, closed.code, closed.reason, server_got) == (["last"], 4010, "kicked", [4010])


async def test_a_dropped_stream_is_1006_and_a_close_times_out_on_a_silent_server():
    async def handler(stream, conn):
        await _events(stream, conn, TextMessage)
        await stream.aclose()

    async def silent(stream, conn):
        await trio.sleep_forever()

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            client, stream = await _open(nursery, await _serve(nursery, handler))
            await client.send_message("bye")
            with pytest.raises(ws.ConnectionClosed) as closed:
                await client.get_message()
            assert closed.value.code == 1006
            await transport.close(client, stream)
            client, stream = await _open(nursery, await _serve(nursery, silent))
            started = trio.current_time()
            await transport.close(client, stream, grace=0.3)
            assert 0.25 < trio.current_time() - started < 2
            nursery.cancel_scope.cancel()


async def test_a_refused_handshake_is_a_handshake_error_with_status_and_headers():
    refusal = b"HTTP/1.1 403 Forbidden\r\ncontent-length: 3\r\nx-why: slot\r\n\r\nno!"
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            port = await _serve(nursery, None, refuse=refusal)  # type: ignore[arg-type]
            with pytest.raises(ws.HandshakeError) as refused:
                await _open(nursery, port)
            assert refused.value.status == 403
            assert (b"x-why", b"slot") in refused.value.headers and refused.value.body == b"no!"
            assert "HTTP 403" in transport.describe(refused.value)
            port = await _serve(nursery, None, refuse=b"SSH-2.0-OpenSSH\r\n\r\n")  # type: ignore[arg-type]
            with pytest.raises(ws.HandshakeError) as junk:
                await _open(nursery, port)
            assert junk.value.status is None
            nursery.cancel_scope.cancel()


class CountingStream(trio.abc.Stream):
    """A stream that counts send_all calls and, while `gate` is unset, holds them."""

    def __init__(self, inner: trio.abc.Stream) -> None:
        self.inner, self.sends, self.gate = inner, [], trio.Event()
        self.gate.set()

    async def send_all(self, data) -> None:
        await self.gate.wait()
        self.sends.append(len(data))
        await self.inner.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.inner.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes=None):
        return await self.inner.receive_some(max_bytes)

    async def aclose(self) -> None:
        await self.inner.aclose()


async def _counted(nursery: trio.Nursery, handler: Handler) -> tuple[ws.WebSocket, CountingStream]:
    port = await _serve(nursery, handler)
    stream = CountingStream(await trio.open_tcp_stream("127.0.0.1", port))
    client = await ws.handshake(stream, f"127.0.0.1:{port}", "/aun")
    stream.sends.clear()
    nursery.start_soon(client.run_writer)
    return client, stream


async def test_frames_queued_together_leave_in_one_send_all_in_order():
    received: list[str] = []
    done = trio.Event()

    async def handler(stream, conn):
        while len(received) < 200:
            events = await _events(stream, conn, TextMessage)
            received.extend(e.data for e in events if isinstance(e, TextMessage))
        done.set()
        await trio.sleep_forever()

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            client, stream = await _counted(nursery, handler)

            async def send(i: int) -> None:
                await client.send_message(f"frame {i}")

            async with trio.open_nursery() as senders:  # 100 tasks at once
                for i in range(100):
                    senders.start_soon(send, i)
            for i in range(100, 200):  # one task, back to back
                await client.send_message(f"frame {i}")
            await done.wait()
            assert len(stream.sends) <= 6, stream.sends
            assert client.writes == len(stream.sends)
            await transport.close(client, stream)
            nursery.cancel_scope.cancel()
    assert sorted(received[:100], key=lambda t: int(t.split()[1])) == [f"frame {i}" for i in range(100)]
    assert received[100:] == [f"frame {i}" for i in range(100, 200)]


async def test_senders_wait_above_the_high_water_mark_until_the_writer_drains():
    async def handler(stream, conn):
        while True:
            await _events(stream, conn, TextMessage)

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            client, stream = await _counted(nursery, handler)
            stream.gate = trio.Event()  # the network stalls
            chunk = "x" * (256 * 1024)
            await client.send_message(chunk)   # taken by the writer, stuck in send_all
            await trio.testing.wait_all_tasks_blocked()
            for _ in range(4):                 # 1 MiB queued: still no wait
                with trio.fail_after(0.01):
                    await client.send_message(chunk)
            sent = trio.Event()

            async def one_more() -> None:
                await client.send_message("over the mark")
                sent.set()

            nursery.start_soon(one_more)
            await trio.testing.wait_all_tasks_blocked()
            assert not sent.is_set()           # the sender waits
            stream.gate.set()
            await sent.wait()
            assert stream.sends  # the stalled write went out before the sender went on
            await transport.close(client, stream)
            nursery.cancel_scope.cancel()


class ScriptedStream(trio.abc.Stream):
    """A "server" that answers the handshake (a valid 101 when `accept`) then sends `chunks`, then EOF."""

    def __init__(self, chunks: list[bytes], accept: bool) -> None:
        self.chunks, self.accept, self.request = list(chunks), accept, b""

    async def send_all(self, data) -> None:
        await trio.lowlevel.checkpoint()
        self.request += bytes(data)

    async def wait_send_all_might_not_block(self) -> None:
        await trio.lowlevel.checkpoint()

    async def receive_some(self, max_bytes=None) -> bytes:
        await trio.lowlevel.checkpoint()
        if self.accept:
            self.accept = False
            key = re.search(rb"(?i)sec-websocket-key: *([^\r]+)", self.request).group(1)
            accept = base64.b64encode(hashlib.sha1(key + b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11").digest())
            return b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n" \
                   b"Sec-WebSocket-Accept: " + accept + b"\r\n\r\n"
        return self.chunks.pop(0) if self.chunks else b""

    async def aclose(self) -> None:
        await trio.lowlevel.checkpoint()


frames = st.one_of(st.binary(max_size=64), st.sampled_from([b"\x81\x05hello", b"\x01\x02he", b"\x80\x01y",
                                                          b"\x89\x01p", b"\x8a\x00", b"\x88\x02\x03\xe8",
                                                          b"\x82\x7e\x00\x04abcd", b"\x81\x7f" + b"\xff" * 8]))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(chunks=st.lists(frames, max_size=12), accept=st.booleans(), limit=st.sampled_from([8, 1 << 20]))
def test_fuzz_whatever_the_server_sends_ends_in_our_exceptions(chunks, accept, limit):
    async def main() -> None:
        with trio.fail_after(5):
            stream = ScriptedStream(chunks, accept)
            try:
                client = await ws.handshake(stream, "gw.test", "/aun", max_message=limit)
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(client.run_writer)
                    try:
                        for _ in range(50):
                            message = await client.get_message()
                            assert isinstance(message, (str, bytes)) and len(message) <= limit
                    except ws.ConnectionClosed as exc:
                        assert 1000 <= exc.code <= 4999 or exc.code == 1006
                    finally:
                        await client.aclose(timeout=0.5)
                        nursery.cancel_scope.cancel()
            except ws.HandshakeError:
                pass

    trio.run(main)
