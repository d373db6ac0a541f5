"""The crash tests of the P2P issue (tests/system/test_crash.py) pass for group traffic too.

1. A group owned by an aund-held AID (created and filled through an aund app's `group.create` /
   `group.add_member` calls) with two fastaun members (the official SDK, in its own process:
   tests/system/group_flood.py) sending 400 E2EE group messages. `aund run` is SIGKILLed after
   ~30% were sent and started again on the same state dir; later the consumer app (its own process,
   tests/system/group_apps.py) is SIGKILLed mid-iteration and started again with the same consumer
   name. Together they see every message once after its ack, in group (seq) order; and while aund
   is dead, the gateway's ack cursor for aund's device names nothing the inbox has not committed.
2. A consumer app reads 20 group events, acks the first 8, keeps iterating and is SIGKILLed: the
   daemon releases it at once and the 22 events it did not ack come again, in order, with the same
   cursors, when it returns under the same consumer name.
"""
from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from client_stub import Client
from tests.helpers import ROOT, AundProcess, DevnetProcess, wait_until
from tests.system.harness import (
    aid, by_key, finish, finish_flood, kill_all, others, read_jsonl, released, start_aund, strictly_increasing,
    wait_file,
)

pytestmark = [pytest.mark.interop, pytest.mark.timeout(60)]

GROUP_DRIVER = ROOT / "tests" / "system" / "group_flood.py"
N = 400
SENDERS = 2
KILL_AT = 120        # group messages the fastaun members got accepted before aund is SIGKILLed (30%)
CONSUMER_KILL = 240  # distinct messages the first consumer process saw before it is SIGKILLed
MESSAGE_KIND = "group.message.received"


# --- helpers --------------------------------------------------------------------------------------------
def start_group_flood(devnet: DevnetProcess, work: Path, n: int, senders: int) -> subprocess.Popen:
    """tests/system/group_flood.py in its own process (see its docstring); sends once work/go exists."""
    work.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, AUN_GW_URL=devnet.gateway_url, AUN_ROOT_CA=devnet.root_ca, AUN_WORKDIR=str(work),
               N=str(n), SENDERS=str(senders), GO=str(work / "go"))
    with open(work / "flood.log", "w") as err:
        return subprocess.Popen([sys.executable, str(GROUP_DRIVER), "flood"], env=env, stdout=subprocess.PIPE,
                                stderr=err, text=True, cwd=ROOT)


def spawn_group_app(command: str, cfg: dict[str, Any], log: Path) -> subprocess.Popen:
    """``python -m tests.system.group_apps COMMAND cfg`` (stdout: its result line; stderr: `log`)."""
    with open(log, "w") as err:
        return subprocess.Popen([sys.executable, "-m", "tests.system.group_apps", command, json.dumps(cfg)],
                                stdout=subprocess.PIPE, stderr=err, text=True, cwd=ROOT)


def make_group(sock: str, owner: str, work: Path) -> str:
    """The owner's aund app creates an approval group and adds the fastaun senders; returns its id
    once the driver confirmed its membership."""
    with Client(sock, app="group-admin", timeout=30) as admin:
        admin.ensure_identity(owner)
        s = admin.session(owner)
        s.wait_ready(30)
        wait_file(work / "senders.json", 40)
        senders = json.loads((work / "senders.json").read_text())
        created = s.call("group.create", {"name": "crash", "join_mode": "approval"}, timeout=20)
        gid = created["group"]["group_id"]
        for member in senders:
            added = s.call("group.add_member", {"group_id": gid, "aid": member}, timeout=20)
            assert added["member"]["aid"] == member
        state = s.call("group.get_state", {"group_id": gid}, timeout=20)
        assert {m["aid"] for m in json.loads(state["membership_snapshot"])["members"]} == {owner, *senders}
        (work / "group.json").write_text(json.dumps({"gid": gid, "owner": owner}))
        s.close()
    wait_file(work / "ready", 30)
    return gid


def probe(work: Path, name: str, timeout: float = 10) -> dict[str, Any]:
    """The gateway's head and per-member ack cursors for the group, asked by a fastaun member now."""
    (work / f"probe-{name}.req").touch()
    wait_file(work / f"probe-{name}.json", timeout)
    result = json.loads((work / f"probe-{name}.json").read_text())
    assert "error" not in result, result
    return result


def inbox_snapshot(daemon: AundProcess, owner: str, gid: str, scratch: Path) -> tuple[int, dict[int, str]]:
    """(group cursor, {seq: message_id}) of what aund's inbox has durably committed for the group,
    read from a copy of its database files (aund is dead: SQLite replays only committed WAL frames,
    as aund itself will on restart). Only unencrypted columns are read."""
    scratch.mkdir(parents=True, exist_ok=True)
    for suffix in ("", "-wal"):
        src = daemon.state_dir / f"inbox.sqlite3{suffix}"
        if src.exists():
            shutil.copyfile(src, scratch / f"inbox.sqlite3{suffix}")
    db = sqlite3.connect(scratch / "inbox.sqlite3")
    try:
        cursor = db.execute("SELECT COALESCE(MAX(ack_seq), 0) FROM peer_acks WHERE aid=? AND sender=?",
                            (owner, f"group:{gid}")).fetchone()[0]
        rows = db.execute("SELECT seq, message_id FROM events WHERE aid=? AND kind=?", (owner, MESSAGE_KIND)).fetchall()
    finally:
        db.close()
    return cursor, {seq: mid.split("/", 1)[1] for seq, mid in rows}


def _progress(work: Path) -> int:
    try:
        return int((work / "progress").read_text() or 0)
    except (FileNotFoundError, ValueError):
        return 0


def _distinct(out: Path) -> int:
    return len({r["message_id"] for r in read_jsonl(out) if r.get("ev")})


def check_exactly_once(lines: list[dict[str, Any]], sent: list[dict[str, Any]], gid: str) -> dict[str, int]:
    """Every sent message seen; none again once acked (an ack covers every cursor up to it); one
    cursor per message; seq, sender and n as the sender had them; group (seq) order by cursor."""
    want = {m["message_id"]: m for m in sent}
    acked_upto, cursor_of, first = 0, {}, {}
    events = repeats = 0
    for line in lines:
        if "ack" in line:
            acked_upto = max(acked_upto, line["ack"])
            continue
        events += 1
        mid = line["message_id"]
        assert line["kind"] == MESSAGE_KIND, line
        assert line["cursor"] > acked_upto, f"{mid} (cursor {line['cursor']}) came after cursor {acked_upto} was acked"
        assert cursor_of.setdefault(mid, line["cursor"]) == line["cursor"], f"{mid} stored twice"
        if mid in first:
            repeats += 1
            continue
        first[mid] = line
        m = want.get(mid)
        assert m is not None, f"unexpected message {mid}"
        assert (line["group_id"], line["from"], line["seq"], line["sender"], line["n"]) == \
            (gid, m["from"], m["seq"], m["sender"], m["n"]), (line, m)
        assert line["encrypted"] is True
    missing = set(want) - set(first)
    assert not missing, f"{len(missing)} messages lost, e.g. {sorted(missing)[:3]}"
    ordered = sorted(first.values(), key=lambda r: r["cursor"])
    assert strictly_increasing([r["seq"] for r in ordered]), "not in group order"
    for sender, seqs in by_key(ordered, "from", "seq").items():
        assert strictly_increasing(seqs), f"seqs of {sender} out of order"
    for sender, ns in by_key(ordered, "sender", "n").items():
        assert ns == list(range(len(ns))), f"sender {sender}'s messages out of order"
    return {"events": events, "repeats": repeats}


# --- 1. SIGKILL aund (and then the consumer) while group messages arrive ---------------------------------------
def test_sigkill_daemon_and_consumer_while_400_group_messages_arrive(devnet, tmp_path):
    t_start = time.monotonic()
    owner = aid("gcrash")
    work = tmp_path / "sdk"
    flood = start_group_flood(devnet, work, N, SENDERS)  # registers its members while aund starts
    daemon = start_aund(tmp_path, devnet, [owner])
    sock = str(daemon.socket)
    outs = [tmp_path / "consumer1.jsonl", tmp_path / "consumer2.jsonl"]
    consumers: list[subprocess.Popen] = []
    try:
        gid = make_group(sock, owner, work)
        t_setup = time.monotonic()

        def consumer(k: int) -> subprocess.Popen:
            cfg = {"socket": sock, "aid": owner, "consumer": "gcrash", "out": str(outs[k]), "expect": N,
                   "deadline": 40, "app": f"group-consumer-{k + 1}"}
            if k:
                cfg["preseen"] = str(outs[k - 1])  # it stops once the two runs together saw all N
            return spawn_group_app("consume", cfg, tmp_path / f"consumer{k + 1}.log")

        consumers.append(consumer(0))
        t_go = time.monotonic()
        (work / "go").touch()
        wait_until(lambda: _progress(work) >= KILL_AT, 30, 0.01, f"{KILL_AT} group messages sent")
        daemon.kill()  # SIGKILL: no chance to flush, ack or unlink the socket
        t_kill = time.monotonic()
        sent_at_kill = _progress(work)
        consumed_at_kill = _distinct(outs[0])

        # while aund is dead: the gateway's ack for its device covers only what the inbox committed
        dead = probe(work, "dead")
        gw_ack = dead["acks"][owner]
        committed_ack, committed = inbox_snapshot(daemon, owner, gid, tmp_path / "inbox-copy")
        assert gw_ack <= committed_ack, f"the gateway has seq {gw_ack} acked, the inbox only {committed_ack}"
        assert set(range(1, committed_ack + 1)) <= set(committed), "the inbox cursor passes rows it does not hold"
        assert max(committed, default=0) <= committed_ack, "rows committed beyond the cursor committed with them"
        assert 0 < gw_ack < dead["head"], (gw_ack, dead["head"])  # the check above was not vacuous
        time.sleep(max(0.0, 0.5 - (time.monotonic() - t_kill)))  # messages keep arriving while aund is dead
        daemon.start()
        t_back = time.monotonic()

        # the consumer is SIGKILLed mid-iteration too, and comes back under the same consumer name
        wait_until(lambda: _distinct(outs[0]) >= CONSUMER_KILL, 40, 0.01, f"{CONSUMER_KILL} messages consumed")
        assert consumers[0].poll() is None, "the first consumer ended before it could be killed"
        consumers[0].kill()
        consumers[0].wait(10)
        lines1 = read_jsonl(outs[0])
        acked1 = max([r["ack"] for r in lines1 if "ack" in r], default=0)
        done1 = {r["message_id"] for r in lines1 if r.get("ev") and r["cursor"] <= acked1}
        consumers.append(consumer(1))

        wait_file(work / "sent.json", 40)  # the driver stays up (answering probes) until `done`
        t_sent = time.monotonic()
        result = finish(consumers[1], 45, tmp_path / "consumer2.log")
        t_done = time.monotonic()
        assert result["distinct"] == N, result  # not its deadline
        sent = json.loads((work / "sent.json").read_text())
        assert len(sent) == N and sorted(m["seq"] for m in sent) == list(range(1, N + 1))
        counts = check_exactly_once(read_jsonl(outs[0]) + read_jsonl(outs[1]), sent, gid)
        assert counts["repeats"] <= 10, counts

        # the gateway's cursor for aund's device reaches the head: everything committed was acked upstream
        final = wait_until(lambda: (lambda p: p if p["acks"][owner] == p["head"] == N else None)(
            probe(work, f"final-{time.monotonic_ns()}")), 15, 0.2, "aund's group ack to reach the head")
        with Client(sock, app="monitor") as mon:
            wait_until(lambda: released(mon.status(), "monitor"), 10, 0.05, "the consumers' resources released")
        (work / "done").touch()
        flood_lines = finish_flood(flood, 20)
        stats = devnet.stats()
        note = next((x["note"] for x in flood_lines if "note" in x), {})
        report = {"messages": N, "senders": SENDERS, "setup_s": round(t_setup - t_start, 2),
                  "sent_at_aund_kill": sent_at_kill, "consumed_at_aund_kill": consumed_at_kill,
                  "gateway_ack_at_kill": gw_ack, "inbox_cursor_at_kill": committed_ack, "head_at_probe": dead["head"],
                  "kill_after_go_s": round(t_kill - t_go, 2), "restart_s": round(t_back - t_kill, 2),
                  "consumed_at_consumer_kill": len({r["message_id"] for r in lines1 if r.get("ev")}),
                  "acked_at_consumer_kill": len(done1),
                  "all_sent_after_restart_s": round(t_sent - t_back, 2),
                  "all_consumed_after_restart_s": round(t_done - t_back, 2),
                  "flood_rate_per_s": note.get("rate"), "flood_errors": note.get("errors"),
                  "events": counts["events"], "unacked_redeliveries": counts["repeats"],
                  "consumer2_errors": result["errors"], "final_gateway_ack": final["acks"][owner],
                  "devnet": {"group_sends": stats["rpc"].get("group.v2.send", 0),
                             "group_pulls": stats["rpc"].get("group.v2.pull", 0),
                             "group_acks": stats["rpc"].get("group.v2.ack", 0), "pushes": stats["pushes"]},
                  "total_s": round(time.monotonic() - t_start, 2)}
        print("\ngroup crash report:", json.dumps(report))
        assert daemon.proc.poll() is None, "the restarted aund died"
    finally:
        (work / "done").touch()
        kill_all([flood, *consumers])
        if daemon.proc.poll() is None:  # (not when a failure left it SIGKILLed: that error is the one to see)
            assert daemon.stop() == 0


# --- 2. SIGKILL a consumer app holding unacked group events ------------------------------------------------
def test_sigkill_consumer_mid_iteration_redelivers_unacked_group_events(devnet, tmp_path):
    owner = aid("ghold")
    work = tmp_path / "sdk"
    flood = start_group_flood(devnet, work, 30, 1)
    daemon = start_aund(tmp_path, devnet, [owner])
    sock = str(daemon.socket)
    held, again_out = tmp_path / "held.jsonl", tmp_path / "again.jsonl"
    holder = again = None
    try:
        gid = make_group(sock, owner, work)
        (work / "go").touch()
        wait_file(work / "sent.json", 30)
        by_seq = sorted(json.loads((work / "sent.json").read_text()), key=lambda m: m["seq"])
        assert [m["seq"] for m in by_seq] == list(range(1, 31))
        with Client(sock, app="monitor") as mon:
            holder = spawn_group_app("holder", {"socket": sock, "work": str(work), "aid": owner, "consumer": "k",
                                                "read": 20, "ack_upto": 8, "out": str(held)}, tmp_path / "holder.log")
            wait_file(work / "read.json", 30)
            read = json.loads((work / "read.json").read_text())
            assert [r["message_id"] for r in read["records"]] == [m["message_id"] for m in by_seq[:20]]
            assert read["acked_cursor"] == read["cursors"][7]
            # mid-iteration: it has the other ten as well, and acks none of them
            wait_until(lambda: len(read_jsonl(held)) >= 30, 15, 0.02, "the holder to get all 30 events")

            def holding() -> bool:
                mine = [a for a in others(mon.status(), "monitor") if a["app"] == "group-holder"]
                return bool(mine) and mine[0]["subscriptions"] == 1 and mine[0]["sessions"] == 1

            wait_until(holding, 10, 0.02, "the holder's subscription")
            holder.kill()  # SIGKILL mid-iteration, 22 events unacked
            holder.wait(10)
            t_kill = time.monotonic()
            wait_until(lambda: released(mon.status(), "monitor"), 3, 0.02, "the killed app's resources released")
            release_s = time.monotonic() - t_kill

        # back under the same consumer name: exactly the 22 events it did not ack, in order, same cursors
        again = spawn_group_app("consume", {"socket": sock, "aid": owner, "consumer": "k", "out": str(again_out),
                                            "expect": 22, "deadline": 20, "app": "group-holder-again"},
                                tmp_path / "again.log")
        result = finish(again, 30, tmp_path / "again.log")
        events = [r for r in read_jsonl(again_out) if r.get("ev")]
        assert [e["message_id"] for e in events] == [m["message_id"] for m in by_seq[8:]]
        assert [e["cursor"] for e in events] == [r["cursor"] for r in read_jsonl(held)[8:30]]
        assert [e["seq"] for e in events] == list(range(9, 31))
        assert all(e["group_id"] == gid and e["encrypted"] is True and e["kind"] == MESSAGE_KIND for e in events)
        assert len([r for r in read_jsonl(again_out) if "ack" in r]) == 22 and not result["errors"]

        # and once more: all acked now, nothing comes
        with Client(sock, app="monitor") as mon:
            stream = mon.session(owner).events("k", kinds=(MESSAGE_KIND,))
            assert stream.get(timeout=1.0) is None
            stream.close()
        (work / "done").touch()
        finish_flood(flood, 20)
        print(f"\ngroup app-kill: resources released {release_s * 1000:.0f} ms after SIGKILL; "
              f"{len(events)} unacked group events redelivered")
    finally:
        (work / "done").touch()
        kill_all([flood, holder, again])
        assert daemon.stop() == 0
