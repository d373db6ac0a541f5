"""Fixtures for the devnet's own tests: the devnet runs in-process, in the test's trio run.

In-process is enough here (these are unit-level tests of the gateway over real loopback
sockets); tests/interop drives a real `aund devnet` process.
"""
from __future__ import annotations

from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any

import pytest
import trio

from aund.devnet import DevnetInfo, serve_devnet
from tests.devnet.rawclient import Account, fresh_aid, new_account

StartDevnet = Callable[..., Awaitable[DevnetInfo]]


@pytest.fixture
async def start_devnet(tmp_path) -> StartDevnet:
    """`await start_devnet(**serve_devnet_kwargs)` -> DevnetInfo; each call is a fresh devnet.

    At teardown every devnet is stopped through its `stop` event and must return on its own
    within 10 s; a devnet task that crashed fails the test here.
    """
    async with trio.open_nursery() as nursery:
        running: list[tuple[trio.Event, trio.Event]] = []

        async def run(stop: trio.Event, done: trio.Event, state_dir, kwargs: dict[str, Any],
                      task_status=trio.TASK_STATUS_IGNORED) -> None:
            try:
                await serve_devnet("127.0.0.1", 0, state_dir, stop=stop, task_status=task_status, **kwargs)
            finally:
                done.set()

        async def start(**kwargs: Any) -> DevnetInfo:
            stop, done = trio.Event(), trio.Event()
            running.append((stop, done))
            with trio.fail_after(20):
                return await nursery.start(partial(run, stop, done, tmp_path / f"devnet{len(running)}", kwargs))

        yield start
        for stop, _ in running:
            stop.set()
        with trio.move_on_after(10) as scope:
            for _, done in running:
                await done.wait()
        if scope.cancelled_caught:
            nursery.cancel_scope.cancel()
            pytest.fail("devnet did not stop within 10 s of its stop event")


@pytest.fixture
async def devnet_inproc(start_devnet) -> DevnetInfo:
    """One in-process devnet with default settings."""
    return await start_devnet()


@pytest.fixture
async def alice(devnet_inproc) -> Account:
    with trio.fail_after(15):
        return await new_account(devnet_inproc.gateway_url, fresh_aid("alice"), root_ca=devnet_inproc.root_ca)


@pytest.fixture
async def bob(devnet_inproc) -> Account:
    with trio.fail_after(15):
        return await new_account(devnet_inproc.gateway_url, fresh_aid("bob"), root_ca=devnet_inproc.root_ca)
