"""A gateway that misbehaves on purpose (fault injection only): WebSocket over raw trio TCP with
wsproto, so it can stall mid-frame, send garbage, or close with any code."""
from __future__ import annotations

import json
from dataclasses import dataclass, field

import trio
from wsproto import ConnectionType, WSConnection
from wsproto.events import (AcceptConnection, BytesMessage, CloseConnection, Ping, Request, TextMessage)


@dataclass
class FakeGateway:
    """`script(conn_index)` returns what to do after hello-ok on each connection:
    ("serve",) answer meta.ping; ("garbage",) send junk then serve; ("close", code); ("stall",)."""

    script: object
    connections: int = 0
    events: list = field(default_factory=list)
    port: int = 0

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/aun"

    async def serve(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        task_status.started(self)
        await trio.serve_listeners(self._handle, listeners)

    async def _handle(self, stream: trio.SocketStream) -> None:
        index = self.connections
        self.connections += 1
        ws = WSConnection(ConnectionType.SERVER)
        action = self.script(index)
        self.events.append(("connect", index, action[0]))

        async def send(event) -> None:
            await stream.send_all(ws.send(event))

        try:
            while True:
                data = await stream.receive_some(65536)
                if not data:
                    return
                ws.receive_data(data)
                for event in list(ws.events()):
                    if isinstance(event, Request):
                        await send(AcceptConnection())
                        await send(TextMessage(json.dumps({"jsonrpc": "2.0", "method": "challenge",
                                                           "params": {"nonce": "n-1"}})))
                    elif isinstance(event, Ping):
                        if action[0] != "stall":
                            await send(event.response())
                    elif isinstance(event, CloseConnection):
                        if ws.state.name != "CLOSED":  # the client closed first: answer its close
                            await send(event.response())
                        return
                    elif isinstance(event, TextMessage):
                        msg = json.loads(event.data)
                        if msg.get("method") == "auth.connect":
                            await send(TextMessage(json.dumps({"jsonrpc": "2.0", "id": msg["id"], "result": {
                                "status": "ok", "capabilities": {"p2p_peer_pull_v1": True},
                                "identity": {"aid": "x"}}})))
                            if action[0] == "close":
                                await send(CloseConnection(code=action[1], reason="scripted"))
                                self.events.append(("closed", index, action[1]))
                            elif action[0] == "garbage":
                                for junk in ("not json", "[1,2]", '{"jsonrpc":"2.0","id":"nobody","result":{}}',
                                             '{"a":1,"a":2}', "\ud800".encode("utf-8", "surrogatepass").decode("latin-1")):
                                    await send(TextMessage(junk))
                                await send(BytesMessage(b"\x00\xff binary"))
                            elif action[0] == "stall":
                                # the first two bytes of a text frame header announcing 100 bytes, then nothing
                                await stream.send_all(b"\x81\x64")
                                self.events.append(("stalled", index))
                                await trio.sleep_forever()
                        elif msg.get("method") == "meta.ping" and action[0] != "stall":
                            await send(TextMessage(json.dumps({"jsonrpc": "2.0", "id": msg["id"],
                                                               "result": {"pong": True}})))
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            self.events.append(("gone", index))
            await trio.aclose_forcefully(stream)
