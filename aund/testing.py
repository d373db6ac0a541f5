"""Test helpers for apps built on aund, in the spirit of ``trio.testing``: a whole local AUN
network and a daemon inside the test's own trio run, on loopback and in a temporary directory,
so an app's tests talk to the real thing without any setup.

    import trio
    from aund.testing import local_aund
    from client_stub import AsyncClient   # or Client, from a worker thread

    async def test_my_agent(tmp_path):
        async with local_aund(tmp_path, identities=["my-agent.aid.test"]) as env:
            ...  # env.socket: point client_stub at it; env.devnet.gateway_url, env.daemon

`local_devnet` alone starts a devnet (aund's local AUN gateway, the one the official SDK accepts)
and yields its `DevnetInfo`; `start_daemon` starts a daemon in a given nursery (the app socket
is served by `local_aund`). Everything stops when the block ends. trio only; a blocking
`client_stub.Client` must run in a worker thread (`trio.to_thread.run_sync`), an asyncio
`AsyncClient` in its own thread too.
"""
from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import trio

from aund.broker.backend import AppIdentity

#: the identity the daemon's API sees when a test calls it directly (not through the socket)
TEST_APP = AppIdentity(1, os.getpid(), os.getuid(), os.getgid(), "test")
TEST_SEED = "aund-testing-seed-not-secret"


@asynccontextmanager
async def local_devnet(state_dir: Path, **options: Any) -> AsyncIterator[Any]:
    """A devnet on 127.0.0.1 (a free port) with its state under `state_dir`; `options` are
    `aund.devnet.serve_devnet`'s (issuer, pki_mode, federate, ...). Yields its DevnetInfo."""
    from aund.devnet import serve_devnet

    stop = trio.Event()
    async with trio.open_nursery() as nursery:
        info = await nursery.start(partial(serve_devnet, "127.0.0.1", 0, Path(state_dir), stop=stop, **options))
        try:
            yield info
        finally:
            stop.set()


async def start_daemon(nursery: trio.Nursery, devnet: Any, state_dir: Path, aids: list[str] | tuple[str, ...] = (),
                       *, root_ca: bool = True, seed: str = TEST_SEED, **settings: Any) -> Any:
    """A Daemon started in `nursery`, holding `aids` on `devnet` (anything with `gateway_url` and
    `root_ca`), its state under `state_dir`; `root_ca=False` trusts only the bundled AUN root;
    `settings` are further `aund.config.Config` fields."""
    from aund.aun.trust import GatewayTrust
    from aund.config import Config
    from aund.daemon import Daemon
    from aund.identity.store import IdentityStore

    state_dir = Path(state_dir)
    config = Config(state_dir=state_dir, socket=state_dir.parent / f"{state_dir.name}.sock",
                    gateway_url=(devnet.gateway_url,), root_ca=(Path(devnet.root_ca),) if root_ca else (),
                    identities=tuple(aids), **settings)
    state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    store = await trio.to_thread.run_sync(IdentityStore, state_dir, seed)
    daemon = Daemon(config, store, GatewayTrust.from_files(list(config.root_ca), state_dir))
    await nursery.start(daemon.run)
    return daemon


async def ready_session(daemon: Any, aid: str, app: AppIdentity = TEST_APP, slot_id: str = "main") -> Any:
    """A session on `aid` once the daemon has it (a configured identity may still be registering), ready."""
    from aund.errors import AundError

    while True:
        try:
            handle = await daemon.open_session(app, aid, slot_id)
            break
        except AundError:
            await trio.sleep(0.05)
    await handle.wait_ready()
    return handle


@dataclass
class LocalAund:
    devnet: Any        # DevnetInfo: gateway_url, http_url, root_ca, devnet (the gateway object)
    daemon: Any        # aund.daemon.Daemon
    socket: Path       # the app socket: client_stub.Client(socket) / AsyncClient(socket)
    broker: Any = None  # aund.broker.BrokerServer serving `socket` (sharing the daemon's call budget)


@asynccontextmanager
async def local_aund(tmp_path: Path, identities: list[str] | tuple[str, ...] = (), **settings: Any
                     ) -> AsyncIterator[LocalAund]:
    """A devnet, a daemon holding `identities` on it and the daemon's app socket, all under
    `tmp_path` (the socket in a short directory of its own when `tmp_path` is too long for one)."""
    import tempfile

    from aund.broker import serve_broker

    tmp_path = Path(tmp_path)
    sock_dir = Path(tempfile.mkdtemp(prefix="aund-t-", dir="/tmp" if len(str(tmp_path)) > 60 else tmp_path))
    socket = sock_dir / "aund.sock"
    async with local_devnet(tmp_path / "devnet") as devnet, trio.open_nursery() as nursery:
        daemon = await start_daemon(nursery, devnet, tmp_path / "aund", identities, **settings)
        broker = await nursery.start(partial(serve_broker, daemon, socket_path=socket,
                                             call_limiter=daemon.global_budget))
        try:
            yield LocalAund(devnet, daemon, socket, broker)
        finally:
            await daemon.aclose()
            nursery.cancel_scope.cancel()
