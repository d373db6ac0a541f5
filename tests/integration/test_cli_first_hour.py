"""Conditions a person causes get one line naming the thing and what to do, never a traceback:
a port in use, a state dir that cannot exist, a reader that goes away (`| head`); and
`aund --version`. Real `aund` processes."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from importlib import metadata

import pytest

from tests.helpers import ROOT

pytestmark = pytest.mark.timeout(60)


def aund(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "aund", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=40, env=dict(os.environ, **(env or {})))


def _one_line(r: subprocess.CompletedProcess, *words: str) -> str:
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    assert all(w in lines[0] for w in words), lines[0]
    return lines[0]


def test_version():
    r = aund("--version")
    assert r.returncode == 0 and r.stdout.strip() == f"aund {metadata.version('aund')}"


def test_devnet_port_in_use_is_one_line(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        listen = f"127.0.0.1:{taken.getsockname()[1]}"
        r = aund("devnet", "--listen", listen, "--state-dir", str(tmp_path / "dv"))
    assert r.returncode == 1
    _one_line(r, "aund devnet", f"cannot listen on {listen}", "in use")


@pytest.mark.parametrize("command", ["devnet", "run"])
def test_a_state_dir_that_cannot_exist_is_named(tmp_path, command):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    bad = blocker / "state"
    extra = ["--listen", "127.0.0.1:0"] if command == "devnet" else ["--socket", str(tmp_path / "s.sock")]
    r = aund(command, "--state-dir", str(bad), *extra, env={"AUND_ENCRYPTION_SEED": "x"})
    assert r.returncode in (1, 2)
    _one_line(r, f"aund {command}", str(blocker), "not a directory")


def test_a_reader_that_goes_away_ends_the_command_quietly(tmp_path):
    """`aund config show | true`: the reader is gone before aund writes a byte."""
    cmd = f"{sys.executable} -m aund config show 2>{tmp_path}/err | true; echo ${{PIPESTATUS[0]}}"
    r = subprocess.run(["bash", "-c", cmd], cwd=ROOT, capture_output=True, text=True, timeout=40)
    status = int(r.stdout.strip().splitlines()[-1])
    err = (tmp_path / "err").read_text()
    assert status in (0, 141), (status, err)  # done, or ended by SIGPIPE as cat or ls would be
    assert "Traceback" not in err and "BrokenPipe" not in err, err
