"""Shared bits of the client-side subcommands. Imports only the stdlib and client_stub (never the
daemon's stack), so `aund status` / `aund health` start in tens of milliseconds.

Everything a printer shows goes through ``printable`` (``say`` and ``table`` call it): app names,
AIDs, warnings and error messages come from other processes and peers, and a raw ESC or newline
in them would repaint or forge the terminal's output. ``print_json`` is safe as it is (JSON
escapes control characters, and ``ensure_ascii`` the rest)."""
from __future__ import annotations

import argparse
import errno
import json
import sys
from pathlib import Path
from typing import Any

EXIT_OK, EXIT_FAILED, EXIT_UNREACHABLE = 0, 1, 2
SYSTEMD_HINT = "is the service running? try: systemctl status aund.service (or start one: aund run)"


def printable(value: Any) -> str:
    """``str(value)`` with every non-printable character (C0/C1 controls, DEL, bidi and other
    format characters, line and paragraph separators) written repr-style: ``\\x1b``, ``\\n``,
    ``\\u202e``. Printable text, non-ASCII included, is left alone."""
    text = value if isinstance(value, str) else str(value)
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def say(*parts: Any, err: bool = False, flush: bool = False) -> None:
    """Print one line made of ``parts`` (joined by spaces), made ``printable``."""
    print(printable(" ".join(str(p) for p in parts)), file=sys.stderr if err else sys.stdout, flush=flush)


def add_socket_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--socket", type=Path, help="aund's socket (default: $AUND_SOCKET, then the standard path)")


def open_client(args: argparse.Namespace, timeout: float = 30.0):
    """A connected Client; raises DaemonUnavailable (callers turn it into exit code 2)."""
    from client_stub import Client

    return Client(args.socket, app=f"aund-cli {args.command}", timeout=timeout, reconnect_attempts=0).connect()


def unreachable(exc: Exception) -> int:
    message = getattr(exc, "message", None) or str(exc)
    say(f"aund: {message}", err=True)
    if "systemctl" not in message:
        say(f"aund: {SYSTEMD_HINT}", err=True)
    return EXIT_UNREACHABLE


def print_json(value: Any) -> None:
    json.dump(value, sys.stdout, indent=2, sort_keys=True, default=str)
    sys.stdout.write("\n")


def table(rows: list[list[Any]], headers: list[str]) -> str:
    cells = [[printable(c) for c in headers]] + [["" if c is None else printable(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def ago(timestamp: float | None, now: float) -> str:
    if not timestamp:
        return "never"
    seconds = max(0, int(now - timestamp))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit} ago"
    return f"{seconds}s ago"


_OS_HINTS = {
    errno.ENOSPC: "the disk is full: free space there",
    errno.EDQUOT: "the disk quota is used up: free space there",
    errno.EACCES: "permission denied: check its owner and mode, or run as the user that owns it",
    errno.EPERM: "not permitted: check its owner and mode, or run as the user that owns it",
    errno.EROFS: "the file system is read-only: choose a writable place",
    errno.ENOENT: "it does not exist: check the path",
    errno.ENOTDIR: "a part of the path is a file, not a directory: move that file away or choose another path",
    errno.EISDIR: "it is a directory, not a file",
    errno.EEXIST: "it exists already and is in the way",
    errno.EADDRINUSE: "the address is in use: stop what listens there or choose another one",
    errno.EADDRNOTAVAIL: "the address is not one of this machine's",
}


def os_error_line(exc: OSError) -> str:
    """One line for an OSError a person caused (a bad path, a full disk, a port in use): what, where
    and what to do."""
    where = " ".join(str(f) for f in (exc.filename, exc.filename2) if f)
    what = exc.strerror or str(exc)
    hint = _OS_HINTS.get(exc.errno or -1, "")
    return f"{where + ': ' if where else ''}{what}{' (' + hint + ')' if hint else ''}"


def only_error(exc: BaseException, kind: type[BaseException]) -> Any:
    """The `kind` error that `exc` is or (through exception groups, e.g. trio's nurseries) wraps
    alone; None otherwise."""
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc if isinstance(exc, kind) else None


def only_os_error(exc: BaseException) -> OSError | None:
    return only_error(exc, OSError)
