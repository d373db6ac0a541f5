"""Errors of the identity store (layer: aund.identity; imports client_stub.errors only).

Each is an API error (a subclass of the shared ``client_stub.errors`` tree) that keeps its
base class's wire ``code``, so it crosses the local socket as that nearest known class (the
message says which case it is); ``data`` carries the machine-readable details (aid, path,
pid). Messages name the file or setting a human has to look at and never contain key
material or the seed.
"""
from __future__ import annotations

from typing import Any

from client_stub.errors import (
    ClientError,
    InvalidParams,
    ResourceAlreadyExistError,
    ResourceNotExistError,
    StorageError,
)

__all__ = [
    "IdentityNotFound", "IdentityConflict", "InvalidIdentity", "SeedMissing", "SeedMismatch",
    "CorruptIdentity", "CertKeyMismatch", "StateDirLocked",
]


class IdentityNotFound(ResourceNotExistError):
    """No identity of that AID in the store (or no fastaun identity at the import path)."""


class IdentityConflict(ResourceAlreadyExistError):
    """The AID already exists (in the store or pending registration) with a different key."""


class InvalidIdentity(InvalidParams):
    """The AID name is not usable as a store entry, or an imported key is of an unsupported kind."""


class SeedMissing(ClientError):
    """No encryption seed is configured (neither the environment nor a systemd credential)."""


class SeedMismatch(ClientError):
    """The configured seed does not decrypt a file that was encrypted under another seed."""


class CorruptIdentity(StorageError):
    """A stored file is missing, unparsable or fails authentication; ``data['path']`` names it.

    Not retryable: reading the same bytes again gives the same answer.
    """

    default_retryable = False


class CertKeyMismatch(ClientError):
    """A certificate does not certify this AID's key (other public key, or other subject CN)."""


class StateDirLocked(ClientError):
    """Another aund process holds the state directory's lock; ``holder_pid`` names it if known."""

    def __init__(self, holder_pid: int | None, path: Any, message: str = "", **kw: Any) -> None:
        who = f"aund pid {holder_pid}" if holder_pid else "another aund process"
        message = message or (
            f"state dir {path} is in use by {who} (lock file {path}/aund.lock); "
            "stop that daemon or use another state dir")
        data = dict(kw.pop("data", None) or {})
        data.update(holder_pid=holder_pid, path=str(path))
        super().__init__(message, data=data, **kw)

    @property
    def holder_pid(self) -> int | None:
        return self.data.get("holder_pid")

    @property
    def path(self) -> str:
        return str(self.data.get("path", ""))
