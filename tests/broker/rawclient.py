"""A raw local-protocol connection for tests that must send what no real client would (trio).

Built on the one codec, client_stub.wire; frames are dicts; ``recv`` returns None at EOF.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import trio

from client_stub import wire


class RawConn:
    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.decoder = wire.FrameDecoder(wire.HARD_MAX_FRAME)
        self.frames: list[dict[str, Any]] = []

    @classmethod
    async def open(cls, path: Path) -> "RawConn":
        return cls(await trio.open_unix_socket(str(path)))

    async def send(self, frame: dict[str, Any]) -> None:
        await self.stream.send_all(wire.encode_frame(frame, wire.HARD_MAX_FRAME))

    async def send_raw(self, data: bytes) -> None:
        await self.stream.send_all(data)

    async def recv(self) -> dict[str, Any] | None:
        """The next frame, or None at EOF (or a reset)."""
        while True:
            frame = self.decoder.next_frame()
            if frame is not None:
                return frame
            try:
                data = await self.stream.receive_some(65536)
            except trio.BrokenResourceError:
                return None
            if not data:
                return None
            self.decoder.feed(data)

    async def hello(self, app: str = "raw", **extra: Any) -> dict[str, Any]:
        frame = wire.make_hello(0, app)
        frame["args"].update(extra)
        await self.send(frame)
        reply = await self.recv()
        assert reply is not None and reply["kind"] == "rep", reply
        return reply["result"]

    async def request(self, request_id: Any, op: str, args: dict[str, Any] | None = None) -> dict[str, Any]:
        """Send a request and return its rep/err frame (events meanwhile go to ``self.frames``)."""
        await self.send(wire.make_request(request_id, op, args or {}))
        while True:
            frame = await self.recv()
            assert frame is not None, "connection closed before the reply"
            if frame.get("id") == request_id and frame["kind"] in ("rep", "err"):
                return frame
            self.frames.append(frame)

    async def read_until_eof(self) -> list[dict[str, Any]]:
        out = []
        while (frame := await self.recv()) is not None:
            out.append(frame)
        return out

    async def aclose(self) -> None:
        await self.stream.aclose()
