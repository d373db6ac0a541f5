"""Issues 4 and 7: crashes lose nothing and leak nothing.

1. `aund run` is SIGKILLed while 1,000 E2EE messages from two fastaun senders (the independent
   SDK, tests/system/fastaun_flood.py) are arriving for its two AIDs, then started again on the
   same state dir and socket. One consumer app per AID (its own process, acking every event, and
   reconnecting by itself) must see all 1,000, each exactly once (the gateway redelivers what was
   committed but not yet acked upstream; the inbox deduplicates it), in per-sender order.
2. An app is SIGKILLed while a call is in flight and while it holds a subscription with unacked
   events: the daemon releases its connection, call slot, budget token and session at once, and
   the events it did not ack come again when the app returns with the same consumer name.
"""
from __future__ import annotations

import json
import time

import pytest

from client_stub import Client
from tests.helpers import wait_until
from tests.system.harness import (
    aid, by_key, finish, finish_flood, kill_all, others, read_jsonl, released, spawn_app, start_aund,
    start_flood, strictly_increasing, wait_file,
)

pytestmark = pytest.mark.timeout(150)

N = 1000
KILL_AT = 300  # messages the senders got accepted before aund is SIGKILLed


def _progress(work) -> int:
    try:
        return int((work / "progress").read_text() or 0)
    except (FileNotFoundError, ValueError):
        return 0


def test_sigkill_daemon_while_1000_e2ee_messages_arrive(devnet, tmp_path):
    targets = [aid("crash0"), aid("crash1")]
    daemon = start_aund(tmp_path, devnet, targets)
    sock = str(daemon.socket)
    work = tmp_path / "sdk"
    flood, consumers = None, []
    outs = [tmp_path / f"consumer{k}.jsonl" for k in range(len(targets))]
    try:
        with Client(sock, app="monitor") as mon:
            for a in targets:
                mon.ensure_identity(a)
                mon.session(a).wait_ready(30)
        flood = start_flood(devnet, work, targets, N, senders=2, go=work / "go")
        for k, (target, out) in enumerate(zip(targets, outs)):
            consumers.append(spawn_app("consume", {"socket": sock, "aid": target, "consumer": "crash", "out": str(out),
                                                   "expect": N // len(targets), "deadline": 100,
                                                   "app": f"crash-consumer-{k}"}, tmp_path / f"consumer{k}.log"))
        wait_file(work / "senders.json", 60)
        t_go = time.monotonic()
        (work / "go").touch()
        wait_until(lambda: _progress(work) >= KILL_AT, 60, 0.01, f"{KILL_AT} messages sent")
        daemon.kill()  # SIGKILL: no chance to flush, ack or unlink the socket
        t_kill = time.monotonic()
        sent_at_kill = _progress(work)
        consumed_at_kill = sum(len(read_jsonl(o)) for o in outs)
        time.sleep(0.5)  # messages keep arriving at the gateway while aund is dead
        daemon.start()
        t_back = time.monotonic()
        flood_notes = finish_flood(flood, 60)
        t_sent = time.monotonic()
        results = [finish(p, 100, tmp_path / f"consumer{k}.log") for k, p in enumerate(consumers)]
        t_done = time.monotonic()

        sent = json.loads((work / "sent.json").read_text())
        assert len(sent) == N
        redelivered = 0
        for target, out, result in zip(targets, outs, results):
            events = read_jsonl(out)
            want = {m["message_id"] for m in sent if m["to"] == target}
            got = {e["message_id"] for e in events}
            assert got == want, f"{target}: {len(want - got)} lost, {len(got - want)} unexpected"
            acked: set[str] = set()
            for e in events:
                assert e["message_id"] not in acked, f"{target}: {e['message_id']} came again after it was acked"
                if e["acked"]:
                    acked.add(e["message_id"])
            redelivered += len(events) - len(want)  # only events whose ack failed in the crash may repeat
            assert len(events) - len(want) <= 2, f"{target}: {len(events) - len(want)} repeats"
            firsts = {}
            for e in events:
                firsts.setdefault(e["message_id"], e)
            ordered = sorted(firsts.values(), key=lambda e: e["cursor"])
            for sender, ns in by_key(ordered, "sender", "n").items():
                assert strictly_increasing(ns), f"{target}: sender {sender} out of order"
            for sender, seqs in by_key(ordered, "from", "seq").items():
                assert strictly_increasing(seqs), f"{target}: seqs of {sender} out of order"
            assert all(e["encrypted"] and e["kind"] == "message.received" for e in events)
        stats = devnet.stats()
        note = next((x["note"] for x in flood_notes if "note" in x), {})
        report = {"messages": N, "sent_at_kill": sent_at_kill, "consumed_at_kill": consumed_at_kill,
                  "kill_after_go_s": round(t_kill - t_go, 2), "restart_s": round(t_back - t_kill, 2),
                  "all_sent_after_restart_s": round(t_sent - t_back, 2),
                  "all_consumed_after_restart_s": round(t_done - t_back, 2),
                  "flood_rate_per_s": note.get("rate"), "unacked_redeliveries": redelivered,
                  "consumer_errors": [r["errors"] for r in results],
                  "devnet": {"pushes": stats["pushes"], "pulls": stats["rpc"].get("message.v2.pull", 0),
                             "acks": stats["rpc"].get("message.v2.ack", 0)}}
        print("\ncrash report:", json.dumps(report))
    finally:
        kill_all([flood, *consumers])
        assert daemon.stop() == 0


def test_sigkill_app_mid_call_and_mid_iteration(devnet, tmp_path):
    x, y = aid("holdx"), aid("holdy")
    daemon = start_aund(tmp_path, devnet, [x, y])
    sock = str(daemon.socket)
    work = tmp_path / "work"
    work.mkdir()
    holder = again = None
    try:
        with Client(sock, app="monitor") as mon:
            sx, sy = mon.session(x), mon.session(y)
            for a, s in ((x, sx), (y, sy)):
                mon.ensure_identity(a)
                s.wait_ready(30)
            for i in range(10):
                sy.call("message.send", {"to": x, "message_id": f"hold-{i}",
                                         "payload": {"type": "text", "text": f"hold {i}", "n": i}}, timeout=15)
            sx.close()
            sy.close()
            holder = spawn_app("holder", {"socket": sock, "work": str(work), "aid": x, "consumer": "k", "read": 10,
                                          "ack_upto": 4, "method": "meta.ping"}, tmp_path / "holder.log")
            wait_file(work / "read.json", 30)
            read = json.loads((work / "read.json").read_text())
            assert read["message_ids"] == [f"hold-{i}" for i in range(10)]
            wait_until(lambda: mon.status()["budget"]["in_use"] == 0, 10, 0.05, "aund's own calls to finish")
            devnet.set_faults(reply_delay_ms=8000)  # the holder's call will hang at the gateway
            try:
                (work / "call-go").touch()
                wait_file(work / "calling", 10)

                def holding():
                    st = mon.status()
                    mine = [a for a in others(st, "monitor") if a["app"] == "holder"]
                    return (mine and mine[0]["calls_in_flight"] == 1 and mine[0]["subscriptions"] == 1
                            and mine[0]["sessions"] == 1 and st["budget"]["in_use"] >= 1)

                wait_until(holding, 10, 0.02, "the holder's call in flight")
                holder.kill()  # SIGKILL mid-call, mid-iteration
                holder.wait(10)
                t_kill = time.monotonic()
                # released at once, not when the gateway's reply finally comes (8 s later)
                wait_until(lambda: released(mon.status(), "monitor"), 3, 0.02, "the killed app's resources released")
                release_s = time.monotonic() - t_kill
            finally:
                devnet.set_faults(reply_delay_ms=0)
            st = mon.status()
            assert st["broker"]["connections"] == 1 and st["broker"]["calls_in_flight"] == 0

        # back with the same consumer name: exactly the events it did not ack, in order
        out = tmp_path / "again.jsonl"
        again = spawn_app("consume", {"socket": sock, "aid": x, "consumer": "k", "out": str(out), "expect": 6,
                                      "deadline": 30, "app": "holder-again"}, tmp_path / "again.log")
        finish(again, 40, tmp_path / "again.log")
        events = read_jsonl(out)
        assert [e["message_id"] for e in events] == [f"hold-{i}" for i in range(4, 10)]
        assert [e["cursor"] for e in events] == read["cursors"][4:]
        print(f"\napp-kill: resources released {release_s * 1000:.0f} ms after SIGKILL; "
              f"{len(events)} unacked events redelivered")
    finally:
        kill_all([holder, again])
        assert daemon.stop() == 0
