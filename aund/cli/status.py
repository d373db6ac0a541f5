"""`aund status [--json] [--links N] [--wait-ready [SECONDS]]`: links (counts by state, then the
first N), apps, budget, inbox and warnings."""
from __future__ import annotations

import argparse
import sys
import time

from aund.cli._common import (
    EXIT_FAILED, EXIT_OK, add_socket_argument, ago, open_client, print_json, say, table, unreachable,
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_socket_argument(p)
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--links", type=int, default=None, metavar="N",
                   help="list at most N links one by one (default the daemon's, 256; the counts cover all)")
    p.add_argument("--wait-ready", type=float, nargs="?", const=60.0, metavar="SECONDS",
                   help="first wait (with progress on stderr) until every link is ready")


def counts(status: dict) -> tuple[int, int]:
    """(ready, links not disabled) of a status: its `link_counts` (or, from an older daemon, its list)."""
    by_state = status.get("link_counts")
    if by_state is None:
        links = [link for link in status.get("links", []) if not link.get("disabled")]
        return sum(link.get("state") == "ready" for link in links), len(links)
    return by_state.get("ready", 0), sum(n for state, n in by_state.items() if state != "disabled")


def wait_ready(client, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    last = ""
    while True:
        ready, total = counts(client.request("status", {"links": 0}))  # disabled links are not awaited
        line = f"{ready}/{total} links ready"
        if line != last and sys.stderr.isatty() or line != last and time.monotonic() > deadline - seconds + 1:
            say(f"aund: {line}", err=True)
            last = line
        if total and ready == total:
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.2)


def run(args: argparse.Namespace) -> int:
    from client_stub import DaemonUnavailable

    try:
        with open_client(args) as client:
            ok = wait_ready(client, args.wait_ready) if args.wait_ready else True
            status = client.request("status", {} if args.links is None else {"links": max(0, args.links)})
    except DaemonUnavailable as exc:
        return unreachable(exc)
    if args.json:
        print_json(status)
    else:
        render(status)
    return EXIT_OK if ok else EXIT_FAILED


def render(status: dict) -> None:
    now = time.time()
    say(f"aund {status.get('daemon_version', '?')}, up {ago(status.get('started_at'), now).removesuffix(' ago')}"
          f", {status.get('identities', 0)} identities")
    view = status.get("view") or {}
    if view and not view.get("all", True):
        say(f"(showing only what uid {view.get('uid')} may use: its identities and its own apps)")
    links = sorted(status.get("links", []), key=lambda x: (x.get("aid", ""), x.get("slot_id", "")))
    by_state = status.get("link_counts") or {}
    if by_state:
        say(f"links: {status.get('links_total', sum(by_state.values()))} ("
            + ", ".join(f"{n} {state}" for state, n in sorted(by_state.items(), key=lambda kv: -kv[1])) + ")")
    rows = [[link["aid"], link["slot_id"], link["state"], ago(link.get("last_connected_at"), now),
             link.get("reconnects", 0), f"{link.get('in_flight', 0)}/{link.get('queued', 0)}", link.get("holders", 0),
             "yes" if link.get("pinned") else ""] for link in links]
    if rows:
        print()
        print(table(rows, ["AID", "SLOT", "STATE", "CONNECTED", "RECONNECTS", "RPC/QUEUED", "APPS", "CONFIGURED"]))
    page = status.get("links_page") or {}
    if page.get("truncated"):
        say(f"(listed {len(links)} of {page.get('matching')} links; `aund status --links N` lists more)")
    broker = status.get("broker") or {}
    apps = sorted(broker.get("apps") or [], key=lambda a: (a.get("uid", 0), a.get("pid", 0), a.get("conn_id", 0)))
    print()
    say(f"apps connected: {len(apps)}; calls in flight {broker.get('calls_in_flight', 0)}; "
          f"daemon budget {status.get('budget', {}).get('in_use', 0)}/{status.get('budget', {}).get('total', 0)}")
    if apps:
        print(table([[a.get("pid"), a.get("uid"), a.get("app_name") or a.get("app"), a.get("calls_in_flight"),
                      a.get("subscriptions"), a.get("sessions")] for a in apps],
                    ["PID", "UID", "APP", "CALLS", "SUBS", "SESSIONS"]))
    inbox = status.get("inbox") or {}
    if inbox:
        say(f"inbox: {sum(inbox.values())} events for {len(inbox)} identities")
    disabled = sorted(status.get("disabled") or {})
    if disabled:
        say(f"disabled (not held; `aund aid enable AID`): {', '.join(disabled)}")
    for w in status.get("warnings", []):
        say(f"warning [{w.get('code')}] {w.get('text')}")
