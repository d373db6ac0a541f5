"""Consumer app programs of tests/system/test_group_crash.py, each its own process, talking to
aund through ``client_stub`` only (stdlib and client_stub; no aund, no fastaun):

    python -m tests.system.group_apps COMMAND '<json config>'

- ``consume``: iterates one AID's group events (``group.message.received`` and
  ``message.undecryptable``) with a durable consumer, acking each one, until it has seen
  ``expect`` distinct messages (or its deadline passed; ``preseen``: those an earlier run under
  the same consumer name saw count too); keeps iterating through daemon restarts.
  Every event is written to ``out`` (JSON lines) BEFORE it is acked, and each successful ack
  gets its own line after it, so a SIGKILL at any point loses no record of what was seen:
  ``{"ev": 1, kind, message_id, group_id, from, seq, sender, n, encrypted, cursor, t}`` then
  ``{"ack": cursor}``.
- ``holder``: reads ``read`` events, acks the ``ack_upto``-th (by its cursor, which acks every
  event before it), writes read.json, then keeps iterating without acking (writing what else
  comes to ``out``) until it is SIGKILLed.

Each prints nothing but its final JSON line on stdout.
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from client_stub import Client
from client_stub.errors import AundError
from tests.system.apps import _outcome, next_event

KINDS = ("group.message.received", "message.undecryptable")


def _record(ev) -> dict[str, Any]:
    data = ev.data if isinstance(ev.data, dict) else {}
    payload = data.get("payload") if isinstance(data.get("payload"), dict) else {}
    return {"ev": 1, "kind": ev.kind, "message_id": str(data.get("message_id")), "group_id": data.get("group_id"),
            "from": data.get("from"), "seq": data.get("seq"), "sender": payload.get("sender"), "n": payload.get("n"),
            "encrypted": data.get("encrypted"), "cursor": ev.cursor, "t": time.time()}


def consume(cfg: dict[str, Any]) -> dict[str, Any]:
    """Config: socket, aid, consumer, out, expect, deadline (s), app, reconnect_attempts, preseen (a
    JSON-lines file of an earlier run under the same consumer name: its messages count as seen, so
    `expect` can be the total; an event whose ack was in flight when that run died may come again)."""
    out = open(cfg["out"], "a", buffering=1)
    client = Client(cfg["socket"], app=cfg.get("app", "group-consume"), timeout=10,
                    reconnect_attempts=cfg.get("reconnect_attempts", 200))
    stream = client.session(cfg["aid"]).events(consumer=cfg["consumer"], kinds=KINDS, start="last_ack")
    seen: set[str] = set()
    if cfg.get("preseen"):
        for line in Path(cfg["preseen"]).read_text().splitlines():
            try:
                rec = json.loads(line)
            except ValueError:
                continue  # a line cut by the SIGKILL of that run
            if rec.get("ev"):
                seen.add(rec["message_id"])
    preseen = len(seen)
    errors: dict[str, int] = {}
    count = 0
    deadline = time.monotonic() + cfg["deadline"]
    while len(seen) < cfg["expect"] and time.monotonic() < deadline:
        ev = next_event(stream, errors, pause=0.1)
        if ev is None:
            continue
        count += 1
        rec = _record(ev)
        out.write(json.dumps(rec) + "\n")  # seen: on disk before the ack leaves
        try:
            ev.ack()
        except AundError as exc:
            errors["ack:" + _outcome(exc)] = errors.get("ack:" + _outcome(exc), 0) + 1
        else:
            out.write(json.dumps({"ack": ev.cursor}) + "\n")
        seen.add(rec["message_id"])
    stream.close()
    client.close()
    return {"distinct": len(seen), "preseen": preseen, "events": count, "errors": errors}


def holder(cfg: dict[str, Any]) -> dict[str, Any]:
    """Config: socket, work, aid, consumer, read, ack_upto, out."""
    work = Path(cfg["work"])
    out = open(cfg["out"], "a", buffering=1)
    client = Client(cfg["socket"], app="group-holder", timeout=10)
    session = client.session(cfg["aid"])
    session.wait_ready(30)
    stream = session.events(consumer=cfg["consumer"], kinds=KINDS, start="last_ack")
    events = []
    while len(events) < cfg["read"]:
        ev = stream.get(timeout=30)
        if ev is None:
            raise SystemExit(f"only {len(events)} events")
        events.append(ev)
        out.write(json.dumps(_record(ev)) + "\n")
    acked = events[cfg["ack_upto"] - 1]
    acked.ack()
    tmp = work / "read.json.tmp"
    tmp.write_text(json.dumps({"cursors": [e.cursor for e in events], "records": [_record(e) for e in events],
                               "acked_cursor": acked.cursor}))
    os.replace(tmp, work / "read.json")
    while True:  # mid-iteration, never acking again: the test SIGKILLs us here
        ev = stream.get(timeout=0.5)
        if ev is not None:
            out.write(json.dumps(_record(ev)) + "\n")


COMMANDS = {"consume": consume, "holder": holder}

if __name__ == "__main__":
    result = COMMANDS[sys.argv[1]](json.loads(sys.argv[2]))
    print(json.dumps(result), flush=True)
