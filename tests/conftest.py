"""Test rules for aund (read before adding a test):

- Real processes and real sockets, on loopback or in a temp dir; fakes only to inject faults.
- Time-based logic runs under trio's MockClock (`autojump_clock`), never real sleeps.
- Every test has a deadline: pytest-timeout's global `timeout` plus tighter `fail_after` scopes.
- No network beyond 127.0.0.1 and Unix sockets. AIDs use the reserved `*.aid.test`.
- fastaun (the official SDK, asyncio) only ever runs in a subprocess: tests/interop/fastaun_driver.py.
"""
from __future__ import annotations

import pytest

from tests.helpers import DevnetProcess


def _running_devnet(tmp_path, *args: str):
    proc = DevnetProcess(tmp_path / "devnet", extra_args=list(args))
    proc.start()
    try:
        yield proc
    finally:
        code = proc.stop()
    assert code == 0, f"devnet exited with {code} after SIGTERM"


@pytest.fixture
def devnet(tmp_path):
    """A real `aund devnet` process on 127.0.0.1 with its state in tmp_path; stopped by SIGTERM (exit 0 asserted)."""
    yield from _running_devnet(tmp_path)


@pytest.fixture
def prod_devnet(tmp_path):
    """A `--pki production` devnet (P-384 root, registry and issuer CAs, ES384 login), as `devnet`."""
    yield from _running_devnet(tmp_path, "--pki", "production")


@pytest.fixture
def lenient_devnet(tmp_path):
    """A devnet without the agent.md admission, for tests that drive bare `Link`s: publishing the
    agent.md is the daemon's work (`Daemon._publish_agent_md`), not the link's."""
    yield from _running_devnet(tmp_path, "--no-agent-md-check")
