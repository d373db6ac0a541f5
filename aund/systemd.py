"""systemd integration without libsystemd: sd_notify and the watchdog period. Failures are ignored
(a daemon must run the same with or without systemd). Stdlib only."""
from __future__ import annotations

import os
import socket


def notify(*lines: str, env: dict[str, str] | None = None) -> bool:
    """Send `KEY=VALUE` lines to $NOTIFY_SOCKET; returns whether a datagram was sent."""
    env = os.environ if env is None else env
    address = env.get("NOTIFY_SOCKET")
    if not address or not lines:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall("\n".join(lines).encode("utf-8"))
        return True
    except OSError:
        return False


def watchdog_interval(env: dict[str, str] | None = None) -> float | None:
    """Seconds between WATCHDOG=1 pings (half of WATCHDOG_USEC), or None when not asked for."""
    env = os.environ if env is None else env
    usec = env.get("WATCHDOG_USEC", "")
    pid = env.get("WATCHDOG_PID", "")
    if not usec.isdigit() or int(usec) == 0 or (pid and pid != str(os.getpid())):
        return None
    return int(usec) / 2_000_000


PR_GET_DUMPABLE, PR_SET_DUMPABLE = 3, 4


def forbid_core_dumps() -> None:
    """No core dump may ever hold the seed, a private key or a token: RLIMIT_CORE 0 (soft and hard,
    so it cannot be raised again) and PR_SET_DUMPABLE 0 (which also keeps other processes of the same
    uid from ptrace-attaching and from reading /proc/<pid>/mem). Raises OSError if prctl fails."""
    import ctypes
    import resource

    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"prctl(PR_SET_DUMPABLE, 0): {os.strerror(err)}")


def core_dump_state() -> dict[str, int | bool]:
    """What `status` reports: whether this process is dumpable and its core size limit."""
    import ctypes
    import resource

    dumpable = ctypes.CDLL(None, use_errno=True).prctl(PR_GET_DUMPABLE, 0, 0, 0, 0)
    return {"dumpable": dumpable != 0, "core_limit": resource.getrlimit(resource.RLIMIT_CORE)[1]}
