"""Hostile input against a LIVE `aund run` (real links to a devnet process), not the fake
backend of tests/broker/test_fuzz.py, whose strategies and socket helpers are reused here.

Random bytes, truncated, oversize and ill-typed frames, unknown ops, requests before hello,
requests with arguments that reach the real backend (sessions, calls to the gateway, subscribe,
ack), floods read back and floods never read. Throughout, a well-behaved ``Client`` keeps getting
``ping`` and ``status`` answered (a background thread, every 20 ms) and a real E2EE message
round trip keeps working, and the daemon's RSS (/proc/PID/status VmRSS) stays bounded.

Params that JSON cannot carry (msgpack bin, NaN, Infinity) inside a `call`'s params map get
InvalidParams (test_call_params_that_are_not_json_get_invalid_params); the live strategies keep
params JSON-valued so that their requests reach the gateway.

Also measures (reported, not asserted) the round-trip time of ``ping`` and of ``meta.ping``
through the stub: the median of 500 sequential calls of a blocking ``Client``.
"""
from __future__ import annotations

import shutil
import socket
import statistics
import tempfile
import threading
import time
import uuid
from collections import Counter
from pathlib import Path

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from client_stub import Client, errors, wire
from tests.broker.test_fuzz import (
    HELLO, check_any_shape_before_hello, check_bad_header, check_one_answer_each, check_random_bytes,
    check_request_before_hello, check_truncated_then_hang_up, exchange, frame, request_ids, request_until_replies,
    requests, rss_kib, values,
)
from tests.helpers import DevnetProcess
from tests.system.harness import aid, start_aund

pytestmark = [pytest.mark.slow, pytest.mark.timeout(200)]

ALICE, BOB = aid("fzalice"), aid("fzbob")
WATCH = "fuzz-watch-\u2603"  # a consumer name the fuzzer will not guess
FUZZ = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                HealthCheck.function_scoped_fixture])
PRE_HELLO_MAX = 64 * 1024
MAX_FRAME = wire.DEFAULT_MAX_FRAME
STALL_TIMEOUT = 10.0  # the daemon's default Limits.stall_timeout
RSS_GROWTH_MIB = 30
TYPED_REPLIES = {name for name, cls in vars(errors).items() if isinstance(cls, type)
                 and issubclass(cls, errors.AundError)} - {"ProtocolError", "DaemonUnavailable", "AundError",
                                                             "ClientError", "ServerError"}


class Pinger(threading.Thread):
    """A well-behaved app that keeps asking `ping` and `status` while the fuzzer runs."""

    def __init__(self, path: Path) -> None:
        super().__init__(name="pinger", daemon=True)
        self.client = Client(path, app="pinger", timeout=10, reconnect_attempts=0)
        self.latencies: list[float] = []
        self.failures: list[str] = []
        self.stop = threading.Event()
        self.running = threading.Event()  # cleared: paused (while round trips are measured)
        self.running.set()

    def run(self) -> None:
        while not self.stop.is_set():
            if not self.running.wait(0.1):
                continue
            t0 = time.perf_counter()
            try:
                self.client.ping()
                self.client.status()
            except Exception as exc:  # noqa: BLE001 - any failure of a well-behaved app is a finding
                self.failures.append(repr(exc))
            self.latencies.append(time.perf_counter() - t0)
            self.stop.wait(0.02)
        self.client.close()


class Live:
    def __init__(self, daemon, good: Client) -> None:
        self.daemon, self.path, self.good = daemon, daemon.socket, good
        self.pid = daemon.proc.pid
        self.alice, self.bob = good.session(ALICE), good.session(BOB)
        self.watch = self.alice.events(WATCH, start="now").open()
        self.rss_baseline = 0
        self.pinger: Pinger | None = None
        self.answers: Counter = Counter()  # (op, "ok" or error type) of the live-backend fuzz

    def check_alive(self) -> None:
        """The daemon runs; ping, status and an E2EE message bob -> alice through it all work."""
        assert self.daemon.proc.poll() is None, "aund died"
        assert self.good.ping() > 0
        assert self.good.status()["broker"]["connections"] >= 1
        mid = "alive-" + uuid.uuid4().hex
        self.bob.call("message.send", {"to": ALICE, "message_id": mid, "payload": {"text": "alive"}}, timeout=10)
        deadline = time.monotonic() + 10
        while True:  # the fuzzer may send alice messages of its own: wait for ours
            assert time.monotonic() < deadline, "the E2EE round trip did not come back"
            ev = self.watch.get(timeout=max(0.1, deadline - time.monotonic()))
            if ev is not None and ev.data.get("message_id") == mid:
                ev.ack()
                return


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("livefuzz")
    sock_dir = Path(tempfile.mkdtemp(prefix="aund-lf-", dir="/tmp"))
    devnet = DevnetProcess(tmp / "devnet")
    devnet.start()
    daemon = pinger = None
    try:
        daemon = start_aund(tmp, devnet, [ALICE, BOB], socket=sock_dir / "aund.sock")
        with Client(daemon.socket, app="good-app", timeout=15) as good:
            for a in (ALICE, BOB):
                good.ensure_identity(a)
                good.session(a).wait_ready(30)
            server = Live(daemon, good)
            server.check_alive()
            for _ in range(20):  # warm up the paths the fuzzer takes before the RSS baseline
                exchange(server.path, HELLO + frame(wire.make_request(1, "status")))
            server.rss_baseline = rss_kib(server.pid)
            server.pinger = pinger = Pinger(daemon.socket)
            pinger.start()
            yield server
            pinger.stop.set()
            pinger.join(10)
            server.check_alive()
            server.watch.close()
            lat = sorted(pinger.latencies)
            print(f"\npinger: {len(lat)} ping+status pairs, median {statistics.median(lat) * 1e3:.2f} ms, "
                  f"max {lat[-1] * 1e3:.1f} ms, failures {len(pinger.failures)}")
            print("live-backend answers:", dict(sorted(server.answers.items())))
            assert not pinger.failures, f"the well-behaved app was not served: {pinger.failures[:5]}"
            assert lat[int(len(lat) * 0.99)] < 2.0, "ping+status p99 above 2 s during the fuzz"
    finally:
        if pinger is not None:
            pinger.stop.set()
        try:
            if daemon is not None:
                assert daemon.stop() == 0
        finally:
            assert devnet.stop() == 0
            shutil.rmtree(sock_dir, ignore_errors=True)


# --- measurements (reported) -------------------------------------------------------------------
def test_round_trip_times(live):
    """Median of 500 sequential `ping`s and of 500 `meta.ping` calls through the stub (reported;
    the background pinger pauses meanwhile)."""
    live.pinger.running.clear()
    try:
        pings, calls = _round_trips(live.path)
    finally:
        live.pinger.running.set()
    p90 = [statistics.quantiles(x, n=10)[-1] * 1e6 for x in (pings, calls)]
    print(f"\nrtt: ping median {statistics.median(pings) * 1e6:.0f} us (p90 {p90[0]:.0f}); "
          f"meta.ping median {statistics.median(calls) * 1e6:.0f} us (p90 {p90[1]:.0f})")
    assert len(pings) == len(calls) == 500


def _round_trips(path: Path) -> tuple[list[float], list[float]]:
    with Client(path, app="rtt") as client:
        session = client.session(ALICE)
        session.wait_ready(10)
        for _ in range(50):  # warm-up
            client.request("ping")
            session.call("meta.ping")
        pings, calls = [], []
        for _ in range(500):
            t0 = time.perf_counter()
            client.request("ping")
            pings.append(time.perf_counter() - t0)
        for _ in range(500):
            t0 = time.perf_counter()
            session.call("meta.ping")
            calls.append(time.perf_counter() - t0)
    return pings, calls


# --- live-backend strategies ----------------------------------------------------------------------
# Requests whose arguments reach the real backend: they run after a prelude that opened session 1
# (ALICE) and subscription 2 on the same connection, and mostly name those, so calls go to the
# gateway, acks to the inbox and unsubscribes to a live pump.
CARD = f'---\naid: "{ALICE}"\nname: "fuzz"\ntype: "agent"\nversion: "1.0.0"\n---\n\n# fuzz\n'
METHODS = ["meta.ping", "meta.status", "message.send", "message.pull", "message.v2.ack", "group.send", "x.nope"]
PRELUDE = [wire.make_request("p1", "session.open", {"aid": ALICE}),
           wire.make_request("p2", "subscribe", {"aid": ALICE, "consumer": "fuzz-live", "start": "now"})]
SESSION, SUB = 1, 2  # the ids the prelude gets (the connection's first two)


def _or_fuzz(strategy):
    """Mostly `strategy` (7 in 8), sometimes any value at all."""
    return st.integers(0, 7).flatmap(lambda k: values if k == 0 else strategy)


# Gateway params must be JSON (non-JSON values get InvalidParams: a test of its own below), so the
# fuzzer's params maps hold JSON values only, to reach the gateway; anything else is still fuzzed.
json_values = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-(2**53), 2**53), st.floats(allow_nan=False, allow_infinity=False),
              st.text(max_size=20)),
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)),
    max_leaves=10)
not_maps = values.filter(lambda v: not isinstance(v, dict))
aids = st.one_of(st.sampled_from([ALICE, BOB, ALICE.upper(), " " + BOB]), st.text(max_size=20))
sessions = _or_fuzz(st.sampled_from([SESSION] * 5 + [SESSION + 5]))
subs = _or_fuzz(st.sampled_from([SUB] * 3 + [SUB + 5]))
params = st.one_of(st.just({"to": BOB, "payload": {"text": "fuzz"}}), st.just({"to": ALICE, "payload": "x"}),
                   st.dictionaries(st.text(max_size=8), json_values, max_size=4))
LIVE_ARGS = {
    "session.open": st.fixed_dictionaries({"aid": aids}, optional={"slot_id": st.sampled_from(["main", "", "fz/1"])}),
    "session.close": st.fixed_dictionaries({"session": sessions}),
    "session.wait_ready": st.fixed_dictionaries({"session": sessions, "timeout": st.floats(0.01, 1.0)}),
    "call": st.fixed_dictionaries({"session": sessions, "method": _or_fuzz(st.sampled_from(METHODS)),
                                   "timeout": st.floats(0.05, 2.0)},
                                  optional={"params": st.one_of(*[params] * 7, not_maps),
                                            "background": _or_fuzz(st.booleans())}),
    "set_protected_headers": st.fixed_dictionaries({"session": sessions, "headers": _or_fuzz(
        st.dictionaries(st.text(max_size=8), st.text(max_size=8), max_size=3))}),
    "invalidate_prekey_cache": st.fixed_dictionaries({"session": sessions, "peer_aid": _or_fuzz(aids)}),
    "subscribe": st.fixed_dictionaries({"aid": aids, "consumer": _or_fuzz(st.text(min_size=1, max_size=12))},
                                       optional={"kinds": _or_fuzz(st.lists(st.sampled_from(
                                           ["message.received", "state_change", "x"]), max_size=3)),
                                           "start": _or_fuzz(st.sampled_from(["now", "last_ack", 0, 10**6]))}),
    "unsubscribe": st.fixed_dictionaries({"sub": subs}),
    "ack": st.one_of(st.fixed_dictionaries({"sub": subs, "cursor": _or_fuzz(st.integers(0, 10**6))}),
                     st.fixed_dictionaries({"aid": aids, "consumer": st.text(min_size=1, max_size=12),
                                            "cursor": _or_fuzz(st.integers(0, 10**6))})),
    "identity.list": st.just({}),
    "agent_md.get": st.fixed_dictionaries({"aid": aids}),
    "agent_md.set": st.fixed_dictionaries({"aid": aids, "content": _or_fuzz(st.one_of(
        st.sampled_from([CARD, CARD.replace('"1.0.0"', "1"), CARD.replace(ALICE, BOB), CARD + "x" * 5000]),
        st.text(max_size=60)))}),
    "ping": st.just({}),
    "status": st.just({}),
}


@st.composite
def live_requests(draw) -> dict:
    op = draw(st.sampled_from(sorted(LIVE_ARGS)))
    return {"kind": "req", "id": draw(request_ids), "op": op, "args": draw(LIVE_ARGS[op])}


def converse(path: Path, reqs: list[dict], timeout: float = 20.0) -> list[dict]:
    """hello, the PRELUDE (each answered before the next), then every request of `reqs` at once;
    returns one rep/err per request of `reqs` (events are skipped). The connection must stay."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    s.connect(str(path))
    decoder = wire.FrameDecoder(wire.HARD_MAX_FRAME)

    def answers(n: int) -> list[dict]:
        out: list[dict] = []
        deadline = time.monotonic() + timeout
        while len(out) < n:
            assert time.monotonic() < deadline, f"only {len(out)} of {n} answers in time"
            chunk = s.recv(65536)
            assert chunk, f"the daemon hung up after {len(out)} of {n} answers"
            decoder.feed(chunk)
            while (f := decoder.next_frame()) is not None:
                if not isinstance(wire.validate_reply(f), wire.Event):
                    out.append(f)
        return out

    try:
        s.sendall(HELLO)
        answers(1)
        for req in PRELUDE:
            s.sendall(frame(req))
            assert answers(1)[0]["kind"] == "rep"
        s.sendall(b"".join(frame(r) for r in reqs))
        return answers(len(reqs))
    finally:
        s.close()


# --- tests -------------------------------------------------------------------------------------
@FUZZ
@given(data=st.binary(max_size=2048))
def test_random_bytes(live, data):
    check_random_bytes(live, data)


@FUZZ
@given(body=values)
def test_frames_of_any_shape_before_hello(live, body):
    check_any_shape_before_hello(live, body)


@FUZZ
@given(req=st.one_of(requests(), live_requests()))
def test_request_before_hello_is_refused(live, req):
    assume(req["op"] != "hello")
    check_request_before_hello(live, req)


@FUZZ
@given(reqs=st.lists(requests(), min_size=1, max_size=12))
def test_any_request_gets_exactly_one_typed_answer_and_the_connection_stays(live, reqs):
    check_one_answer_each(live, reqs, TYPED_REPLIES)


@settings(FUZZ, max_examples=40)
@given(reqs=st.lists(live_requests(), min_size=1, max_size=12, unique_by=lambda r: repr(r["id"])))
def test_requests_reaching_the_live_backend_get_typed_answers(live, reqs):
    replies = converse(live.path, reqs)
    assert sorted(repr(r["id"]) for r in replies) == sorted(repr(r["id"]) for r in reqs)
    ops = {repr(r["id"]): r["op"] for r in reqs}
    for reply in replies:
        if reply["kind"] == "err":
            assert reply["error"]["type"] in TYPED_REPLIES, reply["error"]
        live.answers[(ops[repr(reply["id"])], "ok" if reply["kind"] == "rep" else reply["error"]["type"])] += 1
    live.check_alive()


@FUZZ
@given(req=st.one_of(requests(), live_requests()), cut=st.floats(0.0, 0.99))
def test_truncated_frame_then_hang_up(live, req, cut):
    check_truncated_then_hang_up(live, req, cut)


@settings(FUZZ, max_examples=15)
@given(after_hello=st.booleans(), data=st.data())
def test_oversize_or_empty_header(live, after_hello, data):
    limit = MAX_FRAME if after_hello else PRE_HELLO_MAX
    check_bad_header(live, data.draw(st.one_of(st.integers(limit + 1, 2**32 - 1), st.just(0))), after_hello)


def test_call_params_that_are_not_json_get_invalid_params(live):
    outcomes = {}
    with Client(live.path, app="not-json", reconnect_attempts=0) as client:
        session = client.session(ALICE)
        for name, method, params in (("bin", "meta.ping", {"x": b"\x00"}), ("nan", "meta.ping", {"x": float("nan")}),
                                     ("inf", "meta.ping", {"x": float("inf")}),
                                     ("plain send", "message.send", {"to": BOB, "encrypt": False,
                                                                     "payload": {"text": "x"}, "x": b"1"})):
            try:
                session.call(method, params, timeout=5)
                outcomes[name] = "ok"
            except errors.AundError as exc:
                outcomes[name] = type(exc).__name__
    live.check_alive()
    assert outcomes == dict.fromkeys(outcomes, "InvalidParams"), outcomes


def test_floods(live):
    """5,000 pings read back; meanwhile an app that floods `status` and never reads is cut off
    (its outbox stays full for stall_timeout), and hostile connections keep coming."""
    result: dict = {}

    def flood_without_reading() -> None:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(STALL_TIMEOUT + 15)
        s.connect(str(live.path))
        t0 = time.monotonic()
        try:
            s.sendall(HELLO)
            status = frame(wire.make_request(1, "status"))
            for _ in range(2000):
                s.sendall(status * 100)
            result["error"] = "never cut off"
        except (BrokenPipeError, ConnectionResetError) as exc:
            result["cut_after_s"] = time.monotonic() - t0
            result["error"] = type(exc).__name__
        except OSError as exc:
            result["error"] = repr(exc)
        finally:
            s.close()

    stalls_before = live.good.status()["broker"]["stalled_disconnects"]
    flooder = threading.Thread(target=flood_without_reading, daemon=True)
    flooder.start()
    t0 = time.monotonic()
    replies = request_until_replies(live.path, [wire.make_request(i, "ping") for i in range(5000)])
    assert [r["id"] for r in replies] == list(range(5000)) and all(r["kind"] == "rep" for r in replies)
    flood_s = time.monotonic() - t0
    while flooder.is_alive():  # the mix goes on while the flooder is stuck
        exchange(live.path, bytes(range(256)))
        exchange(live.path, HELLO + wire.HEADER.pack(2**31))
        live.check_alive()
    flooder.join()
    assert "cut_after_s" in result, result
    assert live.good.status()["broker"]["stalled_disconnects"] == stalls_before + 1
    print(f"\nfloods: 5000 pings read back in {flood_s:.2f} s; the non-reader was cut off after "
          f"{result['cut_after_s']:.1f} s ({result['error']})")


def test_rss_stays_bounded(live):
    """The hostile mix once more in one go; the daemon's RSS against the baseline of the module."""
    live.check_alive()
    for n in range(60):
        exchange(live.path, bytes((n * 37 + i) % 256 for i in range(300)))
        exchange(live.path, HELLO + wire.HEADER.pack(2**31))
        exchange(live.path, HELLO + frame(wire.make_request(n, "call", {"session": 1, "method": "x"})))
        exchange(live.path, HELLO + frame(wire.make_request(n, "session.open", {"aid": ALICE})) +
                 frame(wire.make_request(n + 1, "subscribe", {"aid": ALICE, "consumer": f"rss{n}"})))
    request_until_replies(live.path, [wire.make_request(i, "status") for i in range(2000)])
    live.check_alive()
    growth_mib = (rss_kib(live.pid) - live.rss_baseline) / 1024
    print(f"\nrss: baseline {live.rss_baseline / 1024:.1f} MiB, growth {growth_mib:.1f} MiB")
    assert growth_mib < RSS_GROWTH_MIB, f"the daemon grew by {growth_mib:.1f} MiB"
