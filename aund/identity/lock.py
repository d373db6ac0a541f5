"""One daemon per state dir: an exclusive flock on `{state_dir}/aund.lock` (layer: aund.identity)."""
from __future__ import annotations

import fcntl
import os
from pathlib import Path

from aund.identity.errors import StateDirLocked


class StateLock:
    """Exclusive ``flock`` on ``{state_dir}/aund.lock`` holding the owner's pid.

    The kernel drops the lock when the process dies (SIGKILL included) or closes the file; the
    file itself is never deleted. The fd is O_CLOEXEC, so exec'd children do not keep the lock
    (a child forked *without* exec would). Use as a context manager or ``acquire``/``release``.
    Errors: StateDirLocked(holder_pid, state_dir).
    """

    def __init__(self, state_dir: Path | str) -> None:
        self.state_dir = Path(state_dir)
        self.path = self.state_dir / "aund.lock"
        self._fd: int | None = None

    @property
    def locked(self) -> bool:
        return self._fd is not None

    def acquire(self) -> StateLock:
        if self._fd is not None:
            return self
        if not self.state_dir.exists():
            self.state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            os.chmod(self.state_dir, 0o700)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_pid(fd)
            os.close(fd)
            raise StateDirLocked(holder, self.state_dir) from None
        except BaseException:
            os.close(fd)
            raise
        os.fchmod(fd, 0o600)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode("ascii"), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)  # drops the flock; the file (and its stale pid) stays

    def __enter__(self) -> StateLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def _read_pid(fd: int) -> int | None:
    try:
        text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None
