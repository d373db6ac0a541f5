"""`aund call AID METHOD [JSON]`: one gateway RPC as that identity (E2EE for message.send)."""
from __future__ import annotations

import argparse
import json
import sys

from aund.cli._common import EXIT_FAILED, EXIT_OK, add_socket_argument, open_client, print_json, say, unreachable


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_socket_argument(p)
    p.add_argument("aid")
    p.add_argument("method", help="e.g. meta.ping, message.send, group.send")
    p.add_argument("params", nargs="?", default="{}", help="JSON object of params (default {}); - reads stdin")
    p.add_argument("--slot", default="main", help="slot id (default main)")
    p.add_argument("--timeout", type=float, default=35.0)
    p.add_argument("--background", action="store_true", help="count against the background budget")


def run(args: argparse.Namespace) -> int:
    from client_stub import AundError, DaemonUnavailable

    text = sys.stdin.read() if args.params == "-" else args.params
    try:
        params = json.loads(text)
    except ValueError as exc:
        say(f"aund call: params are not JSON: {exc}", err=True)
        return 2
    if not isinstance(params, dict):
        say("aund call: params must be a JSON object", err=True)
        return 2
    try:
        with open_client(args, timeout=args.timeout + 5) as client:
            session = client.session(args.aid, slot_id=args.slot)
            session.wait_ready(timeout=args.timeout)
            result = session.call(args.method, params, timeout=args.timeout, background=args.background)
    except DaemonUnavailable as exc:
        return unreachable(exc)
    except AundError as exc:
        say(f"aund call: {type(exc).__name__}: {exc.message or exc}", err=True)
        return EXIT_FAILED
    print_json(result)
    return EXIT_OK
