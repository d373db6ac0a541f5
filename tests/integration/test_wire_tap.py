"""What aund puts on the wire, read byte by byte. A TCP tap on loopback sits between an
in-process daemon and a real devnet and records both directions of every connection (WebSocket
and HTTP); the test then unmasks the WebSocket frames and checks that no plaintext of an E2EE
`message.send`, `group.send`, `message.thought.put` or `group.thought.put` ever crossed it, and
that every request of a method the SDK signs carried a `client_signature` that verifies."""
from __future__ import annotations

import json
import os
import secrets
import types
from typing import Any

import pytest
import trio

from aund.aun import jsonrpc as rpc
from aund.aun import signing
from aund.errors import AundError, InvalidParams
from aund.identity import pki
from tests.inproc import APP, ready_handle, start_daemon

pytestmark = [pytest.mark.timeout(120)]


class Tap:
    """A loopback TCP relay to `port` that keeps every byte: per connection (to server, to client)."""

    def __init__(self, port: int) -> None:
        self.upstream = port
        self.port = 0
        self.connections: list[tuple[bytearray, bytearray]] = []

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        task_status.started()
        await trio.serve_listeners(self._relay, listeners)

    async def _relay(self, client: trio.SocketStream) -> None:
        record = (bytearray(), bytearray())
        self.connections.append(record)
        async with client, await trio.open_tcp_stream("127.0.0.1", self.upstream) as server:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._pipe, client, server, record[0], nursery.cancel_scope)
                nursery.start_soon(self._pipe, server, client, record[1], nursery.cancel_scope)

    @staticmethod
    async def _pipe(src: trio.SocketStream, dst: trio.SocketStream, keep: bytearray, scope: trio.CancelScope) -> None:
        try:
            while data := await src.receive_some(65536):
                keep += data
                await dst.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            scope.cancel()  # either side gone: the relay ends


def ws_messages(data: bytes) -> list[bytes]:
    """The messages of one direction of a WebSocket connection (after its HTTP upgrade), unmasked
    and reassembled; [] for a connection that is not a WebSocket."""
    head_end = data.find(b"\r\n\r\n")
    if head_end < 0 or b"upgrade: websocket" not in data[:head_end].lower():
        return []
    pos, messages, current = head_end + 4, [], bytearray()
    while pos + 2 <= len(data):
        b0, b1 = data[pos], data[pos + 1]
        pos += 2
        # an extension (permessage-deflate) would hide plaintext from this reader: the test must know
        assert not b0 & 0x70, "a compressed or extension frame: the tap cannot read it"
        length = b1 & 0x7F
        if length >= 126:
            size = 2 if length == 126 else 8
            length = int.from_bytes(data[pos:pos + size], "big")
            pos += size
        key = data[pos:pos + 4] if b1 & 0x80 else b""
        pos += len(key)
        payload = data[pos:pos + length]
        pos += length
        if len(payload) < length:
            break  # cut by the close
        if key:
            mask = (key * (length // 4 + 1))[:length]
            payload = (int.from_bytes(payload, "big") ^ int.from_bytes(mask, "big")).to_bytes(length, "big")
        if b0 & 0x0F in (0, 1, 2):
            current += payload
            if b0 & 0x80:
                messages.append(bytes(current))
                current = bytearray()
    return messages


def requests(tap: Tap) -> list[dict[str, Any]]:
    """Every JSON-RPC request aund sent over a WebSocket through the tap."""
    out = []
    for to_server, _ in tap.connections:
        for message in ws_messages(bytes(to_server)):
            frame = rpc.loads(message.decode("utf-8"))
            if isinstance(frame, dict) and "method" in frame and "id" in frame:
                out.append(frame)
    return out


async def test_no_e2ee_plaintext_and_every_signed_method_signed_on_the_wire(devnet, tmp_path):
    tag = os.getpid() % 100000
    alice, bob = f"tap-a-{tag}.aid.test", f"tap-b-{tag}.aid.test"
    marks = {name: f"MARK-{name}-{secrets.token_hex(6)}" for name in
             ("p2p-send", "group-send", "p2p-thought", "group-thought", "plain-control")}
    tap = Tap(devnet.port)
    with trio.fail_after(90):
        async with trio.open_nursery() as nursery:
            await nursery.start(tap.run)
            through_tap = types.SimpleNamespace(gateway_url=f"ws://127.0.0.1:{tap.port}/aun", root_ca=devnet.root_ca)
            daemon = await start_daemon(nursery, through_tap, tmp_path, [alice, bob])
            handles = {aid: await ready_handle(daemon, aid) for aid in (alice, bob)}

            async def call(aid: str, method: str, params: dict[str, Any]) -> dict[str, Any]:
                return await handles[aid].call(method, params, timeout=None, background=False, app=APP)

            ctx = {"type": "run", "id": "tap"}
            await call(alice, "message.send", {"to": bob, "payload": {"type": "text", "text": marks["p2p-send"]}})
            await call(alice, "message.thought.put", {"to": bob, "context": ctx,
                                                      "payload": {"type": "thought", "text": marks["p2p-thought"]}})
            created = await call(alice, "group.create", {"name": "tap"})
            gid = created["group"]["group_id"]
            await call(alice, "group.add_member", {"group_id": gid, "aid": bob})
            await call(alice, "group.send", {"group_id": gid,
                                             "payload": {"type": "text", "text": marks["group-send"]}})
            await call(alice, "group.thought.put", {"group_id": gid, "context": ctx,
                                                    "payload": {"type": "thought", "text": marks["group-thought"]}})
            # bob's app reads all four back in plaintext: the ciphertext crossed the tap, aund opened it
            seen = json.dumps([
                await call(bob, "message.history", {"sender_aid": alice, "before_seq": 10**9}),
                await call(bob, "message.thought.get", {"sender_aid": alice, "context": ctx}),
                await call(bob, "group.history", {"group_id": gid, "before_seq": 10**9}),
                await call(bob, "group.thought.get", {"group_id": gid, "sender_aid": alice, "context": ctx})])
            # storage writes the devnet serves (aund/devnet/storage.py): accepted, so signed right
            stored = [("storage.put_object", {"object_key": "a/b.txt", "content": "aGk="}),
                      ("storage.fs.mkdir", {"path": "tap"})]
            for method, params in stored:
                assert isinstance(await call(alice, method, params), dict)
            # signed methods the devnet does not serve: refused there, but signed on the way
            unserved = [("collab.create", {"name": "tap"}),
                        ("collab.tag.rm", {"repo": "tap", "tag": "v1"}),
                        ("org.member.list", {"org_id": "acme.aid.test", "aad": {"purpose": "tap"}}),
                        ("org.health", {})]
            for method, params in unserved:
                with pytest.raises(AundError, match="not found"):
                    await call(alice, method, params)
            for method, target in (("message.send", {"to": bob}), ("group.send", {"group_id": gid})):
                with pytest.raises(InvalidParams, match="delivery_mode") as refused:  # as the SDK refuses it
                    await call(alice, method, {**target, "payload": {"type": "text", "text": "x"},
                                               "delivery_mode": "queue"})
                assert refused.value.data["arg"] == "params.delivery_mode"
            await call(alice, "message.send", {"to": bob, "encrypt": False,
                                               "payload": {"type": "text", "text": marks["plain-control"]}})
            certs = {aid: pki.load_cert_pem(daemon.store.load(aid).cert_pem) for aid in (alice, bob)}
            await daemon.aclose()
            nursery.cancel_scope.cancel()

    for name in ("p2p-send", "group-send", "p2p-thought", "group-thought"):
        assert marks[name] in seen, f"{name}: bob's app did not get the plaintext back"
    wire = [bytes(b) for conn in tap.connections for b in conn]
    frames = [m for conn in tap.connections for direction in conn for m in ws_messages(bytes(direction))]
    assert len(tap.connections) >= 2 and len(frames) > 50
    assert any(marks["plain-control"].encode() in f for f in frames)  # the tap reads what is sent in clear
    for name in ("p2p-send", "group-send", "p2p-thought", "group-thought"):
        leaked = [f[:200] for f in frames + wire if marks[name].encode() in f]
        assert not leaked, f"{name}: plaintext on the wire: {leaked}"

    sent = requests(tap)
    signed_methods = set()
    for req in sent:
        if not signing.needs_signature(req["method"]):
            continue
        params = req.get("params") or {}
        sig = params.get("client_signature")
        assert isinstance(sig, dict), f"{req['method']} went out without client_signature"
        signing.verify_params(req["method"], params, aid=sig["aid"], cert=certs[sig["aid"]])
        signed_methods.add(req["method"])
    called = {"message.send", "message.thought.put", "group.v2.send", "group.thought.put", "group.add_member",
              *(m for m, _ in unserved + stored)}
    internal = {"message.v2.put_peer_pk", "group.v2.put_group_pk", "group.v2.propose_state"}
    assert called | internal <= signed_methods, sorted((called | internal) - signed_methods)
    org = [r["params"] for r in sent if r["method"] == "org.member.list"]
    assert org and org[0]["aad"] == {"purpose": "tap", "org_id": "acme.aid.test"}
    assert [r["params"]["aad"] for r in sent if r["method"] == "org.health"] == [{"org_id": None}]
    unsigned = {r["method"] for r in sent if "client_signature" not in (r.get("params") or {})}
    assert not unsigned & signing.SIGNED_METHODS
    assert {"message.history", "group.history"} <= unsigned  # read-only: the SDK does not sign them either
    assert not [r for r in sent if r["method"] in ("message.send", "group.send", "group.v2.send")
                and "delivery_mode" in (r.get("params") or {})]  # refused before the wire
