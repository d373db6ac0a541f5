"""The blocking client's I/O (layer: client_stub; the stdlib only): a socket read by one thread.

``client_stub/_sync/client.py`` (generated from the asyncio front end by ``scripts/unasync.py``)
calls exactly these names; ``client_stub/_asyncio_io.py`` defines the same ones for asyncio.
Everything here is what really differs between the two: how the socket is connected, read and
written, how a caller waits for a reply or an event, which lock guards what.
"""
from __future__ import annotations

import socket
import threading
import time
from pathlib import Path
TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any

from client_stub._core import _SinkState
from client_stub.errors import AundError

sleep = time.sleep


def new_lock() -> threading.Lock:
    """The lock of a client's connection or a session's open (``with``)."""
    return threading.Lock()


def core_lock() -> threading.Lock:
    """Guards a connection's ``_Core``: callers' threads and the reader thread both touch it."""
    return threading.Lock()


class Waiter:
    """The reply slot of one blocking request (a minimal thread-safe future)."""

    __slots__ = ("_done", "_result", "_exc")

    def __init__(self) -> None:
        self._done = threading.Event()
        self._result: Any = None
        self._exc: BaseException | None = None

    def done(self) -> bool:
        return self._done.is_set()

    def set_result(self, result: Any) -> None:
        self._result = result
        self._done.set()

    def set_exception(self, exc: BaseException) -> None:
        self._exc = exc
        self._done.set()

    def result(self, timeout: float | None) -> Any:
        """The result; raises the exception set, or TimeoutError after ``timeout`` seconds."""
        if not self._done.wait(timeout):
            raise TimeoutError
        if self._exc is not None:
            raise self._exc
        return self._result


def new_waiter() -> Waiter:
    return Waiter()


def wait(waiter: Waiter, timeout: float | None) -> Any:
    """The waiter's result; TimeoutError after ``timeout`` seconds."""
    return waiter.result(timeout)


class Sink(_SinkState):
    """A subscription's queue, filled by the reader thread, drained by the iterator's thread."""

    def __init__(self) -> None:
        super().__init__()
        self.cond = threading.Condition(threading.Lock())

    def _wake(self) -> None:
        self.cond.notify_all()

    def deliver(self, event: dict[str, Any]) -> None:
        with self.cond:
            super().deliver(event)

    def end(self, error: AundError | None) -> None:
        with self.cond:
            super().end(error)

    def connection_lost(self) -> None:
        with self.cond:
            super().connection_lost()

    def pop(self) -> tuple[dict[str, Any] | None, bool, bool, bool]:
        with self.cond:
            return super().pop()

    def wait(self, timeout: float | None) -> bool:
        """True once there is something to pop, False after ``timeout`` seconds."""
        with self.cond:
            return self.cond.wait_for(self.ready, timeout)


class Stream:
    """A connected Unix socket and the thread that reads it."""

    def __init__(self, sock: socket.socket) -> None:
        self.socket = sock
        self.send_lock = threading.Lock()  # one frame at a time on the socket
        self.reader: threading.Thread | None = None

    def start_reader(self, read_loop: Callable[[], None]) -> None:
        self.reader = threading.Thread(target=read_loop, name="aund-client-reader", daemon=True)
        self.reader.start()

    def receive(self, size: int) -> bytes:
        return self.socket.recv(size)

    def send_all(self, data: bytes) -> None:
        with self.send_lock:
            self.socket.sendall(data)

    def close(self) -> None:
        """Hang up, then let the reader see it and finish (at most 5 s)."""
        try:
            self.socket.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        if self.reader is not None and self.reader is not threading.current_thread():
            self.reader.join(5.0)
        self.socket.close()


def connect_unix(path: Path, timeout: float) -> Stream:
    """Errors: OSError (TimeoutError after ``timeout`` seconds)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        sock.connect(str(path))
    except OSError:
        sock.close()
        raise
    sock.settimeout(None)
    return Stream(sock)


def hello(client: Any) -> dict[str, Any]:
    """``Client.hello``: the current connection's, connecting first if there is none."""
    return client._connection().hello
