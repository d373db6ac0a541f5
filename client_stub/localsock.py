"""Where aund's socket is and whether it can be trusted (layer: client_stub; the stdlib only).

The app and the daemon both import this module, so one rule decides the default path and one
rule decides whether a directory is safe to bind or to connect in.

Default path (``default_socket_path``): ``$AUND_SOCKET`` if set, else ``/run/aund/aund.sock`` for
root, else ``$XDG_RUNTIME_DIR/aund/aund.sock``, else (no runtime dir, e.g. cron or ``su``)
``${XDG_STATE_HOME:-~/.local/state}/aund/run/aund.sock``, a directory under the user's home that
nobody else can create first. There is no fallback under ``/tmp``: a fixed name there can be
squatted by any local user before you start.

Who may be on the other end (``check_socket_dir`` before connect, ``check_peer`` after):

1. every ancestor of the socket's directory is owned by root or you and is not writable by its
   group or others, unless it is sticky (``/tmp``): a sticky directory only lets an entry's owner
   move it;
2. the socket's directory is not writable by group or others, and is owned by root, by you, or by
   a third uid (a service account such as ``aund``) only if its parent is not writable by group or
   others at all, i.e. only root or you could have placed it there (``/run/aund``);
3. the process that listens (``SO_PEERCRED``, taken by the kernel at ``listen()``) runs as root,
   as you, or as the directory's owner. Root covers systemd socket activation (pid 1 listens).

The daemon binds only in a directory owned by root or by its own uid (``check_bind_dir``), with
the same rule for the ancestors.
"""
from __future__ import annotations

import os
import socket
import stat
import struct
from collections.abc import Mapping
from pathlib import Path

ENV_SOCKET = "AUND_SOCKET"
SYSTEM_SOCKET = Path("/run/aund/aund.sock")
SOCKET_NAME = "aund.sock"
UNSAFE_HINT = ("set XDG_RUNTIME_DIR (e.g. /run/user/$(id -u)) or pass --socket / AUND_SOCKET "
               "in a directory only you (or root) can write to")
_PEERCRED = struct.Struct("3i")


class UnsafeSocketPath(Exception):
    """The socket's directory, or the process listening on it, is not trusted; ``str()`` is one
    line naming the directory (or uid) and what to do."""


def user_socket_path(env: Mapping[str, str]) -> Path:
    """The socket of a user's own daemon: under ``$XDG_RUNTIME_DIR``, else under the state home."""
    runtime = env.get("XDG_RUNTIME_DIR")
    if runtime and os.path.isabs(runtime):
        return Path(runtime) / "aund" / SOCKET_NAME
    state = env.get("XDG_STATE_HOME")
    base = Path(state) if state and os.path.isabs(state) else _home(env) / ".local" / "state"
    return base / "aund" / "run" / SOCKET_NAME


def _home(env: Mapping[str, str]) -> Path:
    home = env.get("HOME")
    return Path(home) if home else Path.home()


def default_socket_path(env: Mapping[str, str] | None = None) -> Path:
    """Where an app looks for aund, by the rule in the module docstring; a user without a daemon
    of their own reaches the system socket when only that exists."""
    env = os.environ if env is None else env
    if env.get(ENV_SOCKET):
        return Path(env[ENV_SOCKET])
    if os.geteuid() == 0:
        return SYSTEM_SOCKET
    user = user_socket_path(env)
    if not user.exists() and SYSTEM_SOCKET.exists():
        return SYSTEM_SOCKET
    return user


def _loose(mode: int) -> bool:
    return bool(mode & (stat.S_IWGRP | stat.S_IWOTH))


def _check_ancestors(directory: Path, me: int) -> None:
    for ancestor in directory.parents:
        st = os.stat(ancestor)
        if st.st_uid not in (0, me):
            raise UnsafeSocketPath(f"{ancestor} is owned by uid {st.st_uid}, not by root or you (uid {me}); "
                                   f"{UNSAFE_HINT}")
        if _loose(st.st_mode) and not st.st_mode & stat.S_ISVTX:
            raise UnsafeSocketPath(f"{ancestor} is writable by others (mode {stat.S_IMODE(st.st_mode):04o}); "
                                   f"{UNSAFE_HINT}")


def _check_dir_mode(directory: Path, st: os.stat_result) -> None:
    if not stat.S_ISDIR(st.st_mode):
        raise UnsafeSocketPath(f"{directory} is not a directory; {UNSAFE_HINT}")
    if _loose(st.st_mode):
        raise UnsafeSocketPath(f"{directory} is writable by others (mode {stat.S_IMODE(st.st_mode):04o}): "
                               f"anyone could put a socket there; remove it, or {UNSAFE_HINT}")


def check_socket_dir(path: Path | str) -> int | None:
    """Before connecting to ``path``: check its directory by rules 1 and 2 of the module docstring
    and return the directory's owner uid (None if the directory cannot be looked at: then connect
    fails on its own and only root or you are accepted as the peer).

    Errors: ``UnsafeSocketPath`` (one line naming the directory and what to do).
    """
    me = os.geteuid()
    try:
        directory = Path(os.path.realpath(Path(path).parent))
        st = os.stat(directory)
        _check_dir_mode(directory, st)
        _check_ancestors(directory, me)
        if st.st_uid not in (0, me):
            parent = os.stat(directory.parent)
            if _loose(parent.st_mode):
                raise UnsafeSocketPath(f"{directory} is owned by uid {st.st_uid}, not by root or you (uid {me}), "
                                       f"and lies in {directory.parent}, where anyone may create it; "
                                       f"remove it, or {UNSAFE_HINT}")
    except (FileNotFoundError, PermissionError, NotADirectoryError):
        return None
    return st.st_uid


def check_bind_dir(directory: Path | str) -> None:
    """Before the daemon binds in ``directory`` (which exists): it must be owned by root or the
    daemon's uid and not writable by group or others, and so must its ancestors (sticky ones may
    be world-writable).

    Errors: ``UnsafeSocketPath``; ``OSError`` if a directory cannot be looked at.
    """
    me = os.geteuid()
    directory = Path(os.path.realpath(directory))
    st = os.stat(directory)
    _check_dir_mode(directory, st)
    if st.st_uid not in (0, me):
        raise UnsafeSocketPath(f"{directory} is owned by uid {st.st_uid}, not by root or this daemon's uid {me}: "
                               f"another user may be waiting for your apps there; {UNSAFE_HINT}")
    _check_ancestors(directory, me)


def peer_uid(sock: socket.socket) -> int | None:
    """The uid of the process at the other end of a connected Unix socket (``SO_PEERCRED``), or None
    where the platform has no such option."""
    option = getattr(socket, "SO_PEERCRED", None)
    if option is None:
        return None
    raw = sock.getsockopt(socket.SOL_SOCKET, option, _PEERCRED.size)
    return _PEERCRED.unpack(raw)[1]


def check_peer(sock: socket.socket, path: Path | str, dir_owner: int | None) -> None:
    """After connecting: the listener must run as root, as you, or as the directory's owner (rule 3).

    Errors: ``UnsafeSocketPath`` naming the uid found.
    """
    uid = peer_uid(sock)
    me = os.geteuid()
    if uid is None or uid in (0, me) or uid == dir_owner:
        return
    owner = "" if dir_owner is None else f" or the owner of {Path(path).parent} (uid {dir_owner})"
    raise UnsafeSocketPath(f"the process listening on {path} runs as uid {uid}, not as root, you (uid {me}){owner}: "
                           f"it is not your aund; {UNSAFE_HINT}")
