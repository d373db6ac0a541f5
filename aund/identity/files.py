"""Durable files for the state dir (layer: aund.identity; stdlib only).

`atomic_write` replaces a file atomically and durably (temp file in the same directory, fsync,
`os.replace`, fsync of the directory); `create_once` creates a file only if nothing is there
(a hard link from a complete temp file: never replaces anything). Both create files 0600 with
O_EXCL|O_NOFOLLOW whatever the umask. A failed write raises StorageError naming the path (and
saying so when the disk is full). `FAULT_HOOK` lets tests stop a write at a chosen stage.
"""
from __future__ import annotations

import base64
import binascii
import contextlib
import errno
import json
import os
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import Any

from aund.identity.errors import CorruptIdentity
from client_stub.errors import StorageError

# Fault injection for tests: called as FAULT_HOOK(stage, path) at "after_write" (temp file
# written, not yet fsynced) and "before_replace" (temp complete, target untouched).
FAULT_HOOK: Callable[[str, Path], None] | None = None


def _fault(stage: str, path: Path) -> None:
    hook = FAULT_HOOK
    if hook is not None:
        hook(stage, path)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


_DISK_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


def write_failed(exc: OSError, path: Path | str) -> StorageError:
    """The API error for a failed write of ``path`` (the disk full, read-only, ...), naming both."""
    why = exc.strerror or str(exc)
    if exc.errno in _DISK_FULL:
        why += " (the disk is full: free space, then aund retries)"
    return StorageError(f"cannot write {path}: {why}",
                        data={"path": str(path), "errno": errno.errorcode.get(exc.errno or 0, "")})


def _write_temp(path: Path, data: bytes, mode: int) -> Path:
    """Write ``data`` to a fresh, fsynced temp file next to ``path``; return the temp path.
    Errors: StorageError naming ``path`` (e.g. the disk is full)."""
    try:
        return _write_temp_raw(path, data, mode)
    except OSError as exc:
        raise write_failed(exc, path) from None


def _write_temp_raw(path: Path, data: bytes, mode: int) -> Path:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW, mode)
    try:
        os.fchmod(fd, mode)  # the umask may have cleared bits; never leave more than asked either
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        _fault("after_write", tmp)
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    os.close(fd)
    return tmp


def atomic_write(path: Path, data: bytes, mode: int = 0o600) -> None:
    """Replace ``path`` with ``data`` atomically and durably.

    Temp file in the same directory (created 0600 with O_EXCL), fsync, ``os.replace``, fsync of
    the directory. A crash at any point leaves either the old file or the new one, never a mix;
    at worst a stray ``.{name}.tmp-*`` file remains, which readers ignore.
    """
    path = Path(path)
    tmp = _write_temp(path, data, mode)
    try:
        _fault("before_replace", path)
        os.replace(tmp, path)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(exc, OSError):
            raise write_failed(exc, path) from None
        raise
    try:
        fsync_dir(path.parent)
    except OSError as exc:
        raise write_failed(exc, path) from None


def create_once_raw(path: Path, data: bytes, mode: int = 0o600) -> bool:
    """Create ``path`` with ``data`` unless it exists (atomic, durable); True if this call created it."""
    tmp = _write_temp(path, data, mode)
    try:
        _fault("before_replace", path)
        os.link(tmp, path)  # atomic create-if-absent: never replaces an existing file
        created = True
    except FileExistsError:
        created = False
    finally:
        with contextlib.suppress(OSError):
            os.unlink(tmp)  # only the temporary name; `path` keeps the inode
    if created:
        fsync_dir(path.parent)
    return created


def create_once(path: Path, data: bytes, mode: int = 0o600) -> bool:
    """Create ``path`` with ``data`` (atomic, durable, ``mode``) unless something is there; True if
    this call created it. Never replaces a file (exports, backups)."""
    return create_once_raw(Path(path), data, mode)


def present(path: Path) -> bool:
    """Whether ``path`` exists; StorageError (naming the owner) if this process may not look."""
    try:
        os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        return False
    except PermissionError as exc:
        try:
            owner = f" (owned by uid {os.stat(path.parent).st_uid})"
        except OSError:
            owner = ""
        raise StorageError(f"cannot read {path.parent}{owner}: {exc.strerror}; give it to the daemon's user "
                           f"(uid {os.geteuid()})", retryable=False, data={"path": str(path.parent)}) from None
    return True


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def unb64(text: Any, what: str, path: Path) -> bytes:
    if not isinstance(text, str):
        raise CorruptIdentity(f"{path}: field {what!r} is missing or not a string", data={"path": str(path)})
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise CorruptIdentity(f"{path}: field {what!r} is not base64", data={"path": str(path)}) from None


def json_bytes(obj: Any) -> bytes:
    return (json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n").encode("utf-8")
