"""An app that uses AUN through aund (client_stub only), as a measured bench party.

Reads one JSON command per line on stdin and answers one JSON line on stdout (the harness reads
this process's CPU from /proc around each command). Imports only the stdlib and client_stub.

Commands (sock = the daemon's socket):
  open {sock, aid}                      blocking Client + session on `aid`, wait until ready
  seq {aid, to, n, encrypt}             -> {times}: n sequential message.send (blocking Client)
  ping {sock, n}                        -> {times}: n sequential pings to aund (no gateway)
  aopen {sock, aid}                     AsyncClient + session on `aid`
  aseq {aid, to, n, encrypt}            -> {times}: as seq, with the AsyncClient
  flood {aid, to, n, inflight, encrypt} -> {wall}: n sends, `inflight` concurrent (AsyncClient)
  subscribe {aid, consumer}             subscribe now (start="now") on the AsyncClient
  consume {aid, n, ack_every, timeout}  -> {wall}: take n message events, ack every `ack_every`
  quit
"""
import asyncio
import json
import sys
import time
import uuid

from client_stub import AsyncClient, Client

sync_clients: dict = {}
sync_sessions: dict = {}
async_clients: dict = {}
async_sessions: dict = {}
streams: dict = {}


def _check(r):
    if not isinstance(r, dict) or r.get("status") not in ("sent", "delivered", "accepted"):
        raise RuntimeError(f"message.send answered {r!r:.300}")


async def cmd_open(sock, aid):
    client = sync_clients.get(sock) or Client(sock, app="bench-app")
    sync_clients[sock] = client
    session = client.session(aid)
    session.wait_ready(timeout=60)
    sync_sessions[aid] = session
    return {}


async def cmd_seq(aid, to, n, encrypt):
    session = sync_sessions[aid]
    times = []
    for i in range(n):
        t0 = time.perf_counter()
        _check(session.call("message.send", {"to": to, "payload": {"type": "text", "text": f"seq {i}"},
                                             "encrypt": encrypt}))
        times.append(time.perf_counter() - t0)
    return {"times": times}


async def cmd_ping(sock, n):
    client = sync_clients.get(sock) or Client(sock, app="bench-app")
    sync_clients[sock] = client
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        client.request("ping")
        times.append(time.perf_counter() - t0)
    return {"times": times}


async def cmd_aseq(aid, to, n, encrypt):
    session = async_sessions[aid]
    times = []
    for i in range(n):
        t0 = time.perf_counter()
        _check(await session.call("message.send", {"to": to, "payload": {"type": "text", "text": f"aseq {i}"},
                                                   "encrypt": encrypt}))
        times.append(time.perf_counter() - t0)
    return {"times": times}


async def cmd_aopen(sock, aid):
    client = async_clients.get(sock)
    if client is None:
        client = await AsyncClient(sock, app="bench-app").connect()
        async_clients[sock] = client
    session = client.session(aid)
    await session.wait_ready(timeout=60)
    async_sessions[aid] = session
    return {}


async def cmd_flood(aid, to, n, inflight, encrypt):
    session = async_sessions[aid]
    counter = iter(range(n))

    async def caller():
        for i in counter:
            _check(await session.call("message.send", {"to": to, "encrypt": encrypt, "message_id": "m-" + uuid.uuid4().hex,
                                                       "payload": {"type": "text", "text": f"flood {i}"}}))

    t0 = time.perf_counter()
    await asyncio.gather(*(caller() for _ in range(inflight)))
    return {"wall": time.perf_counter() - t0}


async def cmd_subscribe(aid, consumer):
    session = async_sessions[aid]
    streams[aid] = await session.events(consumer, start="now").open()
    return {}


async def cmd_consume(aid, n, ack_every=1, timeout=120.0):
    stream = streams[aid]
    t0 = time.perf_counter()
    got = 0
    last = None
    while got < n:
        left = timeout - (time.perf_counter() - t0)
        event = await stream.get(timeout=max(0.0, left))
        if event is None:
            raise RuntimeError(f"only {got}/{n} events in {timeout} s")
        if event.kind != "message.received":
            continue
        if not event.data.get("encrypted"):
            raise RuntimeError(f"expected an E2EE message, got {event.data!r:.200}")
        got += 1
        last = event
        if got % ack_every == 0:
            await event.ack()
    if last is not None and got % ack_every:
        await last.ack()
    return {"wall": time.perf_counter() - t0}


COMMANDS = {"open": cmd_open, "seq": cmd_seq, "ping": cmd_ping, "aseq": cmd_aseq, "aopen": cmd_aopen, "flood": cmd_flood, "subscribe": cmd_subscribe,
            "consume": cmd_consume}


async def main():
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    print(json.dumps({"ready": True}), flush=True)
    while True:
        line = await reader.readline()
        if not line:
            break
        msg = json.loads(line)
        cmd = msg.pop("cmd")
        if cmd == "quit":
            break
        try:
            out = await COMMANDS[cmd](**msg)
        except Exception as exc:  # noqa: BLE001 - reported to the harness, which fails loudly
            out = {"error": f"{cmd}: {type(exc).__name__}: {exc}"}
        print(json.dumps(out), flush=True)
    for stream in streams.values():
        try:
            await stream.aclose()
        except Exception:  # noqa: BLE001
            pass
    for client in async_clients.values():
        await client.close()
    for client in sync_clients.values():
        client.close()


if __name__ == "__main__":
    asyncio.run(main())
