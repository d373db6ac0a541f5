"""The `aund` command line. One module per subcommand, imported only when that subcommand runs,
so that `aund status` / `aund health` never import the daemon's stack.

Exit codes: 0 ok, 1 failed or unhealthy, 2 cannot reach the daemon or bad usage.
"""
from __future__ import annotations

import argparse
import importlib
import signal
import sys

SUBCOMMANDS = {
    "run": "run the daemon",
    "status": "show links, apps, budget and warnings",
    "health": "exit 0 if healthy, 1 if not (with reasons), 2 if the daemon is unreachable",
    "aid": "list, show, ensure, disable/enable, export or import identities; print or replace their agent.md",
    "backup": "copy the state dir (inbox through SQLite's backup API) into a new directory, also while aund runs",
    "call": "call a gateway method as an identity",
    "listen": "print an identity's events as they arrive",
    "link": "restart a link that stopped for good (e.g. kicked by another instance)",
    "metrics": "the daemon's state as OpenMetrics text (or a node-exporter textfile)",
    "config": "show the effective configuration",
    "completion": "print a shell completion script (bash, zsh or tcsh)",
    "devnet": "run a local AUN network (gateway + PKI) on loopback",
    "demo": "devnet + daemon + two apps exchanging E2EE messages, then clean up",
}


# the daemons write to sockets: a peer that goes away must never end them by SIGPIPE
LONG_RUNNING = frozenset({"run", "devnet", "demo"})


def build_parser() -> argparse.ArgumentParser:
    """The whole command line (every subcommand's arguments), for main and for shell completion."""
    parser = argparse.ArgumentParser(
        prog="aund", description="AUN daemon: many identities, one connection each.",
        epilog="exit codes: 0 ok, 1 failed or unhealthy, 2 daemon unreachable or bad usage")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, help_text in SUBCOMMANDS.items():
        module = importlib.import_module(f"aund.cli.{name}")
        module.add_arguments(sub.add_parser(name, help=help_text, description=help_text))
    parser.add_argument("--version", action="store_true", help="print aund's version and exit")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.version:  # looked up only when asked (importlib.metadata is not a cheap import)
        print(f"aund {_version()}")
        return 0
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    if args.command not in LONG_RUNNING:
        # a reader that goes away (`aund status | head`) ends us quietly, as it ends cat or ls
        signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    try:
        return importlib.import_module(f"aund.cli.{args.command}").run(args)
    except KeyboardInterrupt:
        return 130
    except BaseException as exc:  # the last resort for what a person caused: one line, no traceback
        from aund.cli._common import only_os_error, os_error_line, say
        from client_stub.errors import AundError

        if isinstance(exc, AundError):  # a typed answer of the daemon (a full disk there, ...)
            say(f"aund {args.command}: {type(exc).__name__}: {exc.message or exc}", err=True)
            return 1
        found = only_os_error(exc)
        if found is None:
            raise  # a bug: the traceback is what its report needs
        say(f"aund {args.command}: {os_error_line(found)}", err=True)
        return 1


def _version() -> str:
    from importlib import metadata  # not at import: it costs ~40 ms, and `aund health` is a probe

    try:
        return metadata.version("aund")
    except metadata.PackageNotFoundError:  # run from a source tree that is not installed
        from aund import __version__

        return __version__
