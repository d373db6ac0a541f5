"""Hostile input against a live broker in its own process (``python -m tests.broker.serve_fake``):
random bytes, truncated, oversize and ill-typed frames, unknown ops, requests before hello, and
floods. Throughout, another app stays connected and keeps being served, and the server's RSS
stays bounded.

Plain blocking sockets with timeouts (every read has a deadline); hypothesis drives the input.
"""
from __future__ import annotations

import json
import selectors
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from client_stub import Client, wire
from tests.helpers import ROOT, read_line

ALICE = "alice.aid.test"
MAX_FRAME = 64 * 1024
LIMITS = {"max_frame": MAX_FRAME, "outbox_bytes_per_app": 64 * 1024, "stall_timeout": 0.5}
IO_TIMEOUT = 5.0
FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow],
                derandomize=False)


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


class LiveServer:
    def __init__(self, proc: subprocess.Popen, path: Path, good: Client) -> None:
        self.proc, self.path, self.good = proc, path, good
        self.good_session = good.session(ALICE)
        self.events = good.session(ALICE).events("fuzz-watch", start="now").open()
        self.published = 0

    def check_alive(self) -> None:
        """The server process runs and the well-behaved app is served (call + event)."""
        assert self.proc.poll() is None, "the broker process died"
        assert self.good.ping() > 0
        self.good_session.call("publish", {"count": 1, "kind": "message.received"})
        self.published += 1
        event = self.events.get(timeout=IO_TIMEOUT)
        assert event is not None and event.cursor == self.published


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    sock_dir = Path(tempfile.mkdtemp(prefix="aund-fz-", dir="/tmp"))
    path = sock_dir / "aund.sock"
    stderr = open(tmp_path_factory.mktemp("fuzz") / "serve_fake.stderr", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "tests.broker.serve_fake", str(path), "--limits",
                             json.dumps(LIMITS)], stdout=subprocess.PIPE, stderr=stderr, text=True, cwd=ROOT)
    try:
        ready = json.loads(read_line(proc, time.monotonic() + 20))
        assert ready["ready"] is True
        with Client(path, app="good-app", timeout=IO_TIMEOUT) as good:
            server = LiveServer(proc, path, good)
            server.check_alive()
            yield server
            server.check_alive()
            server.events.close()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0
    finally:
        proc.kill()
        proc.wait()
        proc.stdout.close()
        stderr.close()
        shutil.rmtree(sock_dir, ignore_errors=True)


def connect(path: Path) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(IO_TIMEOUT)
    s.connect(str(path))
    return s


def frame(obj: Any) -> bytes:
    body = msgpack.packb(obj, use_bin_type=True)
    return wire.HEADER.pack(len(body)) + body


HELLO = frame(wire.make_hello(0, "fuzzer"))


def exchange(path: Path, data: bytes, *, half_close: bool = True) -> tuple[list[dict], bool]:
    """Send ``data``, then (optionally) half-close and read until the daemon hangs up.

    Returns the decoded frames and whether the connection was closed by the daemon. Every frame
    the daemon sends must be a valid aund->app frame.
    """
    s = connect(path)
    decoder = wire.FrameDecoder(wire.HARD_MAX_FRAME)
    frames: list[dict] = []
    try:
        try:
            s.sendall(data)
            if half_close:
                s.shutdown(socket.SHUT_WR)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the daemon already hung up (e.g. an oversize header)
        deadline = time.monotonic() + IO_TIMEOUT
        while time.monotonic() < deadline:
            try:
                chunk = s.recv(65536)
            except ConnectionResetError:
                chunk = b""
            if not chunk:
                return frames, True
            decoder.feed(chunk)
            while (f := decoder.next_frame()) is not None:
                wire.validate_reply(f)
                frames.append(f)
        raise AssertionError("the daemon neither answered nor hung up in time")
    finally:
        s.close()


def request_until_replies(path: Path, requests: list[dict]) -> list[dict]:
    """After hello, send ``requests`` while reading one rep/err per request (as a real client with a
    reader does); the connection must stay open throughout."""
    s = connect(path)
    s.setblocking(False)
    decoder = wire.FrameDecoder(wire.HARD_MAX_FRAME)
    out = memoryview(HELLO + b"".join(frame(r) for r in requests))
    replies: list[dict] = []
    deadline = time.monotonic() + IO_TIMEOUT * 2
    try:
        with selectors.DefaultSelector() as sel:
            sel.register(s, selectors.EVENT_READ | selectors.EVENT_WRITE)
            while len(replies) < len(requests) + 1:
                assert time.monotonic() < deadline, f"only {len(replies)} replies in time"
                for _, mask in sel.select(timeout=0.5):
                    if mask & selectors.EVENT_WRITE and out:
                        out = out[s.send(out[:65536]):]
                        if not out:
                            sel.modify(s, selectors.EVENT_READ)
                    if mask & selectors.EVENT_READ:
                        chunk = s.recv(65536)
                        assert chunk, f"the daemon hung up after {len(replies)} replies"
                        decoder.feed(chunk)
                        while (f := decoder.next_frame()) is not None:
                            if not isinstance(wire.validate_reply(f), wire.Event):
                                replies.append(f)
        return replies[1:]
    finally:
        s.close()


# --- strategies --------------------------------------------------------------------------------
leaf = st.one_of(st.none(), st.booleans(), st.integers(-(2**63), 2**64 - 1), st.floats(allow_nan=False),
                 st.text(max_size=40), st.binary(max_size=40))
values = st.recursive(leaf, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                    st.dictionaries(st.text(max_size=10), inner, max_size=4)),
                      max_leaves=12)
KNOWN_OPS = ["ping", "status", "identity.ensure", "identity.list", "session.open", "session.close",
             "session.wait_ready", "call", "set_protected_headers", "invalidate_prekey_cache", "subscribe",
             "unsubscribe", "ack", "hello", "agent_md.get", "agent_md.set"]
ARG_NAMES = ["aid", "slot_id", "session", "method", "params", "timeout", "background", "headers", "peer_aid",
             "consumer", "kinds", "start", "sub", "cursor", "protocol", "min_protocol", "app", "content"]
args_strategy = st.dictionaries(st.sampled_from(ARG_NAMES), values, max_size=6)
op_strategy = st.one_of(st.sampled_from(KNOWN_OPS), st.text(min_size=1, max_size=30))
request_ids = st.one_of(st.integers(0, 2**31), st.text(min_size=1, max_size=20))


def safe(args: dict) -> dict:
    # "hold" waits for a gate that never opens here and a timeout-less wait_ready would wait:
    # neither ever answers on its own, which is the one thing this test needs.
    if args.get("method") == "hold":
        args["method"] = "echo"
    if isinstance(args.get("timeout"), (int, float)) and not isinstance(args.get("timeout"), bool):
        args["timeout"] = min(abs(args["timeout"]), 0.2) or 0.1
    return args


@st.composite
def requests(draw) -> dict:
    return {"kind": "req", "id": draw(request_ids), "op": draw(op_strategy), "args": safe(draw(args_strategy))}


# --- checks (shared with tests/system/test_daemon_fuzz.py, which runs them against a live daemon) ---
BROKER_TYPED = ("InvalidParams", "UnknownOp", "ResourceNotExistError", "PermissionDenied", "NotReady",
                "LimitsExceeded")


def check_random_bytes(live, data: bytes) -> None:
    frames, closed = exchange(live.path, data)
    assert closed
    assert all(f["kind"] == "err" and f["id"] is None for f in frames)
    live.check_alive()


def check_any_shape_before_hello(live, body) -> None:
    frames, closed = exchange(live.path, frame(body))
    assert closed
    if not (isinstance(body, dict) and body.get("op") == "hello"):
        assert len(frames) == 1 and frames[0]["error"]["type"] == "ProtocolError" and frames[0]["id"] is None
    live.check_alive()


def check_request_before_hello(live, req: dict) -> None:
    frames, closed = exchange(live.path, frame(req))
    assert closed and len(frames) == 1
    assert frames[0]["id"] is None and frames[0]["error"]["type"] == "ProtocolError"
    live.check_alive()


def check_one_answer_each(live, reqs: list[dict], typed) -> None:
    """Every request gets exactly one answer, errors only of the `typed` classes; the connection stays."""
    ids = [r["id"] for r in reqs]
    replies = request_until_replies(live.path, reqs)
    assert sorted(map(repr, (r["id"] for r in replies))) == sorted(map(repr, ids))
    for reply in replies:
        if reply["kind"] == "err":
            assert reply["error"]["type"] in typed, reply["error"]
    live.check_alive()


def check_truncated_then_hang_up(live, req: dict, cut: float) -> None:
    data = frame(req)
    frames, closed = exchange(live.path, HELLO + data[: int(len(data) * cut)])
    assert closed and frames[0]["kind"] == "rep"  # the hello answer, then nothing for the fragment
    assert all(f["kind"] != "rep" or f["id"] == 0 for f in frames)
    live.check_alive()


def check_bad_header(live, length: int, after_hello: bool) -> None:
    frames, closed = exchange(live.path, (HELLO if after_hello else b"") + wire.HEADER.pack(length) + b"\x81",
                              half_close=False)
    assert closed
    assert frames[-1]["kind"] == "err" and frames[-1]["id"] is None
    assert frames[-1]["error"]["type"] == "ProtocolError"
    live.check_alive()


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
@given(req=requests())
def test_request_before_hello_is_refused(live, req):
    assume(req["op"] != "hello")
    check_request_before_hello(live, req)


@FUZZ
@given(reqs=st.lists(requests(), min_size=1, max_size=12))
def test_any_request_gets_exactly_one_answer_and_the_connection_stays(live, reqs):
    check_one_answer_each(live, reqs, BROKER_TYPED)


@FUZZ
@given(req=requests(), cut=st.floats(0.0, 0.99))
def test_truncated_frame_then_hang_up(live, req, cut):
    check_truncated_then_hang_up(live, req, cut)


@FUZZ
@given(length=st.one_of(st.integers(MAX_FRAME + 1, 2**32 - 1), st.just(0)), after_hello=st.booleans())
def test_oversize_or_empty_header(live, length, after_hello):
    check_bad_header(live, length, after_hello)


@FUZZ
@given(bad=st.one_of(
    st.lists(values, max_size=3).map(lambda v: msgpack.packb(v)),                         # not a map
    st.integers().filter(lambda i: -(2**63) <= i < 2**64).map(lambda i: msgpack.packb(i)),
    st.just(msgpack.packb({1: "int key"})),
    st.just(msgpack.packb({"kind": "req", "id": 1}) + b"\xc0"),                          # trailing bytes
    st.builds(lambda k: msgpack.packb({"kind": k, "id": 1, "op": "ping", "args": {}}),
              st.text(max_size=5).filter(lambda k: k != "req")),                          # bad/unexpected kind
    st.just(msgpack.packb({"kind": "req", "id": 1.5, "op": "ping", "args": {}})),
    st.just(msgpack.packb({"kind": "req", "id": 1, "op": "ping", "args": []})),
    st.just(b"\xc1"),                                                                     # never-used byte
))
def test_ill_typed_frames_after_hello_close_the_connection(live, bad):
    frames, closed = exchange(live.path, HELLO + wire.HEADER.pack(len(bad)) + bad)
    assert closed
    assert [f["kind"] for f in frames] == ["rep", "err"]  # the hello answer, then the violation
    assert frames[1]["id"] is None and frames[1]["error"]["type"] == "ProtocolError"
    live.check_alive()


def test_flood_of_requests_read_back(live):
    n = 5000
    replies = request_until_replies(live.path, [wire.make_request(i, "ping") for i in range(n)])
    assert [r["id"] for r in replies] == list(range(n)) and all(r["kind"] == "rep" for r in replies)


def test_flood_without_reading_is_cut_off(live):
    s = connect(live.path)
    try:
        s.sendall(HELLO)
        status = frame(wire.make_request(1, "status"))
        with pytest.raises((BrokenPipeError, ConnectionResetError)):
            for _ in range(400):  # replies pile up unread: the daemon stops reading, then hangs up
                s.sendall(status * 200)
    finally:
        s.close()
    live.check_alive()


def test_server_keeps_serving_and_rss_stays_bounded(live):
    """Runs the hostile mix again in one go and compares the daemon's RSS before and after."""
    live.check_alive()
    before = rss_kib(live.proc.pid)
    for _ in range(3):
        for n in range(40):
            exchange(live.path, bytes((n * 37 + i) % 256 for i in range(300)))
            exchange(live.path, HELLO + wire.HEADER.pack(2**31))
            exchange(live.path, HELLO + frame(wire.make_request(n, "call", {"session": 1, "method": "x"})))
        request_until_replies(live.path, [wire.make_request(i, "status") for i in range(2000)])
        test_flood_without_reading_is_cut_off(live)
        live.check_alive()
    growth_mib = (rss_kib(live.proc.pid) - before) / 1024
    assert growth_mib < 24, f"the daemon grew by {growth_mib:.1f} MiB"
