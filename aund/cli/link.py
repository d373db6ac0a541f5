"""`aund link restart AID [--slot SLOT]`: start a link that stopped for good (kicked by another
instance of the identity with 4015, refused by the gateway) again, without restarting the daemon."""
from __future__ import annotations

import argparse

from aund.cli._common import EXIT_FAILED, EXIT_OK, add_socket_argument, open_client, print_json, say, unreachable


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="link_command", metavar="restart", required=True)
    restart = sub.add_parser("restart", help="start a stopped link again (a running one is left alone)")
    add_socket_argument(restart)
    restart.add_argument("aid")
    restart.add_argument("--slot", default="main")
    restart.add_argument("--json", action="store_true")


def run(args: argparse.Namespace) -> int:
    from client_stub import AundError, DaemonUnavailable

    try:
        with open_client(args) as client:
            result = client.restart_link(args.aid, args.slot)
    except DaemonUnavailable as exc:
        return unreachable(exc)
    except AundError as exc:
        say(f"aund link restart: {type(exc).__name__}: {exc.message or exc}", err=True)
        return EXIT_FAILED
    if args.json:
        print_json(result)
    elif result["restarted"]:
        say(f"{result['aid']}/{result['slot_id']}: started again ({result['state']})")
    else:
        say(f"{result['aid']}/{result['slot_id']}: running ({result['state']}), left as it is")
    return EXIT_OK
