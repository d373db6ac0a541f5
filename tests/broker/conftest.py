"""Fixtures of the broker tests: the real socket server over the scripted FakeBackend, in the test's
trio run, on a real Unix socket in a temp dir. The blocking Client runs in worker threads
(``in_thread``), the AsyncClient under ``asyncio.run`` in a worker thread (``in_asyncio``): asyncio
never shares the trio thread.
"""
from __future__ import annotations

import asyncio
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import trio

from aund.broker import BrokerServer, Limits, Policy, serve_broker
from tests.broker.fakebackend import FakeBackend


async def in_thread(fn: Callable[..., Any], *args: Any, **kw: Any) -> Any:
    """Run blocking ``fn`` in a worker thread (abandoned if the test's deadline cancels it)."""
    return await trio.to_thread.run_sync(partial(fn, *args, **kw), abandon_on_cancel=True)


async def in_asyncio(coro_fn: Callable[..., Any], *args: Any) -> Any:
    """Run ``asyncio.run(coro_fn(*args))`` in a worker thread."""
    return await in_thread(lambda: asyncio.run(coro_fn(*args)))


async def wait_until(predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    """Poll ``predicate`` until true; fails the test after ``timeout`` seconds."""
    with trio.fail_after(timeout):
        while not predicate():
            await trio.sleep(0.005)


@dataclass
class Broker:
    server: BrokerServer
    backend: FakeBackend
    path: Path
    scope: trio.CancelScope
    stopped: trio.Event = field(default_factory=trio.Event)

    @property
    def limiter(self) -> trio.CapacityLimiter:
        return self.server.call_limiter

    def app(self, name: str) -> Any:
        """The AppConnection of the connected app called ``name`` (exactly one)."""
        found = [s for s in self.server.apps.values() if s.app.app_name == name]
        assert len(found) == 1, [s.app.app_name for s in self.server.apps.values()]
        return found[0]

    async def stop(self) -> None:
        self.scope.cancel()
        with trio.fail_after(10):
            await self.stopped.wait()


@pytest.fixture
def sock_dir(tmp_path: Path):
    """A directory for sockets: tmp_path, or a short /tmp dir when tmp_path is too long for AF_UNIX."""
    if len(str(tmp_path)) < 60:
        yield tmp_path
        return
    short = Path(tempfile.mkdtemp(prefix="aund-", dir="/tmp"))
    try:
        yield short
    finally:
        shutil.rmtree(short, ignore_errors=True)


@pytest.fixture
async def start_broker(nursery: trio.Nursery, sock_dir: Path):
    """``await start_broker(limits=, policy=, backend=, path=)`` -> Broker, serving until the test ends."""
    counter = iter(range(1000))

    async def run(backend: FakeBackend, path: Path, kwargs: dict[str, Any], *, task_status) -> None:
        stopped = trio.Event()
        try:
            with trio.CancelScope() as scope:
                async with trio.open_nursery() as inner:
                    server = await inner.start(partial(serve_broker, backend, socket_path=path, **kwargs))
                    task_status.started(Broker(server, backend, path, scope, stopped))
        finally:
            stopped.set()

    async def start(*, limits: Limits | None = None, policy: Policy | None = None,
                    backend: FakeBackend | None = None, path: Path | None = None) -> Broker:
        backend = backend or FakeBackend()
        path = path or sock_dir / f"run{next(counter)}" / "aund.sock"
        return await nursery.start(run, backend, path, {"limits": limits, "policy": policy})

    return start
