"""An aund Daemon in the test's own trio run (no socket server), for tests that drive the
daemon's API directly against a devnet process: the public `aund.testing` helpers, with this
suite's defaults (state under `tmp_path/aund`). Process-level harness verbs are in tests/helpers.py."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import trio

from aund.testing import TEST_APP as APP, ready_session as ready_handle  # noqa: F401  (re-exported)
from aund.testing import start_daemon as _start_daemon


async def start_daemon(nursery: trio.Nursery, devnet: Any, tmp_path: Path, aids: list[str], *, root_ca: bool = True,
                       **settings: Any) -> Any:
    """A Daemon started in `nursery`, holding `aids` on `devnet`, state under `tmp_path/aund`."""
    return await _start_daemon(nursery, devnet, tmp_path / "aund", aids, root_ca=root_ca, seed="seed", **settings)
