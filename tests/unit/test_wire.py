"""Unit tests of client_stub.wire: framing limits, shapes, handshake, and a decoder fuzzer."""

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from client_stub import errors, wire
from client_stub.wire import (
    DEFAULT_MAX_FRAME,
    HARD_MAX_FRAME,
    HEADER,
    ErrorReply,
    Event,
    FrameDecoder,
    Reply,
    Request,
    encode_frame,
    validate_reply,
    validate_request,
)


def raw_frame(body: bytes) -> bytes:
    return HEADER.pack(len(body)) + body


def decode_all(data: bytes, max_frame: int = DEFAULT_MAX_FRAME) -> list[dict]:
    dec = FrameDecoder(max_frame)
    dec.feed(data)
    frames = []
    while (f := dec.next_frame()) is not None:
        frames.append(f)
    return frames


def padded(size: int) -> dict:
    """A frame map whose msgpack encoding is exactly ``size`` bytes (size >= 40)."""
    base = len(msgpack.packb({"kind": "rep", "id": 1, "result": b""}))
    # bin 32 header is 5 bytes; bin8 2, bin16 3: pick the payload so the total is exact.
    for hdr, lo, hi in ((2, 0, 255), (3, 256, 65535), (5, 65536, 1 << 32)):
        n = size - base - hdr + 2
        if lo <= n <= hi:
            frame = {"kind": "rep", "id": 1, "result": b"x" * n}
            assert len(msgpack.packb(frame)) == size
            return frame
    raise AssertionError(size)


def test_constants():
    assert wire.PROTOCOL_VERSION == 1 and wire.MIN_PROTOCOL_VERSION <= wire.PROTOCOL_VERSION
    assert DEFAULT_MAX_FRAME == 1 << 20 and HARD_MAX_FRAME == 16 << 20
    assert HEADER.size == 4 and HEADER.pack(1) == b"\x00\x00\x00\x01"


def test_wire_imports_no_io_library():
    import ast
    import pathlib

    tree = ast.parse(pathlib.Path(wire.__file__).read_text())
    names = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    names |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert names <= {"__future__", "struct", "dataclasses", "typing", "msgpack",
                     "client_stub.errors"}


@pytest.mark.parametrize("frame", [
    wire.make_request(1, "message.send", {"to": "bob.aid.test", "body": b"\x00hi"}),
    wire.make_request("a-1", "hello"),
    wire.make_reply(2**63, {"nested": [1, 2.5, None, True, {"k": "v"}]}),
    wire.make_error(None, errors.ProtocolError("bad")),
    wire.make_error(5, errors.GatewayError("x", remote_code=-32000)),
    wire.make_event("sub-1", {"seq": 9, "payload": "é"}),
])
def test_round_trip(frame):
    data = encode_frame(frame)
    assert HEADER.unpack_from(data)[0] == len(data) - 4
    assert decode_all(data) == [frame]


def test_typed_round_trip_through_validation():
    req = Request(7, "aid.list", {"verbose": True})
    assert validate_request(decode_all(encode_frame(req.to_wire()))[0]) == req
    for obj in (Reply(7, [1, 2]), ErrorReply(None, errors.error_to_wire(errors.NotReady("w"))),
                Event(3, {"a": 1})):
        assert validate_reply(decode_all(encode_frame(obj.to_wire()))[0]) == obj
    err = validate_reply(wire.make_error(1, errors.RpcTimeout("slow")))
    assert isinstance(err, ErrorReply) and isinstance(err.exception(), errors.RpcTimeout)


def test_many_frames_in_one_chunk_and_byte_at_a_time():
    frames = [wire.make_request(i, "op", {"i": i}) for i in range(50)]
    data = b"".join(encode_frame(f) for f in frames)
    assert decode_all(data) == frames
    dec, out = FrameDecoder(), []
    for i in range(len(data)):
        dec.feed(data[i : i + 1])
        while (f := dec.next_frame()) is not None:
            out.append(f)
    assert out == frames and dec.buffered == 0


def test_partial_frame_returns_none_until_complete():
    data = encode_frame(wire.make_reply(1, "x" * 100))
    dec = FrameDecoder()
    dec.feed(data[:3])
    assert dec.next_frame() is None
    dec.feed(data[3:-1])
    assert dec.next_frame() is None and dec.buffered == len(data) - 1
    dec.feed(data[-1:])
    assert dec.next_frame() == wire.make_reply(1, "x" * 100)
    assert dec.next_frame() is None


@pytest.mark.parametrize("limit", [64, 1000, DEFAULT_MAX_FRAME])
def test_encode_limit_at_and_one_past(limit):
    assert len(encode_frame(padded(limit), max_frame=limit)) == limit + 4
    with pytest.raises(errors.ProtocolError, match="exceeds") as info:
        encode_frame(padded(limit + 1), max_frame=limit)
    assert info.value.data == {"length": limit + 1, "max_frame": limit}


@pytest.mark.parametrize("limit", [64, 1000, DEFAULT_MAX_FRAME])
def test_decode_limit_at_and_one_past(limit):
    at = raw_frame(msgpack.packb(padded(limit)))
    assert decode_all(at, max_frame=limit) == [padded(limit)]
    with pytest.raises(errors.ProtocolError, match="exceeds"):
        decode_all(raw_frame(msgpack.packb(padded(limit + 1))), max_frame=limit)


def test_oversize_detected_from_header_alone():
    dec = FrameDecoder(1000)
    dec.feed(HEADER.pack(1000)[:2])
    dec.feed(HEADER.pack(1000)[2:])
    assert dec.next_frame() is None  # exactly at the limit: waits for the body
    dec = FrameDecoder(1000)
    with pytest.raises(errors.ProtocolError, match="1001 exceeds") as info:
        dec.feed(HEADER.pack(1001))  # no body byte was ever sent
    assert info.value.data == {"length": 1001, "max_frame": 1000}
    assert dec.buffered == 0
    with pytest.raises(errors.ProtocolError):  # broken for good
        dec.feed(b"\x80")
    with pytest.raises(errors.ProtocolError):
        dec.next_frame()


def test_oversize_second_header_detected_before_its_body():
    dec = FrameDecoder(100)
    dec.feed(encode_frame({"kind": "evt"}) + HEADER.pack(2**32 - 1))
    assert dec.next_frame() == {"kind": "evt"}
    with pytest.raises(errors.ProtocolError, match="exceeds"):
        dec.next_frame()


def test_hard_max_and_bad_max_frame():
    FrameDecoder(HARD_MAX_FRAME)
    with pytest.raises(ValueError):
        FrameDecoder(HARD_MAX_FRAME + 1)
    with pytest.raises(ValueError):
        encode_frame({}, max_frame=0)
    dec = FrameDecoder(100)
    dec.max_frame = 200
    assert dec.max_frame == 200
    with pytest.raises(TypeError):
        dec.max_frame = True


def test_buffer_never_exceeds_one_frame_when_drained():
    big = encode_frame(padded(5000), max_frame=5000)
    dec, peak = FrameDecoder(5000), 0
    for i in range(0, len(big) * 3, 1000):
        dec.feed((big * 3)[i : i + 1000])
        while dec.next_frame() is not None:
            pass
        peak = max(peak, dec.buffered)
    assert peak <= 5000 + 4 and dec.buffered == 0


@pytest.mark.parametrize(("body", "why"), [
    (b"", "empty"),
    (b"\x93\x01\x02\x03", "must be a map"),               # array
    (b"\xa3abc", "must be a map"),                        # str
    (b"\x80\x80", "not valid msgpack"),                   # two maps (trailing data)
    (b"\x81\xa1a", "not valid msgpack"),                  # truncated map
    (b"\xc1", "not valid msgpack"),                       # reserved byte
    (b"\x81\x01\x02", "not valid msgpack"),               # int key
    (b"\x81\xc4\x01k\x01", "non-string key"),             # bin key
    (b"\x81\xa1\xff\x01", "not valid msgpack"),           # invalid utf-8
    (msgpack.packb({"t": msgpack.Timestamp(1, 0)}), "not valid msgpack"),
    (msgpack.packb({"e": msgpack.ExtType(3, b"x")}), "not valid msgpack"),
    (b"\x81\xa1a" + b"\x91" * 5000 + b"\xc0", "not valid msgpack"),  # too deep
])
def test_bad_bodies(body, why):
    with pytest.raises(errors.ProtocolError, match=why):
        decode_all(raw_frame(body))


def test_encode_rejects_non_maps_and_unencodable():
    for bad in ([1], "x", None):
        with pytest.raises(errors.ProtocolError, match="must be a dict"):
            encode_frame(bad)  # type: ignore[arg-type]
    with pytest.raises(errors.ProtocolError, match="non-string key"):
        encode_frame({1: 2})
    with pytest.raises(errors.ProtocolError, match="cannot be encoded"):
        encode_frame({"kind": "rep", "result": {1, 2}})
    with pytest.raises(errors.ProtocolError, match="cannot be encoded"):
        encode_frame({"kind": "rep", "result": 2**64})


@pytest.mark.parametrize(("frame", "field"), [
    ({"kind": "zap"}, "'kind'"),
    ({"id": 1}, "'kind'"),
    ({"kind": "req", "op": "x", "args": {}}, "'id'"),
    ({"kind": "req", "id": 1, "args": {}}, "'op'"),
    ({"kind": "req", "id": 1, "op": "x"}, "'args'"),
    ({"kind": "req", "id": True, "op": "x", "args": {}}, "'id'"),
    ({"kind": "req", "id": 1.5, "op": "x", "args": {}}, "'id'"),
    ({"kind": "req", "id": "i" * 257, "op": "x", "args": {}}, "'id'"),
    ({"kind": "req", "id": 1, "op": "", "args": {}}, "'op'"),
    ({"kind": "req", "id": 1, "op": 3, "args": {}}, "'op'"),
    ({"kind": "req", "id": 1, "op": "x", "args": [1]}, "'args'"),
    ({"kind": "req", "id": 1, "op": "x", "args": {b"k": 1}}, "'args'"),
    ({"kind": "rep", "id": 1, "result": 1}, "unexpected frame kind"),
    ({"kind": "evt", "sub": 1, "event": {}}, "unexpected frame kind"),
])
def test_validate_request_names_the_field(frame, field):
    with pytest.raises(errors.ProtocolError, match=field):
        validate_request(frame)


@pytest.mark.parametrize(("frame", "field"), [
    ([], "must be a map"),
    ({"kind": "req", "id": 1, "op": "x", "args": {}}, "unexpected frame kind"),
    ({"kind": "rep", "result": 1}, "'id'"),
    ({"kind": "rep", "id": None, "result": 1}, "'id'"),
    ({"kind": "rep", "id": 1}, "'result'"),
    ({"kind": "err", "id": 1}, "'error'"),
    ({"kind": "err", "id": 1, "error": "boom"}, "'error'"),
    ({"kind": "evt", "event": {}}, "'sub'"),
    ({"kind": "evt", "sub": 1, "event": 5}, "'event'"),
])
def test_validate_reply_names_the_field(frame, field):
    with pytest.raises(errors.ProtocolError, match=field):
        validate_reply(frame)


def test_validate_ignores_unknown_extra_fields():
    req = validate_request({"kind": "req", "id": "a", "op": "x", "args": {}, "trace": 1})
    assert req == Request("a", "x", {})


def test_error_reply_with_garbage_error_gives_protocol_error():
    reply = validate_reply({"kind": "err", "id": None, "error": {"type": 5}})
    assert isinstance(reply.exception(), errors.ProtocolError)


def test_helpers_validate_their_input():
    with pytest.raises(errors.ProtocolError, match="'id'"):
        wire.make_reply(None, 1)  # type: ignore[arg-type]
    with pytest.raises(errors.ProtocolError, match="'event'"):
        wire.make_event(1, [])  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        wire.make_error(1, RuntimeError("bug"))  # type: ignore[arg-type]
    assert wire.make_request(1, "x") == {"kind": "req", "id": 1, "op": "x", "args": {}}


@pytest.mark.parametrize(("c", "s", "expected"), [
    ((1, 1), (1, 1), 1), ((1, 3), (2, 5), 3), ((2, 5), (1, 3), 3), ((1, 9), (4, 4), 4),
    ((3, 3), (1, 3), 3),
])
def test_negotiate_protocol(c, s, expected):
    assert wire.negotiate_protocol(*c, *s) == expected


@pytest.mark.parametrize(("c", "s"), [
    ((1, 1), (2, 2)), ((4, 5), (1, 3)), ((3, 1), (1, 3)), ((1, 3), (3, 1)), ((1, "2"), (1, 2)),
    ((True, 1), (1, 1)),
])
def test_negotiate_protocol_no_overlap(c, s):
    with pytest.raises(errors.ProtocolError):
        wire.negotiate_protocol(*c, *s)


def test_hello_round_trip_and_validation():
    req = validate_request(wire.make_hello(0, "demo-app"))
    assert req.op == wire.HELLO_OP
    hello = wire.validate_hello(req.args)
    assert hello == wire.Hello(wire.PROTOCOL_VERSION, wire.MIN_PROTOCOL_VERSION, "demo-app")
    assert wire.negotiate_protocol(hello.min_protocol, hello.protocol, 1, 1) == 1
    for bad, field in [([], "map"), ({"protocol": 1, "min_protocol": 1}, "'app'"),
                       ({"protocol": "1", "min_protocol": 1, "app": "a"}, "'protocol'"),
                       ({"protocol": 1, "min_protocol": None, "app": "a"}, "'min_protocol'"),
                       ({"protocol": 1, "min_protocol": 1, "app": "a" * 129}, "'app'")]:
        with pytest.raises(errors.ProtocolError, match=field):
            wire.validate_hello(bad)


# ---- fuzzing the decoder as a pure function (ssh-agent's agent_fuzz_helper, in hypothesis) ----

def _fuzz_decode(data: bytes, cuts: list[int], max_frame: int = 512) -> list[dict]:
    """Feed ``data`` split at ``cuts``; return frames or raise ProtocolError, nothing else."""
    dec, out = FrameDecoder(max_frame), []
    bounds = [0, *sorted(c % (len(data) + 1) for c in cuts), len(data)]
    try:
        for a, b in zip(bounds, bounds[1:]):
            dec.feed(data[a:b])
            while (f := dec.next_frame()) is not None:
                assert isinstance(f, dict) and all(isinstance(k, str) for k in f)
                out.append(f)
                assert dec.buffered <= max_frame + 4 + (b - a)
    except errors.ProtocolError:
        pass
    return out


@settings(max_examples=400, deadline=None, database=None)
@given(st.binary(max_size=600), st.lists(st.integers(0, 600), max_size=4))
def test_fuzz_random_bytes(data, cuts):
    _fuzz_decode(data, cuts)
    _fuzz_decode(HEADER.pack(len(data)) + data, cuts, max_frame=600)


_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats(allow_nan=False)
    | st.text(max_size=10) | st.binary(max_size=10),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner,
                                                                max_size=4),
    max_leaves=12,
)
_frames = st.dictionaries(st.text(max_size=6), _values, max_size=5)


@settings(max_examples=200, deadline=None, database=None)
@given(
    st.lists(_frames, min_size=1, max_size=3),
    st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), max_size=4),
    st.lists(st.integers(0, 10_000), max_size=3),
)
def test_fuzz_mutated_valid_frames(frames, flips, cuts):
    data = bytearray(b"".join(encode_frame(f, max_frame=4096) for f in frames))
    assert _fuzz_decode(bytes(data), cuts, max_frame=4096) == frames
    for pos, byte in flips:
        data[pos % len(data)] = byte
    for frame in _fuzz_decode(bytes(data), cuts, max_frame=4096):
        try:
            validate_request(frame)
        except errors.ProtocolError:
            pass
        try:
            validate_reply(frame)
        except errors.ProtocolError:
            pass


# --- nesting depth -------------------------------------------------------------------------------
def _depth(value) -> int:
    """Reference: containers nested in `value` (recursive; the strategies keep it shallow)."""
    if isinstance(value, dict):
        return 1 + max((_depth(v) for v in value.values()), default=0)
    if isinstance(value, (list, tuple)):
        return 1 + max((_depth(v) for v in value), default=0)
    return 0


_leaves = (st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1) | st.floats(allow_nan=False)
           | st.text(max_size=5) | st.binary(max_size=5))
_nested = st.recursive(_leaves, lambda inner: st.lists(inner, max_size=4)
                       | st.dictionaries(st.text(max_size=3), inner, max_size=4), max_leaves=60)


@settings(max_examples=500, deadline=None, database=None)
@given(st.dictionaries(st.text(max_size=3), _nested, max_size=4), st.integers(1, 12))
def test_fuzz_check_depth_agrees_with_a_recursive_reference(args, limit):
    deep = _depth(args) > limit
    try:
        wire.check_depth(args, limit)
    except errors.InvalidParams as exc:
        assert deep and exc.data == {"arg": "args", "max_depth": limit}
    else:
        assert not deep
    # the same verdict through the codec, as the daemon sees it (limit MAX_DEPTH)
    frame = decode_all(encode_frame({"kind": "req", "id": 1, "op": "x", "args": args}))[0]
    if _depth(args) > wire.MAX_DEPTH:
        with pytest.raises(errors.InvalidParams):
            validate_request(frame)
    else:
        assert validate_request(frame).args == args


@settings(max_examples=50, deadline=None, database=None)
@given(st.integers(1, 200_000), st.sampled_from(["dict", "list", "mixed"]))
def test_fuzz_check_depth_of_long_chains_does_not_recurse(depth, shape):
    root: dict = {}
    node: object = root
    for i in range(depth - 1):
        child: object = [] if shape == "list" or (shape == "mixed" and i % 2) else {}
        if isinstance(node, dict):
            node["k"] = child
        else:
            node.append(child)  # type: ignore[attr-defined]
        node = child
    if depth > wire.MAX_DEPTH:
        with pytest.raises(errors.InvalidParams, match="nested more than 64"):
            wire.check_depth(root)
    else:
        wire.check_depth(root)


def test_depth_limit_edges_self_reference_and_request_checks():
    chain: dict = {}
    node = chain
    for _ in range(wire.MAX_DEPTH - 1):  # chain is exactly MAX_DEPTH maps deep
        node["a"] = {}
        node = node["a"]
    wire.check_depth(chain)
    node["a"] = [1]  # one more level
    with pytest.raises(errors.InvalidParams):
        wire.check_depth(chain)
    loop: list = []
    loop.append(loop)
    with pytest.raises(errors.InvalidParams):
        wire.check_depth({"x": loop})
    wire.check_depth("not a container")
    # the stub's side: building the request refuses it (nothing is sent); field errors stay protocol errors
    with pytest.raises(errors.InvalidParams):
        wire.make_request(1, "call", {"params": chain})
    with pytest.raises(errors.ProtocolError):
        validate_request({"kind": "req", "id": [1], "op": "call", "args": {"params": chain}})
    # 990 maps decode (msgpack's own stack stops at 1024), then are refused by depth, not by a crash
    body = b"\x84" + b"".join(msgpack.packb(x) for x in ("kind", "req", "id", 7, "op", "call", "args")) \
        + b"\x81\xa1p" + b"\x81\xa1a" * 989 + b"\x80"
    frame = decode_all(raw_frame(body))[0]
    with pytest.raises(errors.InvalidParams):
        validate_request(frame)
    assert frame["id"] == 7  # what the daemon answers to
