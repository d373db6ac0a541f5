"""The systemd contract, seen through a fake NOTIFY_SOCKET the test owns."""
from __future__ import annotations

import os
import shutil
from pathlib import Path
import socket
import subprocess
import time

import pytest

from tests.helpers import ROOT, AundProcess

pytestmark = pytest.mark.timeout(120)


def _read_all(sock: socket.socket, until: float) -> list[tuple[float, str]]:
    out = []
    while time.monotonic() < until:
        sock.settimeout(max(0.01, until - time.monotonic()))
        try:
            data = sock.recv(4096)
        except (TimeoutError, socket.timeout):
            break
        out.append((time.monotonic(), data.decode()))
    return out


def test_ready_watchdog_and_stopping(devnet, tmp_path):
    notify_path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(notify_path))
    aid = f"sd-{os.getpid() % 10000}.aid.test"
    cfg = tmp_path / "aund.toml"
    cfg.write_text(f'gateway_url = ["{devnet.gateway_url}"]\nroot_ca = ["{devnet.root_ca}"]\nidentities = ["{aid}"]\n')
    daemon = AundProcess(tmp_path / "state", tmp_path / "aund.sock", cfg,
                         env={"NOTIFY_SOCKET": str(notify_path), "WATCHDOG_USEC": "400000"})
    try:
        daemon.start()
        msgs = _read_all(sock, time.monotonic() + 2.0)
        texts = [m for _, m in msgs]
        ready = [i for i, m in enumerate(texts) if "READY=1" in m.split("\n")]
        assert ready, texts
        started = [e for e in daemon.log_events() if e.get("event") == "daemon.started"]
        assert started  # READY came with (after) the start of the configured links
        pings = [t for t, m in msgs if m == "WATCHDOG=1"]
        assert 4 <= len(pings) <= 14, len(pings)  # every ~0.2 s (half of WATCHDOG_USEC)
        gaps = [b - a for a, b in zip(pings, pings[1:])]
        assert max(gaps) < 0.5
        assert any(m.startswith("STATUS=") for m in texts)
        daemon.proc.send_signal(15)
        tail = _read_all(sock, time.monotonic() + 5.0)
        assert any("STOPPING=1" in m for _, m in tail)
        assert daemon.proc.wait(20) == 0
    finally:
        daemon.stop()
        sock.close()


def test_units_verify(tmp_path):
    """The units as shipped, with ExecStart= pointed at this checkout's aund instead of the README's
    /opt/aund venv (systemd-analyze checks that the binary exists)."""
    import sys

    tool = shutil.which("systemd-analyze")
    assert tool, "systemd-analyze is missing: ./dev and .ci/run install Debian's systemd package"
    unit = (ROOT / "systemd/aund.service").read_text()
    assert "ExecStart=/opt/aund/bin/aund run " in unit  # the README's install: python3 -m venv /opt/aund
    here = Path(sys.executable).parent / "aund"
    assert here.exists(), here
    (tmp_path / "aund.service").write_text(unit.replace("/opt/aund/bin/aund", str(here)))
    shutil.copy(ROOT / "systemd/aund.socket", tmp_path / "aund.socket")
    done = subprocess.run([tool, "verify", "aund.service", "aund.socket"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr


def test_socket_activation_passes_the_listener_as_fd_3(devnet, tmp_path):
    """As systemd's aund.socket does: the listening socket is fd 3, LISTEN_FDS=1, LISTEN_PID=the daemon."""
    import sys

    from client_stub import Client

    path = tmp_path / "activated.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(16)
    fd = listener.fileno()
    cfg = tmp_path / "aund.toml"
    cfg.write_text(f'gateway_url = ["{devnet.gateway_url}"]\nroot_ca = ["{devnet.root_ca}"]\n')
    env = {**os.environ, "AUND_ENCRYPTION_SEED": "seed", "LISTEN_FDS": "1"}
    # LISTEN_PID must be the daemon's own pid: a shell sets it to $$ and then execs into aund
    cmd = (f'LISTEN_PID=$$ exec "{sys.executable}" -m aund run --config "{cfg}" '
           f'--state-dir "{tmp_path / "state"}" --socket "{tmp_path / "unused.sock"}"')
    proc = subprocess.Popen(["sh", "-c", cmd], cwd=ROOT, env=env, stderr=subprocess.PIPE, text=True,
                            pass_fds=(3,), preexec_fn=None if fd == 3 else lambda: os.dup2(fd, 3))
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                with Client(path, reconnect_attempts=0) as client:
                    assert client.ping() >= 0
                    break
            except Exception:  # noqa: BLE001 - not serving yet
                assert time.monotonic() < deadline and proc.poll() is None, proc.stderr.read() if proc.poll() else ""
                time.sleep(0.1)
        assert not (tmp_path / "unused.sock").exists()  # it served the activated socket, bound nothing
    finally:
        proc.send_signal(15)
        code = proc.wait(20)
        proc.stderr.close()
        listener.close()
    assert code == 0
    assert path.exists()  # an activated socket belongs to systemd: aund does not remove it
