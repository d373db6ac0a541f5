"""Broker layer: acquiring the app-facing Unix socket (bound or handed over by systemd) and reading
the peer's credentials. Imports trio and the stdlib only; reads the environment only through the
``env`` argument of the functions that say so.

- ``bind_unix(path)``: safesocket-style binding: create the directory (0750), refuse a directory
  another user could have made or can write (``UnsafeSocketPath``, the rule of
  ``client_stub.localsock``), dial an existing socket file first (a live daemon ->
  ``DaemonAlreadyRunning``; a dead one -> unlink), bind, chmod 0660, listen.
- ``activated_listeners(env)``: systemd socket activation without libsystemd (``LISTEN_PID``,
  ``LISTEN_FDS``, fds from 3), unsetting the variables afterwards.
- ``peer_credentials(sock)``: ``SO_PEERCRED`` -> (pid, uid, gid).
- ``peer_groups(sock)``: ``SO_PEERGROUPS`` -> the peer's supplementary groups (Linux >= 4.13).
"""
from __future__ import annotations

import errno
import os
import socket
import stat
import struct
import sys
from collections.abc import MutableMapping
from dataclasses import dataclass
from pathlib import Path

import trio

from client_stub.localsock import UnsafeSocketPath, check_bind_dir

__all__ = ["BoundPath", "DaemonAlreadyRunning", "SocketPathInUse", "UnsafeSocketPath", "activated_listeners",
           "bind_unix", "peer_credentials"]

SD_LISTEN_FDS_START = 3
LISTEN_ENV = ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES")
SOCKET_MODE = 0o660
DIR_MODE = 0o750
BACKLOG = 128
_PEERCRED = struct.Struct("3i")
# Python has no name for it: 59 is its value in Linux's asm-generic socket.h, which these
# architectures use; elsewhere (alpha, mips, parisc, sparc: their own numbers) it stays unknown
# and only the primary gid counts, rather than reading some other option.
_GENERIC_SOCKET_ABI = ("x86_64", "i386", "i686", "aarch64", "arm", "riscv", "ppc", "s390", "loongarch")
SO_PEERGROUPS: int | None = getattr(socket, "SO_PEERGROUPS", None) or (
    59 if sys.platform == "linux" and os.uname().machine.startswith(_GENERIC_SOCKET_ABI) else None)
PEERGROUPS_SMALL = 1024  # bytes: the most CPython's getsockopt() reads (256 groups)
NGROUPS_MAX = 65536  # Linux's cap on supplementary groups


class DaemonAlreadyRunning(RuntimeError):
    """Another process answers on the socket path; refuse to steal it (not an API error)."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        super().__init__(f"another aund is already listening on {self.path}; stop it first "
                         f"(systemctl stop aund.service) or pass a different --socket")


class SocketPathInUse(RuntimeError):
    """The socket path exists but is not a socket; refuse to delete it."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        super().__init__(f"{self.path} exists and is not a socket; refusing to replace it")


def _is_live(path: Path) -> bool:
    """Dial ``path``: True if something accepts (or its backlog is full), False if refused."""
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.setblocking(False)
        try:
            probe.connect(str(path))
        except BlockingIOError:  # EAGAIN: a listener with a full backlog is still alive
            return True
        except (ConnectionRefusedError, FileNotFoundError):
            return False
        return True
    finally:
        probe.close()


def bind_unix(path: Path | str, *, mode: int = SOCKET_MODE, dir_mode: int = DIR_MODE,
              backlog: int = BACKLOG) -> trio.SocketListener:
    """Bind a listening Unix socket at ``path`` and return it as a ``trio.SocketListener``.

    The parent directory is created with ``dir_mode`` (0750) if missing (an existing directory
    is left as it is: systemd's ``RuntimeDirectory=`` owns its mode), but it and its ancestors must
    be owned by root or this uid and not writable by group or others (sticky ones excepted), so
    that nobody else can have made it or put a socket there. An existing socket file is dialed
    first: if a daemon answers, nothing is touched.

    Errors: ``UnsafeSocketPath`` if the directory fails that check; ``DaemonAlreadyRunning`` if a
    live process listens on ``path``; ``SocketPathInUse`` if ``path`` exists and is not a socket;
    ``OSError`` from mkdir/bind/chmod (e.g. EACCES).
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True)
    except FileExistsError:
        pass  # someone's: checked below like any existing directory
    else:
        os.chmod(path.parent, dir_mode)  # mkdir's mode is filtered by the umask
    check_bind_dir(path.parent)
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        pass
    else:
        if not stat.S_ISSOCK(st.st_mode):
            raise SocketPathInUse(path)
        if _is_live(path):
            raise DaemonAlreadyRunning(path)
        try:
            path.unlink()  # stale: its daemon died without cleaning up
        except FileNotFoundError:
            pass
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        try:
            sock.bind(str(path))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:  # lost a race with another starting daemon
                raise DaemonAlreadyRunning(path) from None
            raise
        os.chmod(path, mode)
        sock.listen(backlog)
        return trio.SocketListener(trio.socket.from_stdlib_socket(sock))
    except BaseException:
        sock.close()
        raise


@dataclass(frozen=True)
class BoundPath:
    """What ``unlink_if_ours`` needs to remove only the socket file this process created."""

    path: Path
    inode: int
    device: int

    @classmethod
    def of(cls, path: Path) -> "BoundPath":
        st = os.lstat(path)
        return cls(path, st.st_ino, st.st_dev)

    def unlink_if_ours(self) -> bool:
        """Remove the socket file if it is still the one we bound (a successor may own the path)."""
        try:
            st = os.lstat(self.path)
            if (st.st_ino, st.st_dev) != (self.inode, self.device):
                return False
            self.path.unlink()
            return True
        except FileNotFoundError:
            return False


def activated_listeners(env: MutableMapping[str, str] | None = None, *,
                        first_fd: int = SD_LISTEN_FDS_START) -> list[trio.SocketListener]:
    """The listening sockets systemd passed in (``aund.socket``), or ``[]`` if none.

    Follows sd_listen_fds(3): only when ``LISTEN_PID`` equals our pid; fds ``3 .. 3+LISTEN_FDS-1``
    get FD_CLOEXEC; ``LISTEN_PID``, ``LISTEN_FDS`` and ``LISTEN_FDNAMES`` are removed from
    ``env`` (default ``os.environ``) whether or not they were meant for us, so children never
    inherit them.

    Errors: ``ValueError`` if the variables are malformed or a passed fd is not a listening
    ``AF_UNIX`` stream socket (the broker needs ``SO_PEERCRED``).
    """
    env = os.environ if env is None else env
    pid_text, fds_text = env.get("LISTEN_PID"), env.get("LISTEN_FDS")
    for key in LISTEN_ENV:
        env.pop(key, None)
    if not pid_text or not fds_text:
        return []
    try:
        pid, count = int(pid_text), int(fds_text)
    except ValueError:
        raise ValueError(f"malformed LISTEN_PID={pid_text!r} / LISTEN_FDS={fds_text!r}") from None
    if pid != os.getpid():
        return []
    if count < 0:
        raise ValueError(f"malformed LISTEN_FDS={fds_text!r}")
    listeners = []
    for fd in range(first_fd, first_fd + count):
        os.set_inheritable(fd, False)
        sock = socket.socket(fileno=fd)
        if sock.family != socket.AF_UNIX or sock.type != socket.SOCK_STREAM:
            sock.detach()
            raise ValueError(f"activated fd {fd} is not an AF_UNIX stream socket")
        if not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
            sock.detach()
            raise ValueError(f"activated fd {fd} is not listening")
        listeners.append(trio.SocketListener(trio.socket.from_stdlib_socket(sock)))
    return listeners


def peer_credentials(sock: trio.socket.SocketType) -> tuple[int, int, int]:
    """``(pid, uid, gid)`` of the process that connected, from ``SO_PEERCRED`` (Linux).

    Errors: ``OSError`` if the socket is not a connected Unix socket.
    """
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size)
    pid, uid, gid = _PEERCRED.unpack(raw)
    return pid, uid, gid


def peer_groups(sock: trio.socket.SocketType) -> tuple[int, ...]:
    """The supplementary groups of the process that connected, from ``SO_PEERGROUPS`` (Linux):
    taken by the kernel at ``connect()``, together with ``SO_PEERCRED``, so no pid-reuse race.
    ``()`` where the kernel or platform has no such option (then only the primary gid counts).

    Errors: ``OSError`` if the socket is not a connected Unix socket.
    """
    if SO_PEERGROUPS is None:
        return ()
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, SO_PEERGROUPS, PEERGROUPS_SMALL)
    except OSError as exc:
        if exc.errno == errno.ENOPROTOOPT:
            return ()
        if exc.errno != errno.ERANGE:
            raise
        raw = _getsockopt_large(sock.fileno(), socket.SOL_SOCKET, SO_PEERGROUPS, NGROUPS_MAX * 4)
    count = len(raw) // 4
    return struct.unpack(f"={count}I", raw[:count * 4])


def _getsockopt_large(fd: int, level: int, option: int, size: int) -> bytes:
    """``getsockopt`` with a buffer larger than CPython allows (via libc)."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    buf = ctypes.create_string_buffer(size)
    length = ctypes.c_uint32(size)
    if libc.getsockopt(fd, level, option, buf, ctypes.byref(length)) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return buf.raw[:length.value]
