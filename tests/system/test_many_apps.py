"""Twenty app processes on ten AIDs held by ONE `aund run`, against a devnet process.

Every app (half blocking ``Client`` with threads, half ``AsyncClient`` with asyncio) sends E2EE
messages to the other AIDs through aund while it consumes its own AID's messages with a durable
consumer, acking each event. Meanwhile one more app subscribes and then never reads its socket.

What must hold:
- every call is answered or fails with a typed error (counted by class; nothing untyped);
- each consumer gets every message sent to its AID exactly once: no message_id ever comes again
  after it was acked (the stub's own dedupe is by cursor; the inbox's by message id, so a repeat
  here is a real duplicate), and in per-sender order (the sending app's counter and the
  gateway seq both grow);
- the staller slows nobody (median call latency while it stalls vs before it started) and the
  daemon disconnects it (its outbox stayed full for `stall_timeout`); its consumers, resumed
  later, still get every message;
- `status` lists the apps while they run and releases everything once they exited.
"""
from __future__ import annotations

import json
import secrets
import statistics
import time
from collections import Counter

import pytest

from client_stub import Client
from tests.helpers import wait_until
from tests.system.harness import (
    aid, by_key, finish, kill_all, others, released, spawn_app, start_aund, strictly_increasing, wait_file,
)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(170)]

N_AIDS, N_APPS = 10, 20
DURATION = 14.0          # seconds every app sends for
INTERVAL = 0.25          # between one app's calls: ~80 calls/s in all
PAD = 3000               # bytes of padding per message (so the staller's outbox fills quickly)
STALL_AFTER = 4.0        # seconds after "go" the staller starts
STALL_SUBS = 8           # subscriptions the staller opens (consumers stall-0 ..)
STALL_TIMEOUT = 3.0      # aund.broker.Limits.stall_timeout ([limits]; the daemon's default is 10 s)
LATENCY_RATIO = 5.0      # "generous": median latency while stalling <= 5x the median before


def test_twenty_apps_ten_aids_and_a_staller(devnet, tmp_path):
    t_start = time.monotonic()
    aids = [aid(f"mesh{k}") for k in range(N_AIDS)]
    daemon = start_aund(tmp_path, devnet, aids, extra={"limits": {"stall_timeout": STALL_TIMEOUT}})
    sock = str(daemon.socket)
    work = tmp_path / "work"
    work.mkdir()
    run = secrets.token_hex(3)
    apps, staller = [], None
    try:
        with Client(sock, app="monitor", timeout=20) as mon:
            for a in aids:
                mon.ensure_identity(a)  # waits until the daemon registered the configured AID
            for i in range(N_APPS):
                own = aids[i % N_AIDS]
                cfg = {"socket": sock, "work": str(work), "index": i, "aid": own, "run": run,
                       "targets": [a for a in aids if a != own], "mode": "sync" if i % 2 == 0 else "async",
                       "consumer": f"c{i}", "duration": DURATION, "interval": INTERVAL, "pad": PAD}
                apps.append(spawn_app("mesh", cfg, work / f"mesh-{i}.log"))
            wait_until(lambda: all((work / f"ready-{i}").exists() for i in range(N_APPS)) or _dead(apps),
                       60, 0.1, "every app ready")
            assert not _dead(apps), "an app died during setup"

            # status shows every app with its session and subscription
            shown = {a["app"]: a for a in others(mon.status(), "monitor")}
            assert set(shown) == {f"mesh-{i}" for i in range(N_APPS)}
            assert all(a["sessions"] >= 1 and a["subscriptions"] >= 1 for a in shown.values())

            go_wall = time.time()
            (work / "go").touch()
            time.sleep(STALL_AFTER)
            stall_wall = time.time()
            staller = spawn_app("staller", {"socket": sock, "work": str(work), "aid": aids[0], "subs": STALL_SUBS},
                                work / "staller.log")
            wait_file(work / "staller-ready", 15)

            def staller_gone():
                st = mon.status()
                names = {a["app"] for a in st["broker"]["apps"]}
                return st["broker"]["stalled_disconnects"] >= 1 and "staller" not in names

            wait_until(staller_gone, STALL_TIMEOUT + 15, 0.1, "the daemon to disconnect the staller")
            gone_wall = time.time()
            (work / "staller-exit").touch()
            stalled = finish(staller, 30, work / "staller.log")
            assert stalled["eof"], f"the staller's connection was not closed by the daemon: {stalled}"

            # every app finished sending: tell each consumer what to expect, then collect
            wait_until(lambda: all((work / f"sent-{i}.json").exists() for i in range(N_APPS)) or _dead(apps),
                       DURATION + 40, 0.1, "every app done sending")
            sent = [json.loads((work / f"sent-{i}.json").read_text()) for i in range(N_APPS)]
            expect = {a: [] for a in aids}
            maybe = {a: [] for a in aids}  # a failed send may still have been delivered
            for s in sent:
                for m in s["sent"]:
                    (expect if m["ok"] else maybe)[m["to"]].append(m["message_id"])
            (work / "expect.json.tmp").write_text(json.dumps({"expect": expect, "deadline": time.time() + 40}))
            (work / "expect.json.tmp").rename(work / "expect.json")
            for i, proc in enumerate(apps):
                finish(proc, 60, work / f"mesh-{i}.log")
            results = [json.loads((work / f"result-{i}.json").read_text()) for i in range(N_APPS)]

            report = _check_apps(results, expect, maybe, aids)
            report.update(_latency(results, go_wall, stall_wall, gone_wall, go_wall + DURATION))
            report["staller"] = {"disconnected_after_s": round(gone_wall - stall_wall, 1), **stalled}

            # the staller's consumers resume from their (never moved) last ack and get everything
            for k in range(STALL_SUBS):
                got = _drain(mon, aids[0], f"stall-{k}", set(expect[aids[0]]))
                assert not got["dups"], f"stall-{k} got duplicates {got['dups'][:5]}"
                assert set(expect[aids[0]]) <= got["ids"] <= set(expect[aids[0]]) | set(maybe[aids[0]])
                assert all(strictly_increasing(v) for v in got["order"].values())

            # after the apps exited, the daemon holds nothing for them
            wait_until(lambda: released(mon.status(), "monitor"), 15, 0.1, "the daemon to release the apps")
            final = mon.status()
            assert final["broker"]["connections"] == 1  # the monitor itself
            report["total_s"] = round(time.monotonic() - t_start, 1)
            print("\nmany-apps report:", json.dumps(report, indent=1))
    finally:
        kill_all([*apps, staller])
        assert daemon.stop() == 0


def _dead(procs) -> bool:
    return any(p.poll() not in (None, 0) for p in procs)


def _check_apps(results, expect, maybe, aids) -> dict:
    outcomes: Counter = Counter()
    for r in results:
        outcomes.update(o for *_, o in r["calls"])
        prefix = f"mesh-{r['index']} ({r['mode']})"
        # exactly once after ack, nothing missing, nothing foreign
        assert r["dup_after_ack"] == [], f"{prefix}: message ids seen again after ack: {r['dup_after_ack'][:5]}"
        assert r["dup_before_ack"] == [], f"{prefix}: the same message id under two cursors: {r['dup_before_ack'][:5]}"
        assert r["missing"] == [], f"{prefix}: {len(r['missing'])} messages never arrived: {r['missing'][:5]}"
        ids = {m["message_id"] for m in r["received"]}
        assert ids <= set(expect[r["aid"]]) | set(maybe[r["aid"]]), f"{prefix}: got messages nobody sent to it"
        assert r["other_kinds"] == [], f"{prefix}: unexpected event kinds {Counter(r['other_kinds'])}"
        assert all(m["encrypted"] for m in r["received"]), f"{prefix}: a message arrived unencrypted"
        assert r["ack_errors"] == {} and r["stream_errors"] == {}, (r["ack_errors"], r["stream_errors"])
        # per-sender order: the sending app's counter and the gateway seq per sending AID
        for app, ns in by_key(r["received"], "app", "n").items():
            assert strictly_increasing(ns), f"{prefix}: messages of mesh-{app} out of order: {ns[:20]}"
        for sender, seqs in by_key(r["received"], "from", "seq").items():
            assert strictly_increasing(seqs), f"{prefix}: seqs from {sender} out of order"
    untyped = {k: v for k, v in outcomes.items() if k.startswith("UNTYPED")}
    assert not untyped, f"calls failed without a typed error: {untyped}"
    total = sum(outcomes.values())
    assert outcomes["ok"] >= 0.95 * total, f"too many failed calls: {dict(outcomes)}"
    delivered = sum(len(r["received"]) for r in results)
    return {"calls": dict(outcomes), "messages_sent_ok": sum(len(v) for v in expect.values()),
            "messages_failed_send": sum(len(v) for v in maybe.values()), "events_delivered": delivered}


def _latency(results, go_wall, stall_wall, gone_wall, end_wall) -> dict:
    """Median call latency (successful calls of all apps) before the staller started (skipping
    the first second), while it stalled, and after the daemon cut it off (reported only)."""
    calls = [(w, lat) for r in results for w, lat, _m, o in r["calls"] if o == "ok"]
    before = [lat for w, lat in calls if go_wall + 1.0 <= w < stall_wall]
    during = [lat for w, lat in calls if stall_wall <= w < gone_wall]
    after = [lat for w, lat in calls if gone_wall <= w < end_wall] or [float("nan")]
    assert len(before) > 50 and len(during) > 50, (len(before), len(during))
    b, d = statistics.median(before), statistics.median(during)
    out = {"latency_ms": {"median_before": round(b * 1e3, 2), "median_during_stall": round(d * 1e3, 2),
                          "median_after_cutoff": round(statistics.median(after) * 1e3, 2),
                          "p95_before": round(statistics.quantiles(before, n=20)[-1] * 1e3, 2),
                          "p95_during_stall": round(statistics.quantiles(during, n=20)[-1] * 1e3, 2),
                          "ratio": round(d / b, 2)}}
    assert d <= LATENCY_RATIO * max(b, 0.002), f"the staller slowed the other apps: {out}"
    return out


def _drain(client: Client, aid_: str, consumer: str, want: set[str], timeout: float = 30.0) -> dict:
    """Read `consumer`'s events of `aid_` from its last ack until every id in `want` came; ack the last."""
    ids: set[str] = set()
    dups: list[str] = []
    order: dict[str, list[int]] = {}
    last = None
    deadline = time.monotonic() + timeout
    with client.session(aid_).events(consumer=consumer, start="last_ack") as stream:
        while not want <= ids:
            assert time.monotonic() < deadline, f"{consumer}: {len(want - ids)} messages missing"
            ev = stream.get(timeout=max(0.1, deadline - time.monotonic()))
            if ev is None:
                continue
            mid = ev.data["message_id"]
            if mid in ids:
                dups.append(mid)
            ids.add(mid)
            order.setdefault(ev.data["payload"]["app"], []).append(ev.data["payload"]["n"])
            last = ev
        if last is not None:
            last.ack()
    return {"ids": ids, "dups": dups, "order": order}
