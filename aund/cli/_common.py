"""Shared bits of the client-side subcommands. Imports only the stdlib and client_stub (never the
daemon's stack), so `aund status` / `aund health` start in tens of milliseconds."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

EXIT_OK, EXIT_FAILED, EXIT_UNREACHABLE = 0, 1, 2
SYSTEMD_HINT = "is the service running? try: systemctl status aund.service (or start one: aund run)"


def add_socket_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--socket", type=Path, help="aund's socket (default: $AUND_SOCKET, then the standard path)")


def open_client(args: argparse.Namespace, timeout: float = 30.0):
    """A connected Client; raises DaemonUnavailable (callers turn it into exit code 2)."""
    from client_stub import Client

    return Client(args.socket, app=f"aund-cli {args.command}", timeout=timeout, reconnect_attempts=0).connect()


def unreachable(exc: Exception) -> int:
    message = getattr(exc, "message", None) or str(exc)
    print(f"aund: {message}", file=sys.stderr)
    if "systemctl" not in message:
        print(f"aund: {SYSTEMD_HINT}", file=sys.stderr)
    return EXIT_UNREACHABLE


def print_json(value: Any) -> None:
    json.dump(value, sys.stdout, indent=2, sort_keys=True, default=str)
    sys.stdout.write("\n")


def table(rows: list[list[Any]], headers: list[str]) -> str:
    cells = [[str(c) for c in headers]] + [["" if c is None else str(c) for c in row] for row in rows]
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
