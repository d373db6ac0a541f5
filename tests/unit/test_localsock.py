"""Unit tests of client_stub.localsock: the default path and the trust rule for the socket's
directory and its listener. Directories of other owners are made with chown, so
this runs as root (the CI does) and fails elsewhere; the processes-and-uids version of the same
attacks is tests/system/test_local_hostile.py."""
from __future__ import annotations

import os
import shutil
import socket
import tempfile
from pathlib import Path

import pytest

from client_stub import localsock
from client_stub.localsock import UnsafeSocketPath, check_bind_dir, check_peer, check_socket_dir

OTHER = 65529


@pytest.fixture
def base():
    if os.geteuid() != 0:
        pytest.fail("test_localsock must run as root (it chowns directories to other uids)", pytrace=False)
    path = Path(tempfile.mkdtemp(prefix="aund-localsock-", dir="/tmp"))
    os.chmod(path, 0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _dir(path: Path, uid: int, mode: int) -> Path:
    path.mkdir()
    os.chown(path, uid, uid)
    os.chmod(path, mode)
    return path


def test_default_paths_never_use_a_fixed_name_under_tmp(monkeypatch):
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    assert localsock.user_socket_path({"XDG_RUNTIME_DIR": "/run/user/1000"}) == Path("/run/user/1000/aund/aund.sock")
    assert localsock.user_socket_path({"HOME": "/h"}) == Path("/h/.local/state/aund/run/aund.sock")
    assert localsock.default_socket_path({"AUND_SOCKET": "/x.sock"}) == Path("/x.sock")
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    assert localsock.default_socket_path({}) == localsock.SYSTEM_SOCKET


def test_connect_side_directory_rule(base):
    own = _dir(base / "own", 0, 0o700)
    assert check_socket_dir(own / "aund.sock") == 0
    setgid = _dir(base / "setgid", 0, 0o2750)  # an admin's group-readable socket directory
    assert check_socket_dir(setgid / "aund.sock") == 0
    # a service account's directory in a parent only root could write (/run/aund): trusted, owner returned
    service = _dir(base / "service", OTHER, 0o750)
    assert check_socket_dir(service / "aund.sock") == OTHER
    # ... but the same in a sticky world-writable parent could be anybody's: refused
    sticky = _dir(base / "sticky", 0, 0o1777)
    planted = _dir(sticky / "aund", OTHER, 0o755)
    with pytest.raises(UnsafeSocketPath, match=f"owned by uid {OTHER}.*where anyone may create it"):
        check_socket_dir(planted / "aund.sock")
    with pytest.raises(UnsafeSocketPath, match=r"is writable by others \(mode 0777\)"):
        check_socket_dir(_dir(base / "open", 0, 0o777) / "aund.sock")
    with pytest.raises(UnsafeSocketPath, match=r"is writable by others \(mode 0770\)"):
        check_socket_dir(_dir(base / "group", 0, 0o770) / "aund.sock")
    # an ancestor of another owner could swap the whole subtree
    theirs = _dir(base / "theirs", OTHER, 0o755)
    inner = _dir(theirs / "inner", 0, 0o755)
    with pytest.raises(UnsafeSocketPath, match=f"{theirs} is owned by uid {OTHER}"):
        check_socket_dir(inner / "aund.sock")
    # a symlink is judged by where it leads
    (base / "link").symlink_to(theirs / "inner")
    with pytest.raises(UnsafeSocketPath, match=f"{theirs} is owned by uid {OTHER}"):
        check_socket_dir(base / "link" / "aund.sock")
    # a directory that is not there: nothing to trust, connect fails on its own
    assert check_socket_dir(base / "missing" / "aund.sock") is None


def test_bind_side_directory_rule(base):
    check_bind_dir(_dir(base / "mine", 0, 0o750))
    with pytest.raises(UnsafeSocketPath, match=f"owned by uid {OTHER}, not by root or this daemon's uid 0"):
        check_bind_dir(_dir(base / "service", OTHER, 0o700))
    with pytest.raises(UnsafeSocketPath, match="writable by others"):
        check_bind_dir(_dir(base / "open", 0, 0o777))
    (base / "file").write_text("")
    with pytest.raises(UnsafeSocketPath, match="is not a directory"):
        check_bind_dir(base / "file")


def test_peer_rule(base):
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    try:  # the peer is this process (root): always accepted
        check_peer(a, base / "aund.sock", None)
        check_peer(a, base / "aund.sock", OTHER)
        assert localsock.peer_uid(a) == 0
    finally:
        a.close()
        b.close()
