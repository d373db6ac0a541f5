"""An aund Daemon in the test's own trio run (no socket server): for tests that drive the daemon's
API directly against a devnet process. Process-level harness verbs are in tests/helpers.py."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import trio

from aund.aun.auth import GatewayTrust
from aund.broker.backend import AppIdentity
from aund.config import Config
from aund.daemon import Daemon
from aund.errors import AundError
from aund.identity.store import IdentityStore

APP = AppIdentity(1, os.getpid(), os.getuid(), os.getgid(), "test")


async def start_daemon(nursery: trio.Nursery, devnet: Any, tmp_path: Path, aids: list[str], *, root_ca: bool = True,
                       **settings: Any) -> Daemon:
    """A Daemon started in `nursery`, holding `aids` on `devnet`, state under `tmp_path/aund`;
    `root_ca=False` trusts only the bundled root; `settings` are further Config fields."""
    config = Config(state_dir=tmp_path / "aund", socket=tmp_path / "aund.sock", gateway_url=(devnet.gateway_url,),
                    root_ca=(Path(devnet.root_ca),) if root_ca else (), identities=tuple(aids), **settings)
    config.state_dir.mkdir(parents=True, exist_ok=True)
    store = await trio.to_thread.run_sync(IdentityStore, config.state_dir, "seed")
    daemon = Daemon(config, store, GatewayTrust.from_files(list(config.root_ca), config.state_dir))
    await nursery.start(daemon.run)
    return daemon


async def ready_handle(daemon: Daemon, aid: str, app: AppIdentity = APP, slot_id: str = "main") -> Any:
    """A session on `aid` once the daemon has it (a configured identity may still be registering), ready."""
    while True:
        try:
            handle = await daemon.open_session(app, aid, slot_id)
            break
        except AundError:
            await trio.sleep(0.05)
    await handle.wait_ready()
    return handle
