"""The shipped systemd files and the README's install steps.

- aund.service has no `RuntimeDirectory=`: systemd would remove /run/aund, and with it the socket
  aund.socket holds, on every `systemctl stop aund`.
- tmpfiles creates /run/aund owned by the daemon's user (mode 0750) before the first start: the
  real systemd-sysusers and systemd-tmpfiles run on the shipped files in a throw-away --root.
- The README's seed step, run as written in a shell with umask 022, never lets the seed file be
  readable by others, not even for a moment (its mode is recorded while the seed is written).
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.helpers import ROOT
from tests.hostile.common import mode, require_root, unit

pytestmark = pytest.mark.timeout(60)


def test_service_has_no_runtime_directory():
    service = unit("aund.service")
    assert service.has_section("Service") and service.get("Service", "User") == "aund"
    runtime = [k for k in service["Service"] if k.startswith("RuntimeDirectory")]
    assert runtime == [], f"aund.service sets {runtime}: stopping aund would remove the activated socket"
    assert unit("aund.socket").get("Socket", "ListenStream") == "/run/aund/aund.sock"


def _passwd(root: Path, name: str) -> tuple[int, int]:
    for line in (root / "etc" / "passwd").read_text().splitlines():
        fields = line.split(":")
        if fields[0] == name:
            return int(fields[2]), int(fields[3])
    raise AssertionError(f"sysusers made no user {name!r}")


def test_tmpfiles_creates_run_aund_for_the_daemon_user(tmp_path):
    require_root("systemd-sysusers and systemd-tmpfiles chown files")
    for tool in ("systemd-sysusers", "systemd-tmpfiles"):
        if shutil.which(tool) is None:
            pytest.fail(f"{tool} is not installed (systemd); the CI image has it", pytrace=False)
    root = tmp_path / "root"
    for sub, conf in (("sysusers.d", "aund.sysusers.conf"), ("tmpfiles.d", "aund.tmpfiles.conf")):
        (root / "usr" / "lib" / sub).mkdir(parents=True)
        shutil.copy(ROOT / "systemd" / conf, root / "usr" / "lib" / sub / "aund.conf")
    (root / "etc").mkdir()
    for cmd in (["systemd-sysusers", f"--root={root}"], ["systemd-tmpfiles", "--create", f"--root={root}"]):
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
        assert done.returncode == 0, (cmd, done.stderr)
    service = unit("aund.service")
    uid, gid = _passwd(root, service.get("Service", "User"))
    run_dir = root / "run" / "aund"
    assert run_dir.is_dir(), "tmpfiles does not create /run/aund: it is root's (made by aund.socket) at first start"
    st = os.stat(run_dir)
    assert (st.st_uid, st.st_gid, mode(run_dir)) == (uid, gid, 0o750), (st.st_uid, st.st_gid, oct(mode(run_dir)))


def _readme_seed_step() -> str:
    """The install block's line that writes /etc/aund/encryption_seed, without its comment."""
    readme = (ROOT / "README.md").read_text()
    lines = [x for x in readme.splitlines() if "/etc/aund/encryption_seed" in x and "urandom" in x]
    assert len(lines) == 1, lines
    return re.sub(r"\s+#\s.*$", "", lines[0]).strip()


# stands in for the named tool: records the mode of its stdout (the seed file, when the shell
# redirects the tool's output there) at the moment it runs, then runs the real tool
_SHIM = """#!/bin/sh
if [ -f /proc/$$/fd/1 ]; then stat -L -c '%a' /proc/$$/fd/1 >> "$SEED_MODES"; fi
exec {real} "$@"
"""


def test_readme_seed_step_never_leaves_the_seed_readable_by_others(tmp_path):
    step = _readme_seed_step()
    etc = tmp_path / "etc-aund"
    etc.mkdir()
    shims = tmp_path / "bin"
    shims.mkdir()
    for tool in ("head", "base64", "openssl", "tr", "od", "xxd"):
        real = shutil.which(tool)
        if real:
            (shims / tool).write_text(_SHIM.format(real=real))
            (shims / tool).chmod(0o755)
    modes = tmp_path / "modes"
    command = step.replace("/etc/aund/", f"{etc}/")
    done = subprocess.run(["sh", "-c", f"umask 022 && {command}"], capture_output=True, text=True, timeout=20,
                          env={**os.environ, "PATH": f"{shims}:{os.environ['PATH']}", "SEED_MODES": str(modes)})
    assert done.returncode == 0, done.stderr
    seed = etc / "encryption_seed"
    seen = modes.read_text().split() if modes.exists() else []
    assert seen, f"no tool of the step {step!r} wrote the seed file"  # the shims saw the write
    assert all(int(m, 8) & 0o077 == 0 for m in seen), f"the seed file was {seen} while being written"
    assert mode(seed) == 0o600
    assert len(seed.read_bytes().strip()) >= 32
