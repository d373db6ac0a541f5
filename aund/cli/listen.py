"""`aund listen AID`: print events as they arrive (Ctrl-C to stop)."""
from __future__ import annotations

import argparse
import json

from aund.cli._common import (
    EXIT_FAILED, EXIT_OK, EXIT_UNREACHABLE, add_socket_argument, open_client, say, unreachable,
)

DEFAULT_KINDS = ("message.received", "message.undecryptable", "group.message.received", "group.changed",
                 "state_change", "gateway.disconnect", "sync.proof_rejected", "token.refreshed")


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_socket_argument(p)
    p.add_argument("aid")
    p.add_argument("--slot", default="main")
    p.add_argument("--consumer", default="aund-cli-listen", help="durable consumer name (resume point)")
    p.add_argument("--from", dest="start", default="now", help="now (default), last_ack, or a cursor")
    p.add_argument("--kind", action="append", help="event kinds (default: messages and link events)")
    p.add_argument("--no-ack", action="store_true", help="do not ack (leave the events for the consumer)")
    p.add_argument("--count", type=int, default=0, help="stop after this many events")
    p.add_argument("--json", action="store_true", help="one JSON object per line")


def run(args: argparse.Namespace) -> int:
    from client_stub import AundError, DaemonUnavailable

    if args.start not in ("now", "last_ack") and not args.start.isdigit():
        say(f"aund listen: --from takes now, last_ack or a cursor (a number), not {args.start!r}", err=True)
        return EXIT_UNREACHABLE  # bad usage
    start = int(args.start) if args.start.isdigit() else args.start
    seen = 0
    try:
        with open_client(args) as client:
            held = {i.get("aid") for i in client.list_identities()}
            if args.aid.strip().lower() not in held:  # it would wait forever for events that never come
                say(f"aund listen: aund holds no identity {args.aid} that you may use; see `aund aid list`, "
                    f"or create it with `aund aid ensure {args.aid}`", err=True)
                return EXIT_FAILED
            session = client.session(args.aid, slot_id=args.slot)
            with session.events(args.consumer, tuple(args.kind or DEFAULT_KINDS), start=start) as events:
                for event in events:
                    if args.json:
                        print(json.dumps({"kind": event.kind, "cursor": event.cursor, "data": event.data},
                                         default=str), flush=True)
                    else:
                        say(f"[{event.cursor}] {event.kind} {_summary(event)}", flush=True)
                    if not args.no_ack:
                        event.ack()
                    seen += 1
                    if args.count and seen >= args.count:
                        break
    except KeyboardInterrupt:
        return EXIT_OK
    except DaemonUnavailable as exc:
        return unreachable(exc)
    except AundError as exc:
        say(f"aund listen: {type(exc).__name__}: {exc.message or exc}", err=True)
        return EXIT_FAILED
    return EXIT_OK


def _summary(event) -> str:
    d = event.data or {}
    if event.kind == "message.received":
        lock = "e2ee" if d.get("encrypted") else "plain"
        return f"from={d.get('from')} seq={d.get('seq')} ({lock}) {json.dumps(d.get('payload'), ensure_ascii=False)}"
    if event.kind == "group.message.received":
        return (f"group={d.get('group_id')} from={d.get('from')} seq={d.get('seq')} "
                f"{json.dumps(d.get('payload'), ensure_ascii=False)}")
    if event.kind == "message.undecryptable":
        return f"from={d.get('from')} seq={d.get('seq')} reason={d.get('reason')}"
    return json.dumps(d, ensure_ascii=False, default=str)
