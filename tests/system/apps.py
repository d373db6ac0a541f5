"""App programs for the system tests, each run as its own process through ``client_stub`` only:

    python -m tests.system.apps COMMAND '<json config>'

Commands (the config keys each reads are in their docstrings):

- ``mesh``: one of many apps of test_many_apps: sends E2EE messages to other AIDs while it
  consumes its own AID's messages with a durable consumer (``Client`` + threads, or
  ``AsyncClient`` + asyncio tasks), recording every call's outcome and latency and every event.
- ``staller``: subscribes, then never reads its socket again (a raw socket, not the stub, whose
  reader thread always reads).
- ``consume``: iterates one AID's events with a blocking ``Client``, acking each (or only the
  first few), one JSON line per event, until it has seen enough distinct messages.
- ``holder``: reads some events, acks only part of them, then blocks in a call (to be SIGKILLed
  mid-call and mid-iteration).
- ``uid-probe``: what an app under another uid may do (run by test_uid_policy with ``user=``).
- ``quota-probe``: how many connections another uid gets, and whether its calls still run.
- ``consumer-probe``: where another uid's durable consumer of the same name resumes.
- ``policy-probe``: an app under another uid (and supplementary groups) running a script of
  steps, some in background threads, synchronised with the test by files (test_broker_policy).

The programs talk to the test through files in a work directory (ready/go flags, JSON results)
and print nothing but their final JSON line on stdout. Stdlib and client_stub only: no aund.
"""
from __future__ import annotations

import json
import os
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Any

from client_stub import AsyncClient, Client, wire
from client_stub.errors import AundError, DaemonUnavailable

MESSAGE_KIND = "message.received"


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj))
    os.replace(tmp, path)


def _wait_file(path: Path, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def _outcome(exc: BaseException | None) -> str:
    """"ok", the typed error's class name, or "UNTYPED:<class>" for anything that is not an AundError."""
    if exc is None:
        return "ok"
    return type(exc).__name__ if isinstance(exc, AundError) else f"UNTYPED:{type(exc).__name__}"


# --- mesh ------------------------------------------------------------------------------------------
class MeshRecord:
    """What one mesh app saw; shared by its sender and its consumer (thread-safe by a lock)."""

    def __init__(self, cfg: dict[str, Any]) -> None:
        self.cfg = cfg
        self.lock = threading.Lock()
        self.calls: list[tuple[float, float, str, str]] = []  # (wall time, latency, method, outcome)
        self.sent: list[dict[str, Any]] = []
        self.received: list[dict[str, Any]] = []
        self.seen: set[str] = set()
        self.acked: set[str] = set()
        self.dup_after_ack: list[str] = []
        self.dup_before_ack: list[str] = []
        self.other_kinds: list[str] = []
        self.ack_errors: dict[str, int] = {}
        self.stream_errors: dict[str, int] = {}
        self.expect: set[str] | None = None

    def on_event(self, kind: str, data: Any, cursor: int) -> str | None:
        """Record one event; returns its message_id (None for other kinds)."""
        if kind != MESSAGE_KIND or not isinstance(data, dict):
            self.other_kinds.append(str(kind))
            return None
        mid = str(data.get("message_id"))
        payload = data.get("payload") if isinstance(data.get("payload"), dict) else {}
        with self.lock:
            if mid in self.acked:
                self.dup_after_ack.append(mid)
            elif mid in self.seen:
                self.dup_before_ack.append(mid)
            self.seen.add(mid)
            self.received.append({"message_id": mid, "from": data.get("from"), "seq": data.get("seq"),
                                  "cursor": cursor, "app": payload.get("app"), "n": payload.get("n"),
                                  "encrypted": data.get("encrypted")})
        return mid

    def on_ack(self, mid: str, exc: BaseException | None) -> None:
        with self.lock:
            if exc is None:
                self.acked.add(mid)
            else:
                self.ack_errors[_outcome(exc)] = self.ack_errors.get(_outcome(exc), 0) + 1

    def call_done(self, started_wall: float, latency: float, method: str, exc: BaseException | None) -> None:
        with self.lock:
            self.calls.append((started_wall, latency, method, _outcome(exc)))

    def complete(self) -> bool:
        with self.lock:
            return self.expect is not None and self.expect <= self.seen

    def load_expect(self, work: Path) -> bool:
        path = work / "expect.json"
        if self.expect is not None or not path.exists():
            return self.expect is not None
        exp = json.loads(path.read_text())
        with self.lock:
            self.expect = set(exp["expect"].get(self.cfg["aid"], []))
            self.deadline = exp["deadline"]
        return True

    def result(self) -> dict[str, Any]:
        with self.lock:
            return {"index": self.cfg["index"], "aid": self.cfg["aid"], "mode": self.cfg["mode"],
                    "calls": self.calls, "sent": self.sent, "received": self.received,
                    "dup_after_ack": self.dup_after_ack, "dup_before_ack": self.dup_before_ack,
                    "other_kinds": self.other_kinds, "ack_errors": self.ack_errors,
                    "stream_errors": self.stream_errors,
                    "missing": sorted((self.expect or set()) - self.seen)}


def _mesh_plan(cfg: dict[str, Any]):
    """The i-th operation of this app: (method, params, message record or None)."""
    i, targets, pad = cfg["index"], cfg["targets"], "x" * cfg.get("pad", 0)
    n = 0
    k = 0
    while True:
        k += 1
        if k % 5 == 0:
            yield "meta.ping", {}, None
            continue
        to = targets[n % len(targets)]
        mid = f"sys-{cfg['run']}-{i}-{n}"
        params = {"to": to, "message_id": mid,
                  "payload": {"type": "text", "text": f"mesh {i} {n}", "app": i, "n": n, "pad": pad}}
        yield "message.send", params, {"message_id": mid, "to": to, "n": n}
        n += 1


def mesh(cfg: dict[str, Any]) -> dict[str, Any]:
    """Config: socket, work, index, aid, targets, mode ("sync"|"async"), consumer, duration,
    interval, pad, run. Files: touches ready-<i>, waits for go, writes sent-<i>.json after
    sending, waits for expect.json ({"expect": {aid: [message_id]}, "deadline": wall time}),
    writes result-<i>.json once every expected message arrived (or the deadline passed)."""
    if cfg["mode"] == "async":
        import asyncio

        return asyncio.run(_mesh_async(cfg))
    return _mesh_sync(cfg)


def _mesh_sync(cfg: dict[str, Any]) -> dict[str, Any]:
    work, i = Path(cfg["work"]), cfg["index"]
    rec = MeshRecord(cfg)
    client = Client(cfg["socket"], app=f"mesh-{i}", timeout=20)
    client.ensure_identity(cfg["aid"])
    session = client.session(cfg["aid"])
    session.wait_ready(30)
    stream = session.events(consumer=cfg["consumer"], kinds=(MESSAGE_KIND,), start="last_ack").open()
    (work / f"ready-{i}").touch()
    if not _wait_file(work / "go", 120):
        raise SystemExit("no go")
    stop = threading.Event()

    def consume() -> None:
        while not stop.is_set():
            try:
                ev = stream.get(timeout=0.3)
            except AundError as exc:
                rec.stream_errors[_outcome(exc)] = rec.stream_errors.get(_outcome(exc), 0) + 1
                time.sleep(0.1)
                continue
            if ev is None:
                continue
            mid = rec.on_event(ev.kind, ev.data, ev.cursor)
            try:
                ev.ack()
                error = None
            except AundError as exc:
                error = exc
            if mid is not None:
                rec.on_ack(mid, error)

    reader = threading.Thread(target=consume, name="mesh-consumer", daemon=True)
    reader.start()
    plan = _mesh_plan(cfg)
    end = time.monotonic() + cfg["duration"]
    next_at = time.monotonic()
    while time.monotonic() < end:
        method, params, msg = next(plan)
        wall, t0 = time.time(), time.perf_counter()
        try:
            session.call(method, params, timeout=15)
            error = None
        except Exception as exc:  # noqa: BLE001 - every failure is counted by class (typed or not)
            error = exc
        rec.call_done(wall, time.perf_counter() - t0, method, error)
        if msg is not None:
            rec.sent.append(dict(msg, ok=error is None))
        next_at = max(next_at + cfg["interval"], time.monotonic())
        time.sleep(max(0.0, next_at - time.monotonic()))
    _write_json(work / f"sent-{i}.json", {"aid": cfg["aid"], "sent": rec.sent})
    while True:
        if rec.load_expect(work) and (rec.complete() or time.time() > rec.deadline):
            break
        time.sleep(0.05)
    stop.set()
    reader.join(10)
    stream.close()
    session.close()
    client.close()
    result = rec.result()
    _write_json(work / f"result-{i}.json", result)
    return {"index": i, "received": len(result["received"]), "missing": len(result["missing"])}


async def _mesh_async(cfg: dict[str, Any]) -> dict[str, Any]:
    import asyncio

    work, i = Path(cfg["work"]), cfg["index"]
    rec = MeshRecord(cfg)
    client = AsyncClient(cfg["socket"], app=f"mesh-{i}", timeout=20)
    await client.ensure_identity(cfg["aid"])
    session = client.session(cfg["aid"])
    await session.wait_ready(30)
    stream = await session.events(consumer=cfg["consumer"], kinds=(MESSAGE_KIND,), start="last_ack").open()
    (work / f"ready-{i}").touch()
    while not (work / "go").exists():
        await asyncio.sleep(0.02)
    stop = asyncio.Event()

    async def consume() -> None:
        while not stop.is_set():
            try:
                ev = await stream.get(timeout=0.3)
            except AundError as exc:
                rec.stream_errors[_outcome(exc)] = rec.stream_errors.get(_outcome(exc), 0) + 1
                await asyncio.sleep(0.1)
                continue
            if ev is None:
                continue
            mid = rec.on_event(ev.kind, ev.data, ev.cursor)
            try:
                await ev.ack()
                error = None
            except AundError as exc:
                error = exc
            if mid is not None:
                rec.on_ack(mid, error)

    reader = asyncio.get_running_loop().create_task(consume())
    plan = _mesh_plan(cfg)
    loop = asyncio.get_running_loop()
    end = loop.time() + cfg["duration"]
    next_at = loop.time()
    while loop.time() < end:
        method, params, msg = next(plan)
        wall, t0 = time.time(), time.perf_counter()
        try:
            await session.call(method, params, timeout=15)
            error = None
        except Exception as exc:  # noqa: BLE001 - every failure is counted by class (typed or not)
            error = exc
        rec.call_done(wall, time.perf_counter() - t0, method, error)
        if msg is not None:
            rec.sent.append(dict(msg, ok=error is None))
        next_at = max(next_at + cfg["interval"], loop.time())
        await asyncio.sleep(max(0.0, next_at - loop.time()))
    _write_json(work / f"sent-{i}.json", {"aid": cfg["aid"], "sent": rec.sent})
    while True:
        if rec.load_expect(work) and (rec.complete() or time.time() > rec.deadline):
            break
        await asyncio.sleep(0.05)
    stop.set()
    await asyncio.wait_for(reader, 10)
    await stream.aclose()
    await session.close()
    await client.close()
    result = rec.result()
    _write_json(work / f"result-{i}.json", result)
    return {"index": i, "received": len(result["received"]), "missing": len(result["missing"])}


# --- staller ---------------------------------------------------------------------------------------
def _frame(obj: dict[str, Any]) -> bytes:
    return wire.encode_frame(obj, wire.HARD_MAX_FRAME)


def staller(cfg: dict[str, Any]) -> dict[str, Any]:
    """Config: socket, work, aid, subs (consumers stall-0 .. stall-<subs-1>). Says hello, reads the
    hello reply, subscribes ``subs`` times from each consumer's last ack, touches staller-ready and
    then never reads again until staller-exit appears; then drains the socket to see whether the
    daemon hung up (EOF) and reports it."""
    work = Path(cfg["work"])
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(10)
    sock.connect(cfg["socket"])
    sock.sendall(_frame(wire.make_hello(1, "staller")))
    decoder = wire.FrameDecoder(wire.HARD_MAX_FRAME)
    hello = None
    while hello is None:
        chunk = sock.recv(65536)
        if not chunk:
            raise SystemExit("daemon hung up before the hello reply")
        decoder.feed(chunk)
        hello = decoder.next_frame()
    requests = [wire.make_request(10 + k, "subscribe", {"aid": cfg["aid"], "consumer": f"stall-{k}",
                                                         "kinds": [MESSAGE_KIND], "start": "last_ack"})
                for k in range(cfg["subs"])]
    sock.sendall(b"".join(_frame(r) for r in requests))
    (work / "staller-ready").touch()
    _wait_file(work / "staller-exit", 600)
    # now read what piled up, to learn whether the daemon closed the connection
    got, eof = 0, False
    sock.settimeout(2.0)
    deadline = time.monotonic() + 10
    try:
        while time.monotonic() < deadline:
            chunk = sock.recv(1 << 20)
            if not chunk:
                eof = True
                break
            got += len(chunk)
    except (socket.timeout, ConnectionResetError):
        pass
    sock.close()
    return {"eof": eof, "bytes_after_stall": got}


def next_event(stream, errors: dict[str, int], pause: float):
    """The next event within 0.5 s, or None; a stream error is counted by class (then a short pause,
    while the stub reconnects) instead of ending the app."""
    try:
        return stream.get(timeout=0.5)
    except AundError as exc:
        errors[_outcome(exc)] = errors.get(_outcome(exc), 0) + 1
        time.sleep(pause)
        return None


# --- consume ---------------------------------------------------------------------------------------
def consume(cfg: dict[str, Any]) -> dict[str, Any]:
    """Config: socket, aid, consumer, out (JSON lines file), expect (distinct messages to wait for),
    deadline (seconds), ack_first (ack only the first K events; default: ack every event),
    reconnect_attempts, app. One line per event: message_id, from, seq, cursor, sender, n, acked
    (whether its ack succeeded), t. Keeps iterating through daemon restarts; errors of the stream
    are counted by class in the final JSON line."""
    out = open(cfg["out"], "a", buffering=1)
    client = Client(cfg["socket"], app=cfg.get("app", "consume"), timeout=10,
                    reconnect_attempts=cfg.get("reconnect_attempts", 100))
    stream = client.session(cfg["aid"]).events(consumer=cfg["consumer"], kinds=(MESSAGE_KIND,), start="last_ack")
    ack_first = cfg.get("ack_first")
    seen: set[str] = set()
    errors: dict[str, int] = {}
    count = 0
    deadline = time.monotonic() + cfg["deadline"]
    while len(seen) < cfg["expect"] and time.monotonic() < deadline:
        ev = next_event(stream, errors, pause=0.2)
        if ev is None:
            continue
        count += 1
        data = ev.data if isinstance(ev.data, dict) else {}
        payload = data.get("payload") if isinstance(data.get("payload"), dict) else {}
        acked = False
        if ack_first is None or count <= ack_first:
            try:
                ev.ack()
                acked = True
            except AundError as exc:
                errors["ack:" + _outcome(exc)] = errors.get("ack:" + _outcome(exc), 0) + 1
        mid = str(data.get("message_id"))
        seen.add(mid)
        out.write(json.dumps({"kind": ev.kind, "message_id": mid, "from": data.get("from"), "seq": data.get("seq"),
                              "cursor": ev.cursor, "sender": payload.get("sender", payload.get("app")),
                              "n": payload.get("n"), "encrypted": data.get("encrypted"), "acked": acked,
                              "t": time.time()}) + "\n")
    stream.close()
    client.close()
    return {"distinct": len(seen), "events": count, "errors": errors}


# --- holder ----------------------------------------------------------------------------------------
def holder(cfg: dict[str, Any]) -> dict[str, Any]:
    """Config: socket, work, aid, consumer, read (events to read), ack_upto (ack the first K of
    them, by cursor), method. Writes read.json ({cursors, message_ids, acked_cursor}), waits for
    the file call-go, touches calling and blocks in ``call(method, timeout=60)``: the test
    SIGKILLs it there, with a call in flight and a subscription holding unacked events."""
    work = Path(cfg["work"])
    client = Client(cfg["socket"], app="holder", timeout=10)
    session = client.session(cfg["aid"])
    session.wait_ready(30)
    stream = session.events(consumer=cfg["consumer"], kinds=(MESSAGE_KIND,), start="last_ack")
    events = []
    while len(events) < cfg["read"]:
        ev = stream.get(timeout=30)
        if ev is None:
            raise SystemExit(f"only {len(events)} events")
        events.append(ev)
    acked = events[cfg["ack_upto"] - 1]
    acked.ack()
    _write_json(work / "read.json", {"cursors": [e.cursor for e in events],
                                     "message_ids": [e.data["message_id"] for e in events],
                                     "acked_cursor": acked.cursor})
    _wait_file(work / "call-go", 60)
    (work / "calling").touch()
    session.call(cfg["method"], {}, timeout=60)
    return {"error": "the call returned: the test should have killed this app first"}


# --- uid-probe -------------------------------------------------------------------------------------
def uid_probe(cfg: dict[str, Any]) -> dict[str, Any]:
    """Config: socket, allowed, denied (AIDs), uid, gid. Started as root, it drops to uid/gid (no
    supplementary groups) for good once its modules are imported (the interpreter may live where
    the other uid cannot exec it), then reports the outcome of each step: "ok", or the typed
    error's class name. The kernel takes SO_PEERCRED at connect(), i.e. the dropped credentials."""
    os.setgroups([])
    os.setgid(cfg["gid"])
    os.setuid(cfg["uid"])
    out: dict[str, Any] = {"uid": os.getresuid(), "gid": os.getresgid(), "groups": os.getgroups()}

    def step(name: str, fn) -> Any:
        try:
            value = fn()
        except Exception as exc:  # noqa: BLE001 - reported by class
            out[name] = _outcome(exc)
            if isinstance(exc, DaemonUnavailable):
                out[name + ".hint"] = exc.hint
            return None
        out[name] = "ok"
        return value

    client = Client(cfg["socket"], app="uid-probe", timeout=20, reconnect_attempts=0)
    if step("connect", client.connect) is None and out["connect"] != "ok":
        return out
    step("ping", client.ping)
    ids = step("identity.list", client.list_identities)
    out["listed"] = sorted(i["aid"] for i in ids or [])
    step("ensure.allowed", lambda: client.ensure_identity(cfg["allowed"]))
    step("ensure.denied", lambda: client.ensure_identity(cfg["denied"]))
    allowed = client.session(cfg["allowed"])
    step("open.allowed", lambda: allowed.wait_ready(30))
    step("call.allowed", lambda: allowed.call("meta.ping", {}, timeout=10))
    step("open.denied", lambda: client.session(cfg["denied"]).open())
    step("subscribe.allowed", lambda: allowed.events("probe").open().close())
    step("subscribe.denied", lambda: client.session(cfg["denied"]).events("probe").open())
    step("ack.denied", lambda: client.request("ack", {"aid": cfg["denied"], "consumer": "probe", "cursor": 1}))
    client.close()
    return out


# --- quota-probe -----------------------------------------------------------------------------------
def quota_probe(cfg: dict[str, Any]) -> dict[str, Any]:
    """Config: socket, uid, gid, connections (how many to open and keep), aid. Drops to uid/gid as
    uid-probe does, opens that many connections one after the other (each: "ok" or the typed
    error), then calls `echo` on `aid` through the first one that connected."""
    os.setgroups([])
    os.setgid(cfg["gid"])
    os.setuid(cfg["uid"])
    out: dict[str, Any] = {"connections": []}
    clients = []
    for _ in range(cfg["connections"]):
        client = Client(cfg["socket"], app="quota-probe", timeout=10, reconnect_attempts=0)
        try:
            client.connect()
            clients.append(client)
            out["connections"].append("ok")
        except AundError as exc:
            out["connections"].append(_outcome(exc))
            out["refusal"] = exc.data
    try:
        clients[0].session(cfg["aid"]).call("echo", {}, timeout=5)
        out["echo"] = "ok"
    except Exception as exc:  # noqa: BLE001 - reported by class
        out["echo"] = _outcome(exc)
    for client in clients:
        client.close()
    return out


# --- consumer-probe --------------------------------------------------------------------------------
def consumer_probe(cfg: dict[str, Any]) -> dict[str, Any]:
    """Config: socket, uid, gid, aid, consumer. Drops to uid/gid as uid-probe does, then reads the
    durable consumer `consumer` of `aid` from its last ack and reports the cursor of the first
    event (None if none came within 5 s)."""
    os.setgroups([])
    os.setgid(cfg["gid"])
    os.setuid(cfg["uid"])
    first = None
    with Client(cfg["socket"], app="consumer-probe", timeout=10, reconnect_attempts=0) as client:
        with client.session(cfg["aid"]).events(cfg["consumer"], start="last_ack") as events:
            event = events.get(timeout=5)
            first = None if event is None else event.cursor
    return {"first_cursor": first}


# --- policy-probe ----------------------------------------------------------------------------------
class _Watch(threading.Thread):
    """Reads one subscription's events in the background: the kinds seen, and how it ended."""

    def __init__(self, stream: Any) -> None:
        super().__init__(daemon=True)
        self.stream, self.kinds, self.ended = stream, [], None
        self.cond = threading.Condition()

    def run(self) -> None:
        while True:
            try:
                event = self.stream.get(timeout=0.5)
            except Exception as exc:  # noqa: BLE001 - reported by class
                with self.cond:
                    self.ended = _outcome(exc)
                    self.cond.notify_all()
                return
            if event is not None:
                with self.cond:
                    self.kinds.append(event.kind)
                    self.cond.notify_all()

    def wait_for(self, predicate, seconds: float) -> bool:
        with self.cond:
            return self.cond.wait_for(predicate, seconds)


def policy_probe(cfg: dict[str, Any]) -> dict[str, Any]:
    """Config: socket, work, uid, gid, groups (supplementary), steps. Drops to uid/gid/groups as
    uid-probe does, then runs the steps in order; each is a map with "op", "as" (the label its
    outcome is stored under: "ok" or the typed error's class name) and the op's arguments:

    - connect; fresh_connect (a second connection, closed again); status (result in LABEL.value)
    - ensure {aid} (result aid in LABEL.aid); open {aid} (a session, wait_ready); call {aid, method}
    - call_bg {aid, method, timeout}: the call runs in a thread; join {name: that step's label}
      stores its outcome and LABEL.seconds
    - subscribe {aid}: a thread reads the AID's message events from "now"
    - await_event {aid, seconds}: a message event arrived on that subscription; ended {aid, seconds}:
      the subscription ended (LABEL.how: "ok" for a clean end, or the error's class name, or
      "running" when it did not end in time)
    - touch {file}; wait {file} (in the work directory); report {file}: the outcomes so far, as JSON
    """
    os.setgroups(cfg.get("groups", []))
    os.setgid(cfg["gid"])
    os.setuid(cfg["uid"])
    work = Path(cfg["work"])
    out: dict[str, Any] = {"uid": os.getresuid(), "gid": os.getresgid(), "groups": sorted(os.getgroups())}
    client = Client(cfg["socket"], app="policy-probe", timeout=20, reconnect_attempts=0)
    sessions: dict[str, Any] = {}
    watches: dict[str, _Watch] = {}
    background: dict[str, tuple[threading.Thread, dict[str, Any]]] = {}

    def session(aid: str) -> Any:
        return sessions.setdefault(aid, client.session(aid))

    def call_bg(step: dict[str, Any]) -> None:
        box: dict[str, Any] = {}

        def run() -> None:
            t0 = time.monotonic()
            try:
                session(step["aid"]).call(step["method"], {}, timeout=step["timeout"])
                box["outcome"] = "ok"
            except Exception as exc:  # noqa: BLE001 - reported by class
                box["outcome"] = _outcome(exc)
            box["seconds"] = round(time.monotonic() - t0, 2)

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        background[step["as"]] = (thread, box)

    def join(step: dict[str, Any]) -> None:
        thread, box = background[step["name"]]
        thread.join(90)
        out[step["as"] + ".seconds"] = box.get("seconds")
        if box.get("outcome") != "ok":
            raise _Reported(box.get("outcome", "still running"))

    def subscribe(step: dict[str, Any]) -> None:
        stream = session(step["aid"]).events("policy-probe", (MESSAGE_KIND,), start="now").open()
        watches[step["aid"]] = watch = _Watch(stream)
        watch.start()

    def await_event(step: dict[str, Any]) -> None:
        watch = watches[step["aid"]]
        if not watch.wait_for(lambda: watch.kinds or watch.ended, step["seconds"]) or not watch.kinds:
            raise _Reported(f"no event (subscription {watch.ended or 'running'})")

    def ended(step: dict[str, Any]) -> None:
        watch = watches[step["aid"]]
        watch.wait_for(lambda: watch.ended is not None, step["seconds"])
        out[step["as"] + ".how"] = watch.ended or "running"

    def wait(step: dict[str, Any]) -> None:
        if not _wait_file(work / step["file"], 60):
            raise _Reported(f"no {step['file']} within 60 s")

    def fresh_connect(step: dict[str, Any]) -> None:
        Client(cfg["socket"], app="policy-probe-2", timeout=20, reconnect_attempts=0).connect().close()

    ops = {
        "connect": lambda st: client.connect(),
        "fresh_connect": fresh_connect,
        "status": lambda st: out.__setitem__(st["as"] + ".value", client.status()),
        "ensure": lambda st: out.__setitem__(st["as"] + ".aid", client.ensure_identity(st["aid"])["aid"]),
        "open": lambda st: session(st["aid"]).wait_ready(30),
        "call": lambda st: session(st["aid"]).call(st["method"], {}, timeout=20),
        "call_bg": call_bg, "join": join, "subscribe": subscribe, "await_event": await_event, "ended": ended,
        "touch": lambda st: (work / st["file"]).touch(),
        "wait": wait,
        "report": lambda st: _write_json(work / st["file"], out),
    }
    for step in cfg["steps"]:
        label = step.get("as", step["op"])
        try:
            ops[step["op"]]({**step, "as": label})
        except _Reported as why:
            out[label] = str(why)
        except Exception as exc:  # noqa: BLE001 - reported by class
            out[label] = _outcome(exc)
        else:
            out[label] = "ok"
    return out


class _Reported(Exception):
    """A probe step's outcome that is not an exception of the stub (e.g. "no event")."""


COMMANDS = {"mesh": mesh, "staller": staller, "consume": consume, "holder": holder, "uid-probe": uid_probe,
            "policy-probe": policy_probe, "quota-probe": quota_probe, "consumer-probe": consumer_probe}

if __name__ == "__main__":
    result = COMMANDS[sys.argv[1]](json.loads(sys.argv[2]))
    print(json.dumps(result), flush=True)
