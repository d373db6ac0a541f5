"""`aund health [--aid AID ...] [--json]`: exit 0 healthy, 1 unhealthy (reasons), 2 unreachable."""
from __future__ import annotations

import argparse

from aund.cli._common import EXIT_FAILED, EXIT_OK, add_socket_argument, open_client, print_json, say, unreachable


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_socket_argument(p)
    p.add_argument("--aid", action="append", default=[], help="only these identities must be ready (repeatable)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--timeout", type=float, default=5.0, help="seconds to wait for the daemon's answer")


def evaluate(status: dict, aids: list[str]) -> list[dict]:
    """The reasons the daemon is unhealthy (empty list = healthy)."""
    reasons = []
    links = status.get("links", [])
    if status.get("stopping"):
        reasons.append({"code": "daemon.stopping", "text": "the daemon is shutting down"})
    wanted = [a.strip().lower() for a in aids]
    for aid in wanted:
        states = [link["state"] for link in links if link["aid"] == aid]
        if not states:
            reasons.append({"code": "link.absent", "aid": aid, "text": f"{aid}: no link (not configured or opened)"})
        elif "ready" not in states:
            reasons.append({"code": "link.not_ready", "aid": aid, "text": f"{aid}: {', '.join(states)}"})
    if not wanted:
        for w in status.get("warnings", []):
            reasons.append({k: w.get(k) for k in ("code", "aid", "text") if w.get(k) is not None})
    return reasons


def run(args: argparse.Namespace) -> int:
    from client_stub import DaemonUnavailable

    try:
        with open_client(args, timeout=args.timeout) as client:
            # with --aid only those links are listed (all of them however many the daemon holds)
            status = client.request("status", {"aids": args.aid, "links": 2000} if args.aid else {"links": 0})
    except DaemonUnavailable as exc:
        if args.json:
            print_json({"healthy": False, "reachable": False, "reasons": [{"code": "daemon.unreachable",
                                                                          "text": str(exc)}]})
            return 2
        return unreachable(exc)
    reasons = evaluate(status, args.aid)
    if args.json:
        print_json({"healthy": not reasons, "reachable": True, "reasons": reasons})
    else:
        print("healthy" if not reasons else "unhealthy")
        for r in reasons:
            say(f"  [{r['code']}] {r['text']}")
    return EXIT_OK if not reasons else EXIT_FAILED
