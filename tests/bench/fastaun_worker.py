"""The official SDK (fastaun 0.5.25, asyncio) as a measured bench party, in its own process.

Reads one JSON command per line on stdin and answers one JSON line on stdout. Imports only the
stdlib and fastaun, never aund. Env: AUN_GW_URL, AUN_ROOT_CA, AUN_WORKDIR (where its
identities live, kept across bench runs), FASTAUN_SEED.

Commands:
  open {name, aid?, fresh?}        -> {aid}: load or register the identity, connect (no auto reconnect)
  seq {name, to, n, encrypt}       -> {times}: n sequential message.send, wall seconds per call
  flood {name, to, n, inflight, encrypt} -> {wall}: n sends with `inflight` concurrent callers
  recv_mark {name}                 -> {count}: remember how many messages arrived so far
  recv_wait {name, n, timeout}     -> {wall, count}: wait for n more messages since the mark
  close {name} / quit
"""
import asyncio
import json
import os
import secrets
import sys
import time
import uuid
from pathlib import Path
from urllib.parse import urlsplit

GW, ROOT_CA, WORK = os.environ["AUN_GW_URL"], os.environ["AUN_ROOT_CA"], Path(os.environ["AUN_WORKDIR"])
SEED = os.environ.get("FASTAUN_SEED", "bench")
_u = urlsplit(GW)
os.environ.setdefault("AUN_NAMESERVICE_URL", f"{'https' if _u.scheme == 'wss' else 'http'}://{_u.netloc}")
T_IMPORT0 = time.perf_counter()
from aun_core import AIDStore, AUNClient  # noqa: E402

IMPORT_SECONDS = time.perf_counter() - T_IMPORT0


class Party:
    def __init__(self, aid, client):
        self.aid, self.client = aid, client
        self.received = 0
        self.mark = 0
        self.arrived = asyncio.Event()


parties: dict[str, Party] = {}


def store_for(name):
    return AIDStore(aun_path=str(WORK / name), encryption_seed=SEED, root_ca_path=ROOT_CA, verify_ssl=False)


async def ensure(name, aid=None, fresh=False):
    WORK.mkdir(parents=True, exist_ok=True)
    store = store_for(name)
    ids_file = WORK / f"{name}.aid"
    if not aid and ids_file.exists() and not fresh:
        aid = ids_file.read_text().strip()
    aid = aid or f"fa-{name}-{secrets.token_hex(3)}.aid.test"
    loaded = store.load(aid)
    if loaded.ok:
        store._keystore.set_metadata_value(aid, "gateway_url", GW)  # the devnet's port changes per run
    else:
        store._keystore.set_metadata_value(aid, "gateway_url", GW)
        registered = await store.register(aid, type="agent")
        if not registered.ok:
            raise RuntimeError(f"register {aid}: {registered.error.message}")
        loaded = store.load(aid)
        if not loaded.ok:
            raise RuntimeError(f"load {aid} after register: {loaded.error.message}")
    ids_file.write_text(aid)
    return aid, loaded.data["aid"]


async def cmd_open(name, aid=None, fresh=False):
    aid, ident = await ensure(name, aid, fresh)
    client = AUNClient(ident)
    party = Party(aid, client)

    def on_message(_m):
        party.received += 1
        party.arrived.set()

    client.on("message.received", on_message)
    await asyncio.wait_for(client.connect({"auto_reconnect": False}), 60)
    if client.state.value != "ready":
        raise RuntimeError(f"connect {aid}: state {client.state.value}")
    parties[name] = party
    return {"aid": aid, "import_seconds": IMPORT_SECONDS}


async def _send(party, to, encrypt, text):
    r = await party.client.call("message.send", {"to": to, "payload": {"type": "text", "text": text},
                                                 "encrypt": encrypt, "message_id": "m-" + uuid.uuid4().hex})
    if not isinstance(r, dict) or r.get("status") not in ("sent", "delivered", "accepted"):
        raise RuntimeError(f"message.send answered {r!r:.300}")


async def cmd_seq(name, to, n, encrypt):
    party = parties[name]
    times = []
    for i in range(n):
        t0 = time.perf_counter()
        await _send(party, to, encrypt, f"seq {i}")
        times.append(time.perf_counter() - t0)
    return {"times": times}


async def cmd_flood(name, to, n, inflight, encrypt):
    party = parties[name]
    counter = iter(range(n))

    async def caller():
        for i in counter:
            await _send(party, to, encrypt, f"flood {i}")

    t0 = time.perf_counter()
    await asyncio.gather(*(caller() for _ in range(inflight)))
    return {"wall": time.perf_counter() - t0}


async def cmd_recv_mark(name):
    party = parties[name]
    party.mark = party.received
    return {"count": party.received}


async def cmd_recv_wait(name, n, timeout=120.0):
    party = parties[name]
    t0 = time.perf_counter()
    deadline = t0 + timeout
    while party.received - party.mark < n:
        party.arrived.clear()
        left = deadline - time.perf_counter()
        if left <= 0:
            raise RuntimeError(f"only {party.received - party.mark}/{n} messages arrived in {timeout} s")
        try:
            await asyncio.wait_for(party.arrived.wait(), left)
        except asyncio.TimeoutError:
            pass
    return {"wall": time.perf_counter() - t0, "count": party.received - party.mark}


async def cmd_close(name):
    party = parties.pop(name, None)
    if party is not None:
        await party.client.close()
    return {}


COMMANDS = {"open": cmd_open, "seq": cmd_seq, "flood": cmd_flood, "recv_mark": cmd_recv_mark,
            "recv_wait": cmd_recv_wait, "close": cmd_close}


async def main():
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    print(json.dumps({"ready": True, "import_seconds": IMPORT_SECONDS}), flush=True)
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
    for name in list(parties):
        try:
            await asyncio.wait_for(cmd_close(name), 10)
        except Exception:  # noqa: BLE001
            pass


if __name__ == "__main__":
    asyncio.run(main())
