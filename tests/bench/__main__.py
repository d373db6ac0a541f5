"""aund's benchmarks against the official SDK (fastaun 0.5.25), in one run against one devnet.

    python -m tests.bench [--quick] [--out PATH] [--only NAMES] [--profile | --no-profile]
    ./dev bench --quick

Prints a table and writes JSON (`bench-results.json` in the cwd unless --out). Every figure is
a median over runs with min-max; every comparison is a ratio of runs measured side by side
(interleaved) in this run, against the same devnet. CPU is utime+stime from /proc/PID/stat of
every measured process (app workers, the daemon; fastaun workers); the harness itself only
orchestrates. Identities are registered once into a cache (--cache-dir, default
~/.cache/aund-bench) and reused; --fresh starts it over. See tests/bench/README.md.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from dataclasses import dataclass, field
from typing import Any

from tests.bench import spy
from tests.bench.harness import (
    BENCH, ROOT, BenchEnv, NotifySocket, Worker, aid_name, cpu_of, cpu_seconds, default_cache_dir,
    export_baseline, git_state, machine, ratio_runs, rss_bytes, start_nowait, summary, threads, wait_links_ready,
)
from tests.helpers import AundProcess

MODES = {
    "full": dict(runs=5, warmup=20, seq_n=200, flood_n=480, recv_n=240, idle_small=100, idle_large=1000,
                 mem_runs=3, storm_runs=3, ready_runs=5, ready_aids=100, start_runs=10, probe_runs=3,
                 prim_iter=400, prim_runs=5),
    "quick": dict(runs=3, warmup=8, seq_n=50, flood_n=160, recv_n=96, idle_small=20, idle_large=100,
                  mem_runs=2, storm_runs=2, ready_runs=3, ready_aids=100, start_runs=5, probe_runs=2,
                  prim_iter=200, prim_runs=3),
}
SECTIONS = ("primitives", "rtt", "send", "receive", "app_memory", "first_send", "health", "idle_memory", "storm",
            "ready", "scale")
DEFAULT_SECTIONS = tuple(s for s in SECTIONS if s != "scale")  # scale (10,000 AIDs) runs only when named
SCALE_CHUNK = 1000
SENDERS = 8
INFLIGHT = 16
MS, KIB, MIB = 1e3, 1024, 1024 * 1024


def log(*a: Any) -> None:
    print("[bench]", *a, file=sys.stderr, flush=True)


class Results:
    def __init__(self, mode: str, params: dict[str, Any]) -> None:
        self.figures: list[dict[str, Any]] = []
        self.meta: dict[str, Any] = {
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "mode": mode, "params": params,
            "machine": machine(), "aund": git_state(), "fastaun": _fastaun_version()}
        self.profiles: dict[str, Any] = {}
        self.errors: list[str] = []

    def figure(self, fid: str, title: str, unit: str, aund: list[float], *, ref: list[float] | None = None,
               ref_label: str = "fastaun", ratio: list[float] | None = None, goal: str = "",
               limit: float | None = None, on: str = "ratio", scale: float = 1.0, notes: list[str] | None = None,
               extra: dict[str, Any] | None = None, before: list[float] | None = None) -> dict[str, Any]:
        """One row. `on` says what the goal bounds: the ratio or the aund value (same unit as shown).
        `before`: the same figure of the baseline (--baseline), measured in the same rounds; its
        ratio to `ref` is taken per round (or against the one reference value)."""
        fig = {"id": fid, "title": title, "unit": unit, "scale": scale, "aund": summary(aund),
               "ref_label": ref_label, "ref": summary(ref) if ref is not None else None,
               "ratio": summary(ratio) if ratio is not None else None, "goal": goal, "limit": limit, "on": on,
               "met": None, "notes": list(notes or []), "extra": extra or {},
               "before": summary(before) if before is not None else None, "before_ratio": None}
        if before is not None and ratio is not None and ref:
            fig["before_ratio"] = summary(ratio_runs(before, ref) if len(ref) == len(before)
                                          else [x / ref[0] for x in before])
        if limit is not None:
            target = fig["ratio"] if on == "ratio" else fig["aund"]
            if target and target["median"] is not None:
                value = target["median"] * (1 if on == "ratio" else scale)
                fig["met"] = value <= limit
        self.figures.append(fig)
        return fig

    def get(self, fid: str) -> dict[str, Any] | None:
        return next((f for f in self.figures if f["id"] == fid), None)

    def as_json(self) -> dict[str, Any]:
        return {"meta": self.meta, "figures": self.figures, "profiles": self.profiles, "errors": self.errors}


def _fastaun_version() -> str:
    try:
        from importlib.metadata import version

        return version("fastaun")
    except Exception:  # noqa: BLE001
        return "?"


def _fmt(s: dict[str, Any] | None, scale: float, digits: int = 2) -> str:
    if not s or s["median"] is None:
        return "-"
    f = lambda v: f"{v * scale:.{digits}f}"  # noqa: E731
    if s["runs"] == 1:
        return f(s["median"])
    return f"{f(s['median'])} ({f(s['min'])}-{f(s['max'])})"


def table(results: Results) -> str:
    base = results.meta.get("baseline")
    rows = [("figure", "unit", "aund", "reference", "ratio", "goal", "met")]
    if base:
        rows[0] = ("figure", "unit", f"before ({base['commit']})", "aund now", "reference", "ratio before",
                   "ratio now", "goal", "met")
    for fig in results.figures:
        scale = fig["scale"]
        ref = fig["ref"]
        ref_text = f"{fig['ref_label']}: {_fmt(ref, scale)}" if ref else "-"
        met = {True: "yes", False: "NO", None: "-"}[fig["met"]]
        if base:
            rows.append((fig["title"], fig["unit"], _fmt(fig.get("before"), scale), _fmt(fig["aund"], scale),
                         ref_text, _fmt(fig.get("before_ratio"), 1.0, 3), _fmt(fig["ratio"], 1.0, 3),
                         fig["goal"] or "-", met))
            continue
        rows.append((fig["title"], fig["unit"], _fmt(fig["aund"], scale), ref_text, _fmt(fig["ratio"], 1.0, 3),
                     fig["goal"] or "-", met))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = []
    for i, r in enumerate(rows):
        lines.append("| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |")
        if i == 0:
            lines.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


# --- measurement helpers ---------------------------------------------------------------------------------
def measured(jobs: list[tuple[Worker, str, dict[str, Any]]], pids: list[int], devnet_pid: int | None = None,
             timeout: float = 300.0) -> tuple[list[dict[str, Any]], float, float, float]:
    """Send every job's command at once, wait for all answers. Returns (answers, CPU seconds of
    `pids` over the window, wall seconds, devnet CPU seconds)."""
    c0 = cpu_of(pids)
    d0 = cpu_seconds(devnet_pid) if devnet_pid else 0.0
    t0 = time.perf_counter()
    for w, cmd, args in jobs:
        w.send(cmd, **args)
    answers = [w.recv(timeout) for w, _, _ in jobs]
    wall = time.perf_counter() - t0
    cpu = cpu_of(pids) - c0
    dcpu = (cpu_seconds(devnet_pid) - d0) if devnet_pid else 0.0
    return answers, cpu, wall, dcpu


def profiled(name: str, pids: dict[str, int], run, results: Results, run_dir: Path, enabled: bool) -> None:
    """Run `run()` once more under py-spy (one sampler per pid) and keep the layer summaries."""
    if not enabled:
        return
    if spy.pyspy() is None and not spy.install():
        results.profiles[name] = {"error": "py-spy is not installed and `pip install py-spy` failed"}
        return
    profs = {who: spy.Profiler(pid, run_dir / f"profile-{name}-{who}.raw", rate=500) for who, pid in pids.items()}
    time.sleep(0.3)  # let py-spy attach
    try:
        run()
    finally:
        out = {}
        for who, prof in profs.items():
            path = prof.stop()
            out[who] = spy.summarize(path) if path else {"samples": 0}
            if path:
                out[who]["raw"] = str(path)
        results.profiles[name] = out


def profile_notes(results: Results, name: str) -> list[str]:
    prof = results.profiles.get(name) or {}
    notes = []
    for who, s in prof.items():
        if isinstance(s, dict) and s.get("samples"):
            notes.append(f"profile {name}/{who} (self time by layer): {spy.one_line(s)}")
    return notes


# --- the main phase: one daemon per side, app workers, fastaun workers -------------------------------------------
@dataclass
class Side:
    """One aund under test: its daemon, its app workers and its AIDs. "now" is this checkout;
    "before" a baseline revision's tree (--baseline REV), measured in the same interleaved rounds
    against the same devnet and the same fastaun workers."""

    label: str
    root: Path | None = None     # None: this checkout
    tag: str = ""                # AID name prefix of this side ("" now, "b" before)
    daemon: AundProcess | None = None
    apps: list[Worker] = field(default_factory=list)
    consumer: Worker | None = None

    @property
    def senders(self) -> list[str]:
        return [aid_name(f"{self.tag}s", i) for i in range(SENDERS)]

    @property
    def receiver(self) -> str:
        return aid_name(f"{self.tag}r", 0)

    @property
    def dpid(self) -> int:
        assert self.daemon is not None and self.daemon.proc is not None
        return self.daemon.proc.pid

    @property
    def worker_env(self) -> dict[str, str]:
        """An app worker of this side imports this side's client_stub."""
        return {"PYTHONPATH": str(self.root)} if self.root is not None else {}


def rounds(runs: int, parties: list[Any]) -> list[list[Any]]:
    """The order of the parties in each round: rotated by one per round, so no party always goes first."""
    return [parties[r % len(parties):] + parties[:r % len(parties)] for r in range(runs)]


class MainPhase:
    def __init__(self, env: BenchEnv, P: dict[str, Any], results: Results, profile: bool,
                 baseline: Path | None = None) -> None:
        self.env, self.P, self.results, self.profile = env, P, results, profile
        self.sides = [Side("now")] + ([Side("before", baseline, "b")] if baseline is not None else [])
        self.fa: Worker | None = None            # fastaun: fa-seq (sequential + 1-process flood), sink, fa-sender
        self.fa_recv: Worker | None = None       # fastaun receiver
        self.fa_apps: list[Worker] = []          # 8 fastaun "apps", one AID each
        self.sink = ""
        self.workers: list[Worker] = []

    # this checkout's side, for the figures measured for it alone (memory, start, health)
    @property
    def now(self) -> Side:
        return self.sides[0]

    @property
    def daemon(self) -> AundProcess | None:
        return self.now.daemon

    @property
    def senders(self) -> list[str]:
        return self.now.senders

    @property
    def dpid(self) -> int:
        return self.now.dpid

    @property
    def devnet_pid(self) -> int:
        assert self.env.devnet is not None and self.env.devnet.proc is not None
        return self.env.devnet.proc.pid

    def before(self, values: dict[str, list[float]]) -> list[float] | None:
        return values.get("before") if len(self.sides) > 1 else None

    def start(self) -> None:
        env = self.env
        for side in self.sides:
            aids = [*side.senders, side.receiver]
            state = "aund-main" if not side.tag else f"aund-main-{side.tag}"
            if side.root is not None:
                ensure_registered(env, state, aids, root=side.root)
            side.daemon = env.daemon(f"main-{side.label}", state, aids, root=side.root)
            t0 = time.monotonic()
            side.daemon.start(timeout=60)
            wait_links_ready(side.daemon.socket, len(aids), 300)
            log(f"{side.label} daemon ready with {len(aids)} links in {time.monotonic() - t0:.1f} s")
        fenv = env.fastaun_env()
        self.fa = self._worker("fastaun_worker.py", fenv, "fastaun-main")
        self.fa_recv = self._worker("fastaun_worker.py", fenv, "fastaun-recv")
        self.fa_apps = [self._worker("fastaun_worker.py", fenv, f"fastaun-app{i}") for i in range(SENDERS)]
        for side in self.sides:
            side.apps = [self._worker("app_worker.py", side.worker_env, f"{side.label}-app{i}") for i in range(SENDERS)]
            side.consumer = self._worker("app_worker.py", side.worker_env, f"{side.label}-consumer")
        for w in self.workers:
            w.ready()
        # a fresh offline recipient with a published prekey (every sender in every figure sends to it)
        self.sink = self.fa.call("open", name="sink", fresh=True, timeout=120)["aid"]
        self.fa.call("close", name="sink")
        jobs = [(self.fa, "open", {"name": "fa-seq"}), (self.fa_recv, "open", {"name": "fa-recv"})]
        jobs += [(w, "open", {"name": f"fa-app{i}"}) for i, w in enumerate(self.fa_apps)]
        for w, cmd, a in jobs:
            w.send(cmd, **a)
        opened = [w.recv(180) for w, _, _ in jobs]
        self.fa_recv_aid = opened[1]["aid"]
        self.fa.call("open", name="fa-sender", timeout=120)
        for side in self.sides:
            sock = str(side.daemon.socket)
            for i, w in enumerate(side.apps):
                w.call("open", sock=sock, aid=side.senders[i])
                w.call("aopen", sock=sock, aid=side.senders[i])
            side.consumer.call("aopen", sock=sock, aid=side.receiver)
            side.consumer.call("subscribe", aid=side.receiver, consumer=f"bench-{os.getpid()}-{int(time.time())}")
        log(f"{len(self.workers)} workers ready; sink {self.sink}")

    def _worker(self, script: str, env: dict[str, str], name: str) -> Worker:
        w = Worker(script, env, name, self.env.run_dir)
        self.workers.append(w)
        return w

    def close(self) -> None:
        for w in self.workers:
            try:
                w.close()
            except Exception:  # noqa: BLE001
                pass
        for side in self.sides:
            if side.daemon is not None:
                try:
                    side.daemon.stop()
                except AssertionError as exc:
                    self.results.errors.append(f"{side.label} daemon stop: {exc}")

    # --- 1. sequential plain round trip ---------------------------------------------------------------
    def rtt(self) -> None:
        P, fa = self.P, self.fa
        for side in self.sides:
            side.apps[0].call("seq", aid=side.senders[0], to=self.sink, n=P["warmup"], encrypt=False)
        fa.call("seq", name="fa-seq", to=self.sink, n=P["warmup"], encrypt=False)
        a_med, a_cpu, a_app, a_dmn = ({s.label: [] for s in self.sides} for _ in range(4))
        f_med, f_cpu = [], []
        for order in rounds(P["runs"], [*self.sides, None]):
            for side in order:
                if side is not None:
                    app, s0, k = side.apps[0], side.senders[0], side.label
                    c_app0, c_d0 = cpu_seconds(app.pid), cpu_seconds(side.dpid)
                    (ans,), cpu, _, _ = measured([(app, "seq", dict(aid=s0, to=self.sink, n=P["seq_n"], encrypt=False))],
                                                 [app.pid, side.dpid])
                    a_med[k].append(statistics.median(ans["times"]))
                    a_cpu[k].append(cpu / P["seq_n"])
                    a_app[k].append((cpu_seconds(app.pid) - c_app0) / P["seq_n"])
                    a_dmn[k].append((cpu_seconds(side.dpid) - c_d0) / P["seq_n"])
                else:
                    (ans,), cpu, _, _ = measured([(fa, "seq", dict(name="fa-seq", to=self.sink, n=P["seq_n"],
                                                                  encrypt=False))], [fa.pid])
                    f_med.append(statistics.median(ans["times"]))
                    f_cpu.append(cpu / P["seq_n"])
        app, s0 = self.now.apps[0], self.now.senders[0]
        ping, aseq = [], []
        sock = str(self.daemon.socket)
        app.call("aseq", aid=s0, to=self.sink, n=P["warmup"], encrypt=False)
        for _ in range(P["runs"]):
            ping.append(statistics.median(app.call("ping", sock=sock, n=P["seq_n"])["times"]))
            aseq.append(statistics.median(app.call("aseq", aid=s0, to=self.sink, n=P["seq_n"], encrypt=False)["times"]))
        for side in self.sides:
            suffix = "" if side is self.now else f"-{side.label}"
            sapp, ss0 = side.apps[0], side.senders[0]
            profiled(f"rtt{suffix}", {"daemon": side.dpid, "app": sapp.pid},
                     lambda sapp=sapp, ss0=ss0: sapp.call("seq", aid=ss0, to=self.sink, n=3 * P["seq_n"], encrypt=False),
                     self.results, self.env.run_dir, self.profile)
        R = self.results
        fig = R.figure("rtt_plain", "1. message.send plain, sequential: wall per call", "ms", a_med["now"], ref=f_med,
                       ratio=ratio_runs(a_med["now"], f_med), goal="aund/fastaun <= 0.8", limit=0.8, scale=MS,
                       extra={"n_per_run": P["seq_n"], "client": "client_stub.Client (blocking)"},
                       before=self.before(a_med))
        if fig["met"] is False:
            fig["notes"] += profile_notes(R, "rtt")
        R.figure("rtt_async", "   same, app on client_stub.AsyncClient", "ms", aseq, ref=f_med,
                 ratio=ratio_runs(aseq, f_med), scale=MS,
                 extra={"note": "not interleaved with the fastaun runs: measured right after them"})
        R.figure("ping", "   local hop alone: ping app -> aund -> app", "ms", ping, scale=MS)
        R.figure("plain_cpu", "   plain send, CPU per message (app+daemon vs fastaun)", "ms", a_cpu["now"], ref=f_cpu,
                 ratio=ratio_runs(a_cpu["now"], f_cpu), goal="aund/fastaun <= 0.4", limit=0.4, scale=MS,
                 extra={"app_cpu_ms": summary([x * MS for x in a_app["now"]]),
                        "daemon_cpu_ms": summary([x * MS for x in a_dmn["now"]]),
                        **({"before_daemon_cpu_ms": summary([x * MS for x in a_dmn["before"]])}
                           if "before" in a_dmn else {})},
                 before=self.before(a_cpu))

    # --- 2. E2EE send with 16 in flight ------------------------------------------------------------------
    def send(self, prim_send: float | None) -> None:
        P, sink = self.P, self.sink
        n = P["flood_n"]
        per = n // SENDERS
        fa, fa_apps = self.fa, self.fa_apps
        # warm up: bootstrap caches, prekeys, code paths
        for side in self.sides:
            apps = side.apps
            measured([(apps[0], "flood", dict(aid=side.senders[0], to=sink, n=2 * INFLIGHT, inflight=INFLIGHT,
                                              encrypt=True))], [])
            measured([(w, "flood", dict(aid=side.senders[i], to=sink, n=P["warmup"], inflight=2, encrypt=True))
                      for i, w in enumerate(apps)], [])
        measured([(fa, "flood", dict(name="fa-seq", to=sink, n=2 * INFLIGHT, inflight=INFLIGHT, encrypt=True))]
                 + [(w, "flood", dict(name=f"fa-app{i}", to=sink, n=P["warmup"], inflight=2, encrypt=True))
                    for i, w in enumerate(fa_apps)], [])
        keys = ("cpu", "tp", "app", "dmn", "dev")
        data = {k: {"a": {key: {s.label: [] for s in self.sides} for key in keys},
                    "f": {key: [] for key in keys}} for k in ("1", "8")}

        def aund_jobs(k: str, side: Side) -> tuple[list, list[int]]:
            apps = side.apps
            if k == "1":
                return ([(apps[0], "flood", dict(aid=side.senders[0], to=sink, n=n, inflight=INFLIGHT, encrypt=True))],
                        [apps[0].pid])
            return ([(w, "flood", dict(aid=side.senders[i], to=sink, n=per, inflight=INFLIGHT // SENDERS, encrypt=True))
                     for i, w in enumerate(apps)], [w.pid for w in apps])

        def fa_jobs(k: str) -> tuple[list, list[int]]:
            if k == "1":
                return ([(fa, "flood", dict(name="fa-seq", to=sink, n=n, inflight=INFLIGHT, encrypt=True))], [fa.pid])
            return ([(w, "flood", dict(name=f"fa-app{i}", to=sink, n=per, inflight=INFLIGHT // SENDERS, encrypt=True))
                     for i, w in enumerate(fa_apps)], [w.pid for w in fa_apps])

        for order in rounds(P["runs"], [*self.sides, None]):
            for k in ("1", "8"):
                total = n if k == "1" else per * SENDERS
                for side in order:
                    if side is not None:
                        d, lab = data[k]["a"], side.label
                        jobs, app_pids = aund_jobs(k, side)
                        c_app0 = cpu_of(app_pids)
                        _, cpu, wall, dcpu = measured(jobs, app_pids + [side.dpid], self.devnet_pid)
                        d["cpu"][lab].append(cpu / total)
                        d["app"][lab].append((cpu_of(app_pids) - c_app0) / total)
                        d["dmn"][lab].append(d["cpu"][lab][-1] - d["app"][lab][-1])
                        d["tp"][lab].append(total / wall)
                        d["dev"][lab].append(dcpu / total)
                    else:
                        d = data[k]["f"]
                        jobs, pids = fa_jobs(k)
                        _, cpu, wall, dcpu = measured(jobs, pids, self.devnet_pid)
                        d["cpu"].append(cpu / total)
                        d["tp"].append(total / wall)
                        d["dev"].append(dcpu / total)
        for k in ("1", "8"):
            for side in self.sides:
                jobs, app_pids = aund_jobs(k, side)
                jobs = [(w, c, dict(a, n=3 * a["n"])) for w, c, a in jobs]
                pids = {"daemon": side.dpid, "app": app_pids[0]}
                suffix = "" if side is self.now else f"-{side.label}"
                profiled(f"send{k}{suffix}", pids, lambda jobs=jobs: measured(jobs, []), self.results,
                         self.env.run_dir, self.profile)
        R = self.results
        for k, label in (("1", "1 app"), ("8", f"{SENDERS} apps")):
            a, f = data[k]["a"], data[k]["f"]
            extra = {"n_per_run": n if k == "1" else per * SENDERS, "in_flight_total": INFLIGHT,
                     "app_cpu_ms": summary([x * MS for x in a["app"]["now"]]),
                     "daemon_cpu_ms": summary([x * MS for x in a["dmn"]["now"]]),
                     "devnet_cpu_ms_aund_runs": summary([x * MS for x in a["dev"]["now"]]),
                     "devnet_cpu_ms_fastaun_runs": summary([x * MS for x in f["dev"]])}
            if len(self.sides) > 1:
                extra["before_daemon_cpu_ms"] = summary([x * MS for x in a["dmn"]["before"]])
                extra["before_app_cpu_ms"] = summary([x * MS for x in a["app"]["before"]])
            if k == "8":
                extra["layout"] = (f"{SENDERS} processes, each its own AID and {INFLIGHT // SENDERS} in flight "
                                   f"(16 in total), for aund (8 client_stub apps) and fastaun (8 SDK processes)")
            f1 = R.figure(f"send{k}_cpu", f"2. E2EE send, {label}, 16 in flight: CPU per message", "ms",
                          a["cpu"]["now"], ref=f["cpu"], ratio=ratio_runs(a["cpu"]["now"], f["cpu"]),
                          goal="aund/fastaun <= 0.3", limit=0.3, scale=MS, extra=extra, before=self.before(a["cpu"]))
            f2 = R.figure(f"send{k}_floor", f"   E2EE send, {label}: CPU vs the crypto primitives", "ms",
                          a["cpu"]["now"], ref=[prim_send] if prim_send else None, ref_label="primitives",
                          ratio=[x / prim_send for x in a["cpu"]["now"]] if prim_send else None,
                          goal="aund/primitives <= 1.5", limit=1.5, scale=MS, before=self.before(a["cpu"]))
            R.figure(f"send{k}_tput", f"   E2EE send, {label}: throughput", "msg/s", a["tp"]["now"], ref=f["tp"],
                     ratio=ratio_runs(a["tp"]["now"], f["tp"]), goal="(higher is better)", before=self.before(a["tp"]))
            if f1["met"] is False or f2["met"] is False:
                notes = profile_notes(R, f"send{k}")
                f1["notes"] += notes
                f2["notes"] += notes

    # --- 3. E2EE receive ---------------------------------------------------------------------------------
    def receive(self, prim_recv: float | None) -> None:
        P, fa, fr = self.P, self.fa, self.fa_recv
        assert fa and fr
        n = P["recv_n"]

        def aund_round(side: Side, count: int, pids: list[int], ack_every: int = 1):
            return measured([(side.consumer, "consume", dict(aid=side.receiver, n=count, ack_every=ack_every)),
                             (fa, "flood", dict(name="fa-sender", to=side.receiver, n=count, inflight=INFLIGHT,
                                                encrypt=True))], pids, self.devnet_pid)

        def fa_round(count: int, pids: list[int]):
            fr.call("recv_mark", name="fa-recv")
            return measured([(fr, "recv_wait", dict(name="fa-recv", n=count)),
                             (fa, "flood", dict(name="fa-sender", to=self.fa_recv_aid, n=count, inflight=INFLIGHT,
                                                encrypt=True))], pids, self.devnet_pid)

        for side in self.sides:
            aund_round(side, P["warmup"], [])
        fa_round(P["warmup"], [])
        a_cpu, a_app, a_dmn, a_wall, batched = ({s.label: [] for s in self.sides} for _ in range(5))
        f_cpu, f_wall = [], []
        for order in rounds(P["runs"], [*self.sides, None]):
            for side in order:
                if side is not None:
                    lab, cons = side.label, side.consumer
                    c0 = cpu_seconds(cons.pid)
                    _, cpu, wall, _ = aund_round(side, n, [cons.pid, side.dpid])
                    a_cpu[lab].append(cpu / n)
                    a_app[lab].append((cpu_seconds(cons.pid) - c0) / n)
                    a_dmn[lab].append(a_cpu[lab][-1] - a_app[lab][-1])
                    a_wall[lab].append(wall)
                else:
                    _, cpu, wall, _ = fa_round(n, [fr.pid])
                    f_cpu.append(cpu / n)
                    f_wall.append(wall)
        for order in rounds(P["runs"], self.sides):
            for side in order:
                _, cpu, _, _ = aund_round(side, n, [side.consumer.pid, side.dpid], ack_every=16)
                batched[side.label].append(cpu / n)
        for side in self.sides:  # the baseline too: where a figure moved, the two profiles say why
            suffix = "" if side is self.now else f"-{side.label}"
            profiled(f"receive{suffix}", {"daemon": side.dpid, "app": side.consumer.pid},
                     lambda side=side: aund_round(side, 3 * n, []), self.results, self.env.run_dir, self.profile)
        R = self.results
        extra = {"n_per_run": n, "sender": "fastaun (one process, 16 in flight) for both receivers",
                 "consumer": "client_stub.AsyncClient events(), ack after every event",
                 "app_cpu_ms": summary([x * MS for x in a_app["now"]]),
                 "daemon_cpu_ms": summary([x * MS for x in a_dmn["now"]]),
                 "wall_s_aund": summary(a_wall["now"]), "wall_s_fastaun": summary(f_wall)}
        if len(self.sides) > 1:
            extra["before_app_cpu_ms"] = summary([x * MS for x in a_app["before"]])
            extra["before_daemon_cpu_ms"] = summary([x * MS for x in a_dmn["before"]])
        f1 = R.figure("recv_cpu", "3. E2EE receive: CPU per message (daemon+app vs fastaun)", "ms", a_cpu["now"],
                      ref=f_cpu, ratio=ratio_runs(a_cpu["now"], f_cpu), goal="aund/fastaun <= 0.25", limit=0.25,
                      scale=MS, extra=extra, before=self.before(a_cpu))
        f2 = R.figure("recv_floor", "   E2EE receive: CPU vs the crypto primitives", "ms", a_cpu["now"],
                      ref=[prim_recv] if prim_recv else None, ref_label="primitives",
                      ratio=[x / prim_recv for x in a_cpu["now"]] if prim_recv else None,
                      goal="aund/primitives <= 2", limit=2.0, scale=MS, before=self.before(a_cpu))
        R.figure("recv_cpu_ack16", "   same, the app acks every 16th event", "ms", batched["now"], ref=f_cpu,
                 ratio=ratio_runs(batched["now"], f_cpu), scale=MS, before=self.before(batched),
                 extra={"note": "run after the interleaved pairs; the ratio uses their fastaun runs"})
        if f1["met"] is False or f2["met"] is False:
            notes = profile_notes(R, "receive")
            f1["notes"] += notes
            f2["notes"] += notes

    # --- 4b. what an app pays to use AUN ----------------------------------------------------------------------
    def app_memory(self) -> dict[str, list[float]]:
        P = self.P
        stub, fast, dmn = [], [], []
        stub_import, fast_import, fast_threads, stub_threads = [], [], [], []
        fenv = dict(os.environ, **self.env.fastaun_env())
        for _ in range(P["probe_runs"]):
            before = rss_bytes(self.dpid)
            p = subprocess.Popen([sys.executable, str(BENCH / "mem_probe.py"), "stub", str(self.daemon.socket),
                                  self.senders[0]], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=ROOT)
            r = json.loads(p.stdout.readline())
            time.sleep(0.2)
            dmn.append(rss_bytes(self.dpid) - before)
            p.communicate("\n", timeout=30)
            stub.append(r["connected"] - r["base"])
            stub_import.append(r["imported"] - r["base"])
            stub_threads.append(r["threads"])
            with open(self.env.run_dir / "mem_probe_fastaun.stderr", "a") as err:
                p = subprocess.Popen([sys.executable, str(BENCH / "mem_probe.py"), "fastaun", "fa-mem"],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err, text=True, cwd=ROOT,
                                     env=fenv)
            line = p.stdout.readline()
            if not line:
                raise RuntimeError(f"fastaun mem probe failed (rc={p.wait()})")
            r = json.loads(line)
            p.communicate("\n", timeout=30)
            fast.append(r["connected"] - r["base"])
            fast_import.append(r["imported"] - r["base"])
            fast_threads.append(r["threads"])
        return {"stub": stub, "fastaun": fast, "daemon_delta": dmn, "stub_import": stub_import,
                "fastaun_import": fast_import, "stub_threads": stub_threads, "fastaun_threads": fast_threads}

    # --- 6b. app start to first send; 6c. health ---------------------------------------------------------
    def first_send(self) -> None:
        P = self.P
        walls, imports = [], []
        for _ in range(P["start_runs"]):
            t0 = time.time()
            done = subprocess.run([sys.executable, str(BENCH / "first_send.py"), str(self.daemon.socket),
                                   self.senders[0], self.sink], capture_output=True, text=True, cwd=ROOT, timeout=60)
            if done.returncode != 0:
                raise RuntimeError(f"first_send.py failed: {done.stderr[-1500:]}")
            r = json.loads(done.stdout.splitlines()[-1])
            walls.append(r["t_reply"] - t0)
            imports.append(r["import_seconds"])
        python_only = []
        for _ in range(P["start_runs"]):
            t0 = time.perf_counter()
            subprocess.run([sys.executable, "-c", "pass"], check=True)
            python_only.append(time.perf_counter() - t0)
        R = self.results
        fig = R.figure("first_send", "6b. app process start to its first send's reply", "ms", walls,
                       goal="<= 100 ms", limit=100, on="value", scale=MS,
                       extra={"import_client_stub_ms": summary([x * MS for x in imports]),
                              "bare_python_start_ms": summary([x * MS for x in python_only]),
                              "send": "plain message.send through a pinned, ready link"})
        R.figure("import_stub", "   in-process `import client_stub`", "ms", imports, scale=MS)
        if fig["met"] is False:
            fig["notes"].append(f"a bare `python -c pass` takes {statistics.median(python_only) * MS:.0f} ms here; "
                                f"`import client_stub` adds {statistics.median(imports) * MS:.0f} ms "
                                "(python -X importtime -c 'import client_stub' shows where)")

    def health(self) -> None:
        P = self.P
        sock = str(self.daemon.socket)
        env = dict(os.environ, AUND_SOCKET=sock)
        cmd: list[str] | None = None
        how = ""
        if (ROOT / "aund" / "cli" / "health.py").exists():
            exe = Path(sys.executable).parent / "aund"
            cmd = [str(exe), "health"] if exe.exists() else [sys.executable, "-m", "aund", "health"]
            probe = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60, cwd=ROOT)
            if probe.returncode != 0:
                how = f"`aund health` exited {probe.returncode} ({probe.stderr.strip()[-200:]}); measured the fallback"
                cmd = None
            else:
                how = "`aund health` (AUND_SOCKET set)"
        if cmd is None:
            cmd = [sys.executable, "-c", f"import client_stub; client_stub.Client({sock!r}).status()"]
            how = how or ("`aund health` does not exist yet: measured "
                          "`python -c \"import client_stub; client_stub.Client(sock).status()\"`")
        walls = []
        for _ in range(P["start_runs"]):
            t0 = time.perf_counter()
            subprocess.run(cmd, env=env, capture_output=True, timeout=60, cwd=ROOT)
            walls.append(time.perf_counter() - t0)
        self.results.figure("health", "6c. `aund health` wall time", "ms", walls, goal="<= 150 ms", limit=150,
                            on="value", scale=MS, notes=[how], extra={"command": cmd})


# --- the idle phase: many links, storms, READY ------------------------------------------------------------------
def ensure_registered(env: BenchEnv, state: str, aids: list[str], root: Path | None = None) -> None:
    missing = [a for a in aids if not (env.cache / state / "AIDs" / a).is_dir()]
    if not missing:
        return
    log(f"registering {len(missing)} identities into {state} (once; kept in {env.cache})")
    d = env.daemon("register", state, aids, root=root)
    d.start(timeout=120)
    try:
        took = wait_links_ready(d.socket, len(aids), 900, 0.5)
        log(f"registered and connected {len(aids)} in {took:.1f} s")
    finally:
        d.stop(timeout=120)


def sample_rss(pid: int, n: int = 5, gap: float = 0.2) -> tuple[float, float]:
    values = []
    for _ in range(n):
        values.append(rss_bytes(pid))
        time.sleep(gap)
    return statistics.median(values), float(threads(pid))


def idle_sides(baseline: Path | None) -> list[Side]:
    return [Side("now")] + ([Side("before", baseline, "b")] if baseline is not None else [])


def idle_memory_and_storm(env: BenchEnv, P: dict[str, Any], results: Results, sections: set[str],
                          baseline: Path | None = None) -> dict[str, Any]:
    """RSS at `idle_small` and `idle_large` idle links, per side, the sides alternating in each run;
    then the storm, one side at a time (only its daemon connected)."""
    small, large = P["idle_small"], P["idle_large"]
    sides = idle_sides(baseline)
    aids = {s.label: [aid_name(f"{s.tag}idle", i) for i in range(large)] for s in sides}
    state = {s.label: "aund-idle" if not s.tag else f"aund-idle-{s.tag}" for s in sides}
    for s in sides:
        ensure_registered(env, state[s.label], aids[s.label], root=s.root)
    rss_s, rss_l, per_link, ready_s, ready_l, thr = ({s.label: [] for s in sides} for _ in range(6))
    runs = P["mem_runs"] if "idle_memory" in sections else 0
    for order in rounds(runs, sides):
        for side in order:
            lab, pair = side.label, []
            for count in (small, large):
                d = env.daemon(f"idle{count}-{lab}", state[lab], aids[lab][:count], root=side.root)
                t0 = time.monotonic()
                d.start(timeout=120)
                try:
                    took = wait_links_ready(d.socket, count, 600, 0.25)
                    (ready_s if count == small else ready_l)[lab].append(time.monotonic() - t0)
                    time.sleep(1.0)
                    rss, th = sample_rss(d.proc.pid)
                finally:
                    d.stop(timeout=120)
                pair.append(rss)
                if count == large:
                    thr[lab].append(th)
                log(f"idle daemon ({lab}), {count} links: ready in {took:.1f} s, RSS {rss / MIB:.1f} MiB")
            rss_s[lab].append(pair[0])
            rss_l[lab].append(pair[1])
            per_link[lab].append((pair[1] - pair[0]) / (large - small))
    before = (lambda v: v["before"]) if baseline is not None else (lambda v: None)
    if runs:
        results.figure("idle_rss_small", f"4. daemon RSS, {small} idle links", "MiB", rss_s["now"], scale=1 / MIB,
                       extra={"start_to_all_ready_s": summary(ready_s["now"])}, before=before(rss_s))
        results.figure("idle_rss_large", f"   daemon RSS, {large} idle links", "MiB", rss_l["now"], scale=1 / MIB,
                       extra={"start_to_all_ready_s": summary(ready_l["now"]), "threads": summary(thr["now"])},
                       before=before(rss_l))
        fig = results.figure("idle_per_link", f"   RSS per idle link ({small}->{large})", "KiB", per_link["now"],
                             goal="<= 32 KiB at 1,000 links", limit=32, on="value", scale=1 / KIB,
                             before=before(per_link))
        if large < 1000:
            fig["notes"].append(f"quick mode: {large} links, not 1,000")
    if "storm" in sections:
        walls: dict[str, dict[str, list[float]]] = {}
        for side in sides:
            d = env.daemon(f"storm-{side.label}", state[side.label], aids[side.label], root=side.root)
            d.start(timeout=120)
            try:
                wait_links_ready(d.socket, large, 600, 0.25)
                walls[side.label] = storm(env, d, large, P)
            finally:
                d.stop(timeout=120)
        w = walls["now"]
        fig = results.figure("storm_ready", f"5. reconnect storm, {large} AIDs: devnet back -> all ready", "s",
                             w["ready"], goal="<= 30 s", limit=30, on="value",
                             extra={"from_sigkill_s": summary(w["from_kill"]), "connect_spread_s": summary(w["spread"]),
                                    "logins_or_refreshes": w["relogins"]},
                             before=walls["before"]["ready"] if "before" in walls else None)
        if large < 1000:
            fig["notes"].append(f"quick mode: {large} AIDs, not 1,000")
        results.figure("storm_peak", "   reconnect storm: peak auth.connect per second", "1/s", w["peak"],
                       extra={"source": "devnet /devnet/stats connection log `t` fields, densest 1-s window"},
                       before=walls["before"]["peak"] if "before" in walls else None)
    return {"rss_large": rss_l["now"], "large": large}


def storm(env: BenchEnv, d: AundProcess, count: int, P: dict[str, Any]) -> dict[str, list[float]]:
    """SIGKILL and restart the devnet under `d` (holding `count` ready links), `storm_runs` times:
    seconds until all are ready again, from the devnet's ready line and from the kill; the densest
    second of connects; their spread; re-logins."""
    devnet = env.devnet
    assert devnet is not None
    out: dict[str, list[float]] = {"ready": [], "from_kill": [], "peak": [], "spread": [], "relogins": []}
    for _ in range(P["storm_runs"]):
        t_kill = time.monotonic()
        devnet.kill()
        devnet.start(timeout=60)
        took = wait_links_ready(d.socket, count, 300, 0.1)
        out["ready"].append(took)
        out["from_kill"].append(time.monotonic() - t_kill)
        stats = devnet.stats()
        ts = sorted(e["t"] for e in stats["connections"] if e["event"] == "connect")
        best, j = 0, 0
        for i, t in enumerate(ts):  # the most auth.connect handshakes in any 1-second window
            while ts[j] < t - 1.0:
                j += 1
            best = max(best, i - j + 1)
        out["peak"].append(best)
        out["spread"].append(ts[-1] - ts[0] if ts else 0.0)
        out["relogins"].append(stats["rpc"].get("auth.aid_login2", 0) + stats["rpc"].get("auth.refresh_token", 0))
        log(f"storm: {count} links ready {took:.1f} s after the devnet was back; peak {best}/s")
        time.sleep(1.0)
    return out


def ready_time(env: BenchEnv, P: dict[str, Any], results: Results) -> None:
    count = min(P["ready_aids"], P["idle_large"])
    aids = [aid_name("idle", i) for i in range(count)]
    ensure_registered(env, "aund-idle", aids)
    ready, links = [], []
    for r in range(P["ready_runs"]):
        notify = NotifySocket(env.run_dir / f"notify{r}.sock")
        d = env.daemon(f"ready{r}", "aund-idle", aids, env={"NOTIFY_SOCKET": str(notify.path)})
        try:
            t0 = time.monotonic()
            start_nowait(d)
            t_ready = notify.wait_for("READY=1", 30)
            if t_ready is None:
                raise RuntimeError(f"no READY=1 within 30 s: {d.log_path.read_text()[-1500:]}")
            ready.append(t_ready - t0)
            wait_links_ready(d.socket, count, 120, 0.05)
            links.append(time.monotonic() - t0)
        finally:
            d.stop(timeout=120)
            notify.close()
    results.figure("ready", f"6a. daemon start -> READY=1, {count} stored AIDs", "ms", ready, goal="<= 1500 ms",
                   limit=1500, on="value", scale=MS, extra={"start_to_all_links_ready_s": summary(links)})


def scale(env: BenchEnv, n: int, results: Results, run_dir: Path, profile: bool) -> None:
    """Issue 14's scale test: `n` AIDs on one daemon. Registered once, `SCALE_CHUNK` at a time, into
    the cached state dir `aund-scale` (reruns skip it); then a daemon with n/10 and one with n
    configured: start -> all ready, RSS; per idle link = (RSS at n - RSS at n/10) / (n - n/10);
    then the devnet is SIGKILLed and restarted under the n links: time until all are ready again."""
    aids = [aid_name("scale", i) for i in range(n)]
    state = "aund-scale"
    t_reg = time.monotonic()
    for k in range(0, n, SCALE_CHUNK):
        ensure_registered(env, state, aids[k:k + SCALE_CHUNK])
    registering = time.monotonic() - t_reg
    small = max(1, n // 10)
    rss, ready = {}, {}
    for count in (small, n):
        d = env.daemon(f"scale{count}", state, aids[:count])
        t0 = time.monotonic()
        d.start(timeout=300)
        try:
            wait_links_ready(d.socket, count, 900, 1.0)
            ready[count] = time.monotonic() - t0
            time.sleep(2.0)
            rss[count], _ = sample_rss(d.proc.pid)
            log(f"scale: {count} links ready {ready[count]:.1f} s after the start; RSS {rss[count] / MIB:.0f} MiB")
            if count != n:
                continue
            devnet = env.devnet
            assert devnet is not None
            spy_run = None
            if profile and spy.pyspy():
                spy_run = spy.Profiler(d.proc.pid, run_dir / "scale-restart.raw")
            t_kill = time.monotonic()
            devnet.kill()
            devnet.start(timeout=120)
            t_back = time.monotonic()
            try:
                again = wait_links_ready(d.socket, count, 900, 1.0)
            except AssertionError as exc:
                again = None
                results.errors.append(f"scale: after the devnet restart: {exc}")
            finally:
                raw = spy_run.stop() if spy_run is not None else None
                if raw is not None:
                    results.profiles["scale_restart"] = {"daemon": spy.summarize(raw) | {"raw": str(raw)}}
            stats = devnet.stats()
            reconnect_rss, _ = sample_rss(d.proc.pid, n=3)
            extra = {"devnet_start_s": round(t_back - t_kill, 2), "from_sigkill_s": (again or 0) + t_back - t_kill,
                     "rss_after_mib": round(reconnect_rss / MIB, 1),
                     "reconnects": sum(1 for e in stats.get("connections", []) if e.get("event") == "connect"),
                     "logins_or_refreshes": stats["rpc"].get("auth.aid_login2", 0)
                     + stats["rpc"].get("auth.refresh_token", 0)}
            results.figure("scale_restart", f"7c. devnet restart under {n} idle links -> all ready", "s",
                           [again] if again is not None else [], goal="<= 60 s", limit=60, on="value", extra=extra)
        finally:
            d.stop(timeout=300)
    results.figure("scale_ready", f"7a. daemon start -> {n} links ready", "s", [ready[n]],
                   extra={f"ready_{small}_s": round(ready[small], 2), "registering_s": round(registering, 1),
                          "state": state})
    per = (rss[n] - rss[small]) / (n - small) if n > small else 0.0
    results.figure("scale_per_link", f"7b. RSS per idle link ({small}->{n})", "KiB", [per], scale=1 / KIB,
                   extra={f"rss_{small}_mib": round(rss[small] / MIB, 1), f"rss_{n}_mib": round(rss[n] / MIB, 1)})


def primitives(P: dict[str, Any], results: Results) -> tuple[float | None, float | None]:
    done = subprocess.run([sys.executable, "-m", "tests.bench.primitives", str(P["prim_iter"]), str(P["prim_runs"])],
                          capture_output=True, text=True, cwd=ROOT, timeout=300, check=True)
    r = json.loads(done.stdout)
    results.figure("prim_send", "0. crypto primitives of one E2EE send (floor)", "ms", r["send"], scale=MS,
                   extra={"what": "P-256 keygen + 3 ECDH + HKDF + 2 AES-GCM + 2 ECDSA signatures"})
    results.figure("prim_recv", "   crypto primitives of one E2EE receive (floor)", "ms", r["receive"], scale=MS,
                   extra={"what": "ECDSA verify + key load + 3 ECDH + HKDF + 2 AES-GCM decryptions"})
    return statistics.median(r["send"]), statistics.median(r["receive"])


def app_memory_figure(results: Results, mem: dict[str, list[float]], idle: dict[str, Any]) -> None:
    large, rss_l = idle.get("large"), idle.get("rss_large") or []
    share = statistics.median(rss_l) / large if rss_l and large else None
    stub_total = [x + (share or 0) for x in mem["stub"]]
    notes = []
    if share is None:
        notes.append("no idle-memory section in this run: the daemon's share is left out")
    else:
        notes.append(f"daemon share = its RSS at {large} idle links / {large} = {share / KIB:.0f} KiB")
    fig = results.figure("app_memory", "4b. memory an app adds to use AUN (app + daemon share vs fastaun)", "MiB",
                         stub_total, ref=mem["fastaun"], ratio=ratio_runs(stub_total, mem["fastaun"]),
                         goal="aund/fastaun <= 0.05", limit=0.05, scale=1 / MIB, notes=notes,
                         extra={"app_rss_delta_mib": summary([x / MIB for x in mem["stub"]]),
                                "app_import_delta_mib": summary([x / MIB for x in mem["stub_import"]]),
                                "app_threads": mem["stub_threads"],
                                "daemon_rss_delta_on_connect_kib": summary([x / KIB for x in mem["daemon_delta"]]),
                                "fastaun_import_delta_mib": summary([x / MIB for x in mem["fastaun_import"]]),
                                "fastaun_threads": mem["fastaun_threads"],
                                "measured": "RSS after import + connect + ready session, minus RSS before the import"})
    if large and large < 1000:
        fig["notes"].append(f"quick mode: share at {large} links")


# --- main ------------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tests.bench", description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="small N and fewer runs (a smoke run, < 3 minutes)")
    ap.add_argument("--out", type=Path, default=Path("bench-results.json"), help="JSON results (default ./bench-results.json)")
    ap.add_argument("--only", default="", help=f"comma-separated sections: {','.join(SECTIONS)} "
                                               "(default all but scale)")
    ap.add_argument("--profile", dest="profile", action="store_true", default=None,
                    help="profile aund with py-spy (default: on in full mode, off with --quick)")
    ap.add_argument("--no-profile", dest="profile", action="store_false")
    ap.add_argument("--cache-dir", type=Path, default=default_cache_dir(),
                    help="devnet and daemon state kept between runs (default ~/.cache/aund-bench)")
    ap.add_argument("--fresh", action="store_true", help="forget the cache: register every identity again")
    ap.add_argument("--scale-n", type=int, default=10_000, metavar="N",
                    help="AIDs of the scale section (default 10,000; registered once into the cache)")
    ap.add_argument("--baseline", metavar="REV", default="",
                    help="also measure git revision REV's aund (daemon + client_stub) in the same rounds: "
                         "a 'before' column (rtt, send, receive, idle_memory, storm)")
    args = ap.parse_args(argv)
    mode = "quick" if args.quick else "full"
    P = dict(MODES[mode])
    profile = (not args.quick) if args.profile is None else args.profile
    sections = set(s.strip() for s in args.only.split(",") if s.strip()) or set(DEFAULT_SECTIONS)
    unknown = sections - set(SECTIONS)
    if unknown:
        ap.error(f"unknown sections: {', '.join(sorted(unknown))}")
    # Bytecode as an installed package has it: this sandbox may set PYTHONDONTWRITEBYTECODE, which
    # would make every spawned aund/app recompile the source tree (and skew the start figures).
    os.environ.pop("PYTHONDONTWRITEBYTECODE", None)
    os.environ["PYTHONPYCACHEPREFIX"] = str(args.cache_dir / "pycache")
    results = Results(mode, P)
    results.meta["loadavg_start"] = os.getloadavg()
    results.meta["bytecode"] = f"cached under {os.environ['PYTHONPYCACHEPREFIX']} (PYTHONDONTWRITEBYTECODE unset)"
    t_start = time.monotonic()
    run_dir = Path(tempfile.mkdtemp(prefix="aund-bench-"))
    env = BenchEnv(args.cache_dir, run_dir)
    env.prepare(args.fresh)
    baseline: Path | None = None
    if args.baseline:
        baseline, commit = export_baseline(args.baseline, args.cache_dir)
        results.meta["baseline"] = {"rev": args.baseline, "commit": commit, "tree": str(baseline)}
    log(f"{mode} run; cache {args.cache_dir}; logs in {run_dir}")
    code = 0
    try:
        env.start_devnet()
        prim_send = prim_recv = None
        if sections & {"primitives", "send", "receive"}:
            prim_send, prim_recv = primitives(P, results)
        mem: dict[str, list[float]] | None = None
        main_sections = sections & {"rtt", "send", "receive", "app_memory", "first_send", "health"}
        if main_sections:
            phase = MainPhase(env, P, results, profile, baseline)
            try:
                phase.start()
                for name, fn in (("rtt", phase.rtt), ("send", lambda: phase.send(prim_send)),
                                 ("receive", lambda: phase.receive(prim_recv)), ("first_send", phase.first_send),
                                 ("health", phase.health)):
                    if name in sections:
                        log(f"section {name}")
                        fn()
                if "app_memory" in sections:
                    log("section app_memory")
                    mem = phase.app_memory()
            finally:
                phase.close()
        idle: dict[str, Any] = {}
        if sections & {"idle_memory", "storm"} or (mem is not None):
            log("section idle_memory/storm")
            idle = idle_memory_and_storm(env, P, results, sections | ({"idle_memory"} if mem is not None else set()),
                                         baseline)
        if mem is not None:
            app_memory_figure(results, mem, idle)
        if "ready" in sections:
            log("section ready")
            ready_time(env, P, results)
        if "scale" in sections:
            log(f"section scale ({args.scale_n} AIDs)")
            results.meta["scale_n"] = args.scale_n
            scale(env, args.scale_n, results, run_dir, args.profile is True)  # py-spy only when asked
    except Exception as exc:  # noqa: BLE001 - keep what was measured, say what failed
        import traceback

        results.errors.append(f"{type(exc).__name__}: {exc}")
        traceback.print_exc()
        code = 1
    finally:
        env.close()
    results.meta["duration_s"] = round(time.monotonic() - t_start, 1)
    results.meta["loadavg_end"] = os.getloadavg()
    results.meta["run_dir"] = str(run_dir)
    args.out.write_text(json.dumps(results.as_json(), indent=1, default=str) + "\n")
    m = results.meta
    print(f"\naund bench ({mode}) {m['date']}  machine: {m['machine']['cores']} cores, {m['machine']['cpu']}, "
          f"Python {m['machine']['python']}; aund {m['aund']['commit']}{'+dirty' if m['aund']['dirty'] else ''}, "
          f"fastaun {m['fastaun']}; {m['duration_s']} s")
    print(table(results))
    for fig in results.figures:
        for note in fig["notes"]:
            print(f"  note [{fig['id']}]: {note}")
    for err in results.errors:
        print(f"  ERROR: {err}")
    print(f"results: {args.out.resolve()}")
    return code


if __name__ == "__main__":
    sys.exit(main())
