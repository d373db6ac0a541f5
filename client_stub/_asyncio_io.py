"""The asyncio client's I/O (layer: client_stub; the stdlib only): a socket read by one task.

``client_stub/_async/client.py`` (the source the blocking client is generated from) calls exactly
these names; ``client_stub/_thread_io.py`` defines the same ones with threads. Everything runs on
the one event loop, so the ``_Core`` needs no lock. asyncio itself is imported on first use
(``_LazyAsyncio``): blocking apps and the CLI import this module but never pay for asyncio.
"""
from __future__ import annotations

from pathlib import Path
TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable, Coroutine
    from typing import Any

from client_stub._core import _SinkState


class _LazyAsyncio:
    """``asyncio`` imported on first use: blocking apps and the CLI never pay its ~60 ms import."""

    def __getattr__(self, name: str) -> Any:
        import asyncio as module

        return getattr(module, name)


asyncio: Any = _LazyAsyncio()


class _NoLock:
    """``with`` that does nothing (contextlib.nullcontext without importing contextlib)."""

    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc_info: Any) -> None:
        return None


_NO_LOCK = _NoLock()


async def sleep(seconds: float) -> None:
    await asyncio.sleep(seconds)


def new_lock() -> Any:
    """The lock of a client's connection or a session's open (``async with``)."""
    return asyncio.Lock()


def core_lock() -> _NoLock:
    """The ``_Core`` is only touched from the loop's thread: nothing to lock."""
    return _NO_LOCK


def new_waiter() -> Any:
    return asyncio.get_running_loop().create_future()


async def wait(waiter: Any, timeout: float | None) -> Any:
    """The future's result; TimeoutError after ``timeout`` seconds (the future is then cancelled)."""
    return await asyncio.wait_for(waiter, timeout)


class Sink(_SinkState):
    """A subscription's queue, filled by the reader task, drained by the iterator."""

    def __init__(self) -> None:
        super().__init__()
        self.flag = asyncio.Event()

    def _wake(self) -> None:
        self.flag.set()

    async def _ready(self) -> None:
        while not self.ready():
            self.flag.clear()
            await self.flag.wait()

    async def wait(self, timeout: float | None) -> bool:
        """True once there is something to pop, False after ``timeout`` seconds."""
        try:
            await asyncio.wait_for(self._ready(), timeout)
        except TimeoutError:
            return False
        return True


class Stream:
    """A connected Unix socket (asyncio streams) and the task that reads it."""

    def __init__(self, reader: Any, writer: Any) -> None:
        self.reader, self.writer = reader, writer
        self.socket = writer.get_extra_info("socket")
        self.task: Any = None

    def start_reader(self, read_loop: Callable[[], Coroutine[Any, Any, None]]) -> None:
        self.task = asyncio.get_running_loop().create_task(read_loop())

    async def receive(self, size: int) -> bytes:
        return await self.reader.read(size)

    async def send_all(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def close(self) -> None:
        """Hang up, then stop the reader task."""
        self.writer.close()
        try:
            await self.writer.wait_closed()
        except OSError:
            pass
        if self.task is not None:
            self.task.cancel()
            try:
                await self.task
            except asyncio.CancelledError:
                pass


async def connect_unix(path: Path, timeout: float) -> Stream:
    """Errors: OSError (TimeoutError after ``timeout`` seconds)."""
    reader, writer = await asyncio.wait_for(asyncio.open_unix_connection(str(path)), timeout)
    return Stream(reader, writer)


def hello(client: Any) -> dict[str, Any]:
    """``AsyncClient.hello``: the current connection's (a property cannot await a connect)."""
    if client._conn is None:
        raise RuntimeError("not connected yet: await connect() first")
    return client._conn.hello
