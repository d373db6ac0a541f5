"""Test rules for aund (read before adding a test):

- Real processes and real sockets, on loopback or in a temp dir; fakes only to inject faults.
- Time-based logic runs under trio's MockClock (`autojump_clock`), never real sleeps.
- Every test has a deadline: pytest-timeout's global `timeout` plus tighter `fail_after` scopes.
- No network beyond 127.0.0.1 and Unix sockets. AIDs use the reserved `*.aid.test`.
- fastaun (the official SDK, asyncio) only ever runs in a subprocess: tests/interop/fastaun_driver.py.
"""
from __future__ import annotations

import os

import pytest

from tests.helpers import DevnetProcess
from tests.system.harness import group_socket_dir, start_aund


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


@pytest.fixture
def aund_on_devnet(devnet, tmp_path):
    """`aund_on_devnet(aids=(), **config)` -> a started `aund run` process (tests.helpers.AundProcess)
    on the `devnet` fixture, state and socket under tmp_path; every one started is stopped at the
    end (exit 0 asserted)."""
    started = []

    def start(aids=(), **extra):
        proc = start_aund(tmp_path, devnet, aids, name=f"aund{len(started) or ''}", extra=extra or None)
        started.append(proc)
        return proc

    yield start
    for proc in started:
        assert proc.stop() == 0


@pytest.fixture
def nogroup_socket_dir():
    """A directory for a daemon's socket, root:nogroup 2750 (root only, as the CI runs): the socket
    inherits group nogroup, so apps of uid 65534 (primary group nogroup) can connect. Removed after."""
    if os.geteuid() != 0:
        pytest.fail("this test must run as root (the CI does): it connects as uid 65534", pytrace=False)
    with group_socket_dir() as sock:
        yield sock.parent
