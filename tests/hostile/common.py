"""Shared verbs of the hostile-state tests: a second uid made with useradd, an
`aund run` exec'ed as that uid, shell wraps (umask, ulimit) and the `aund` CLI as a subprocess.

Why the namespace: the test interpreter lives under /root (mode 0700), which another uid cannot
traverse, so it cannot exec it. `as_user` runs the daemon in a private mount namespace where the
one unsearchable ancestor of the interpreter's prefix (/root) is covered by a 0755 tmpfs with the
interpreter's directory (/root/.pyenv) bound back into it; nothing outside that namespace sees
this. The daemon is then exec'ed (setpriv, no supplementary groups) as the other uid, exactly as
systemd's `User=` would; the pid stays the same through unshare, sh and setpriv (all exec).
"""
from __future__ import annotations

import configparser
import contextlib
import fcntl
import os
import pwd
import shutil
import stat
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import ROOT, AundProcess

USER = "aund-hostile"  # the daemon's user in these tests (systemd's `aund`)

_AS_USER = ('set -e; mount --bind "$1" "$2"; mount -t tmpfs -o mode=0755,size=64k tmpfs "$3"; '
            'mkdir "$1"; mount --bind "$2" "$1"; uid=$4; gid=$5; shift 5; '
            'exec setpriv --reuid="$uid" --regid="$gid" --clear-groups -- "$@"')


def require_root(why: str) -> None:
    """FAIL (not skip) when not root: the CI runs these as root."""
    if os.geteuid() != 0:
        pytest.fail(f"must run as root (the CI does): {why}; running as uid {os.geteuid()}", pytrace=False)


def daemon_user() -> tuple[int, int]:
    """(uid, gid) of the test daemon user, created with useradd on first use (a system user with its
    own group and no home, as systemd-sysusers makes `aund`)."""
    with open("/tmp/.aund-test-useradd.lock", "a") as lock:  # test workers in parallel make it once
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            pw = pwd.getpwnam(USER)
        except KeyError:
            subprocess.run(["useradd", "--system", "--user-group", "--no-create-home", "--home-dir", "/nonexistent",
                            "--shell", "/usr/sbin/nologin", USER], check=True, capture_output=True, timeout=30)
            pw = pwd.getpwnam(USER)
    return pw.pw_uid, pw.pw_gid


@contextlib.contextmanager
def shared_dir(prefix: str) -> Iterator[Path]:
    """A fresh 0755 directory under /tmp (pytest's tmp_path is under a 0700 root-only directory)."""
    path = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    os.chmod(path, 0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _hidden_ancestor() -> Path | None:
    """The first ancestor of the interpreter's prefix that others may not search (e.g. /root)."""
    prefix = Path(os.path.realpath(sys.base_prefix))
    for d in reversed(prefix.parents):
        if d != Path("/") and not os.stat(d).st_mode & stat.S_IXOTH:
            return d
    return None


def as_user(uid: int, gid: int, scratch: Path) -> Callable[[list[str]], list[str]]:
    """An argv wrap: exec the command as uid:gid (see the module docstring). `scratch` is an empty
    directory of ours the interpreter's directory is bound to on the way."""
    hidden = _hidden_ancestor()
    if hidden is None:
        return lambda argv: ["setpriv", f"--reuid={uid}", f"--regid={gid}", "--clear-groups", "--", *argv]
    inner = hidden / Path(os.path.realpath(sys.base_prefix)).relative_to(hidden).parts[0]
    mnt = scratch / "interp"
    mnt.mkdir(exist_ok=True)
    return lambda argv: ["unshare", "-m", "--propagation", "private", "sh", "-c", _AS_USER, "sh",
                         str(inner), str(mnt), str(hidden), str(uid), str(gid), *argv]


def in_shell(prelude: str, wrap: Callable[[list[str]], list[str]] | None = None) -> Callable[[list[str]], list[str]]:
    """An argv wrap: run `prelude` (e.g. "umask 022", "ulimit -c unlimited") in sh, then exec the
    command (through `wrap` if given), as a shell session started by hand would."""
    return lambda argv: ["sh", "-c", f'{prelude} && exec "$@"', "sh", *(wrap(argv) if wrap else argv)]


def aund_cli(*args: str, timeout: float = 20.0, env: dict[str, str] | None = None,
             **popen: Any) -> subprocess.CompletedProcess:
    """`python -m aund ARGS...` from the tree under test; stdout and stderr captured as text."""
    full_env = {**os.environ, **(env or {})}
    full_env.pop("AUND_CONFIG", None)
    return subprocess.run([sys.executable, "-m", "aund", *args], capture_output=True, text=True, cwd=ROOT,
                          env=full_env, timeout=timeout, **popen)


def mode(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


def modes_under(root: Path) -> dict[str, str]:
    """The permission bits of root and everything below it, as octal text by relative path. A
    running daemon writes through temporary files it renames into place: one that is gone between
    listing and lstat is skipped (it was checked if it was seen)."""
    found = {}
    for p in [root, *root.rglob("*")]:
        try:
            found[str(p.relative_to(root))] = oct(mode(p))
        except FileNotFoundError:
            continue
    return found


def user_daemon(base: Path, uid: int, gid: int, *, config: Path | None = None,
                prelude: str | None = None, env: dict[str, str] | None = None) -> AundProcess:
    """An `aund run` (not started) exec'ed as uid:gid, its state in base/state and its socket in
    base/run, both directories given to that user first (as StateDirectory= and tmpfiles do)."""
    for name in ("state", "run"):
        (base / name).mkdir(mode=0o700, exist_ok=True)
        os.chown(base / name, uid, gid)
    wrap = as_user(uid, gid, base)
    return AundProcess(base / "state", base / "run" / "aund.sock", config,
                       env={"HOME": str(base), **(env or {})},
                       wrap=in_shell(prelude, wrap) if prelude else wrap)


def unit(name: str) -> configparser.ConfigParser:
    """A shipped systemd unit (systemd/NAME) parsed as systemd reads it: repeated keys allowed (the
    last wins), keys case-sensitive, no interpolation."""
    parsed = configparser.ConfigParser(strict=False, interpolation=None)
    parsed.optionxform = str
    parsed.read(ROOT / "systemd" / name)
    return parsed
