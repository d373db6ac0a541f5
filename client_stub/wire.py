"""Sans-IO codec of the local app<->aund protocol (layer: client_stub; imports msgpack and
client_stub.errors only: no trio, no asyncio, no sockets).

Framing: a 4-byte unsigned big-endian length N, then N bytes holding exactly one msgpack map
with string keys. N is checked against the maximum before any body byte is buffered. Every
frame names its ``kind``::

    req  {kind, id, op, args}       app -> aund; id is an int or str chosen by the app
    rep  {kind, id, result}         aund -> app; echoes the request id
    err  {kind, id, error}          aund -> app; id is None for a connection-level error;
                                    error is errors.error_to_wire(exc)
    evt  {kind, sub, event}         aund -> app; sub is the subscription id

Unknown extra fields are ignored (room for additions without a version bump). An undecodable
or oversize frame, or one with a bad ``kind``/field, is a protocol violation: the receiver sends
an ``err`` frame with id None (when it can) and closes the connection. A bad op argument or an
unknown op is an ordinary ``err`` reply and the connection stays open; so are ``args`` nested
deeper than ``MAX_DEPTH`` maps/arrays (``InvalidParams``, checked by ``Request`` on both sides:
the stub refuses to send them, the daemon answers them without descending into them).

Handshake: the app's first frame must be ``req`` op ``hello`` with args
``{protocol: int, min_protocol: int, app: str}``; the reply result is
``{daemon_version: str, protocol: int, ops: [str], features: [str], max_frame: int}``, where
``protocol`` is ``negotiate_protocol(...)`` and ``max_frame`` bounds frames in both directions.
Discover features by name in ``features``/``ops`` rather than by the version number.
"""

from __future__ import annotations

import struct

TYPE_CHECKING = False  # typing is for checkers only: apps should not pay for importing it
if TYPE_CHECKING:
    from typing import Any

import msgpack

from client_stub.errors import AundError, InvalidParams, ProtocolError, error_from_wire, error_to_wire

# Protocol version history (bump only for incompatible framing/shape changes):
#   1  2026-11-23  initial: length-prefixed msgpack maps, req/rep/err/evt, hello handshake.
PROTOCOL_VERSION = 1
MIN_PROTOCOL_VERSION = 1
DEFAULT_MAX_FRAME = 1 << 20  # 1 MiB
HARD_MAX_FRAME = 16 << 20  # 16 MiB: no negotiation may go above this
HEADER = struct.Struct(">I")
MAX_ID_LEN = 256  # longest str request/subscription id
MAX_DEPTH = 64  # deepest nesting of maps/arrays in a request's args (args itself is depth 1)
HELLO_OP = "hello"

Id = "int | str"  # (type hints only)
_KINDS = ("req", "rep", "err", "evt")


def _check_max_frame(max_frame: int) -> int:
    if isinstance(max_frame, bool) or not isinstance(max_frame, int):
        raise TypeError("max_frame must be an int")
    if not 1 <= max_frame <= HARD_MAX_FRAME:
        raise ValueError(f"max_frame must be in 1..{HARD_MAX_FRAME}, got {max_frame}")
    return max_frame


def _check_id(name: str, value: object, *, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise ProtocolError(f"field {name!r} must be an int or str, got {type(value).__name__}")
    if isinstance(value, str) and len(value) > MAX_ID_LEN:
        raise ProtocolError(f"field {name!r} is longer than {MAX_ID_LEN} characters")


def _check_map(name: str, value: object) -> None:
    if not isinstance(value, dict):
        raise ProtocolError(f"field {name!r} must be a map, got {type(value).__name__}")
    for key in value:
        if not isinstance(key, str):
            raise ProtocolError(f"field {name!r} has a non-string key {key!r:.40}")


def check_depth(value: object, limit: int = MAX_DEPTH, name: str = "args") -> None:
    """Refuse ``value`` if maps/arrays nest more than ``limit`` deep (``value`` itself counts 1).

    Iterative (an explicit stack, no recursion), so any depth is checked in bounded Python stack;
    it stops at the first container past the limit. Self-referencing containers count as too deep.

    Errors: InvalidParams naming ``name`` and the limit.
    """
    containers = (dict, list, tuple)
    if not isinstance(value, containers):
        return
    stack: list[tuple[object, int]] = [(value, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > limit:
            raise InvalidParams(f"{name!r} is nested more than {limit} levels deep",
                                data={"arg": name, "max_depth": limit})
        for child in (node.values() if isinstance(node, dict) else node):  # type: ignore[attr-defined]
            if isinstance(child, containers):
                stack.append((child, depth + 1))


class _Record:
    """A small immutable record (instead of a dataclass: importing dataclasses pulls in inspect,
    ast and dis, over a megabyte that every app would pay for). Subclasses name their fields in
    ``__slots__`` and check them in ``_check``."""

    __slots__ = ()

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        names = self.__slots__
        if len(args) > len(names):
            raise TypeError(f"{type(self).__name__} takes {len(names)} fields")
        values = dict(zip(names, args))
        for key, value in kwargs.items():
            if key not in names or key in values:
                raise TypeError(f"{type(self).__name__}: unexpected or repeated field {key!r}")
            values[key] = value
        missing = [n for n in names if n not in values]
        if missing:
            raise TypeError(f"{type(self).__name__}: missing fields {missing}")
        for name in names:
            object.__setattr__(self, name, values[name])
        self._check()

    def _check(self) -> None:
        pass

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(f"{type(self).__name__} is immutable")

    def __eq__(self, other: object) -> bool:
        if type(other) is not type(self):
            return NotImplemented
        return all(getattr(self, n) == getattr(other, n) for n in self.__slots__)

    def __hash__(self) -> int:
        return hash(tuple(repr(getattr(self, n)) for n in self.__slots__))

    def __repr__(self) -> str:
        fields = ", ".join(f"{n}={getattr(self, n)!r}" for n in self.__slots__)
        return f"{type(self).__name__}({fields})"


class Request(_Record):
    """A ``req`` frame: the app asks for ``op`` with ``args``; ``id`` is echoed in the answer."""

    __slots__ = ("id", "op", "args")
    id: Id
    op: str
    args: dict[str, Any]

    def _check(self) -> None:
        _check_id("id", self.id)
        if not isinstance(self.op, str) or not self.op:
            raise ProtocolError("field 'op' must be a non-empty string")
        _check_map("args", self.args)
        check_depth(self.args)  # last: a caller answering the InvalidParams may rely on a valid id

    def to_wire(self) -> dict[str, Any]:
        return {"kind": "req", "id": self.id, "op": self.op, "args": self.args}


class Reply(_Record):
    """A ``rep`` frame: the successful ``result`` of request ``id``."""

    __slots__ = ("id", "result")
    id: Id
    result: Any

    def _check(self) -> None:
        _check_id("id", self.id)

    def to_wire(self) -> dict[str, Any]:
        return {"kind": "rep", "id": self.id, "result": self.result}


class ErrorReply(_Record):
    """An ``err`` frame: request ``id`` (None: the connection) failed with wire dict ``error``."""

    __slots__ = ("id", "error")
    id: Id | None
    error: dict[str, Any]

    def _check(self) -> None:
        _check_id("id", self.id, allow_none=True)
        _check_map("error", self.error)

    def exception(self) -> AundError:
        """The exception the sender raised (a ProtocolError if ``error`` is garbage)."""
        return error_from_wire(self.error)

    def to_wire(self) -> dict[str, Any]:
        return {"kind": "err", "id": self.id, "error": self.error}


class Event(_Record):
    """An ``evt`` frame: ``event`` delivered on subscription ``sub``."""

    __slots__ = ("sub", "event")
    sub: Id
    event: dict[str, Any]

    def _check(self) -> None:
        _check_id("sub", self.sub)
        _check_map("event", self.event)

    def to_wire(self) -> dict[str, Any]:
        return {"kind": "evt", "sub": self.sub, "event": self.event}


Frame = "Request | Reply | ErrorReply | Event"  # (a name for type hints; no typing import at run time)


def make_request(id: Id, op: str, args: dict[str, Any] | None = None) -> dict[str, Any]:
    """Return a ``req`` frame dict. Errors: ProtocolError on an ill-typed id, op or args;
    InvalidParams if args nest deeper than ``MAX_DEPTH``."""
    return Request(id, op, {} if args is None else args).to_wire()


def make_reply(id: Id, result: Any) -> dict[str, Any]:
    """Return a ``rep`` frame dict. Errors: ProtocolError on an ill-typed id."""
    return Reply(id, result).to_wire()


def make_error(id: Id | None, exc: AundError) -> dict[str, Any]:
    """Return an ``err`` frame dict for ``exc``.

    Errors: ProtocolError on an ill-typed id; TypeError if ``exc`` is not an AundError.
    """
    return ErrorReply(id, error_to_wire(exc)).to_wire()


def make_event(sub: Id, event: dict[str, Any]) -> dict[str, Any]:
    """Return an ``evt`` frame dict. Errors: ProtocolError on an ill-typed sub or event."""
    return Event(sub, event).to_wire()


def _field(frame: dict[str, Any], name: str) -> Any:
    try:
        return frame[name]
    except KeyError:
        raise ProtocolError(f"{frame.get('kind')!r} frame is missing field {name!r}") from None


def _parse(frame: object, allowed: tuple[str, ...]) -> Frame:
    if not isinstance(frame, dict):
        raise ProtocolError(f"a frame must be a map, got {type(frame).__name__}")
    kind = frame.get("kind")
    if kind not in _KINDS:
        raise ProtocolError(f"field 'kind' is missing or unknown: {kind!r:.40}")
    if kind not in allowed:
        raise ProtocolError(f"unexpected frame kind {kind!r} in this direction")
    if kind == "req":
        return Request(_field(frame, "id"), _field(frame, "op"), _field(frame, "args"))
    if kind == "rep":
        return Reply(_field(frame, "id"), _field(frame, "result"))
    if kind == "err":
        return ErrorReply(_field(frame, "id"), _field(frame, "error"))
    return Event(_field(frame, "sub"), _field(frame, "event"))


def validate_request(frame: object) -> Request:
    """Check a decoded app->aund frame and return it as a Request.

    Errors: ProtocolError if the frame is not a map, its kind is not ``req``, or a field is
    missing or ill-typed (the message names the field); InvalidParams if ``args`` nests deeper
    than ``MAX_DEPTH`` (the frame's ``id`` is then valid: answer it and keep the connection).
    """
    return _parse(frame, ("req",))  # type: ignore[return-value]


def validate_reply(frame: object) -> Reply | ErrorReply | Event:
    """Check a decoded aund->app frame and return it as a Reply, ErrorReply or Event.

    Errors: ProtocolError if the frame is not a map, its kind is not ``rep``/``err``/``evt``,
    or a field is missing or ill-typed (the message names the field).
    """
    return _parse(frame, ("rep", "err", "evt"))  # type: ignore[return-value]


def encode_frame(obj: dict[str, Any], max_frame: int = DEFAULT_MAX_FRAME) -> bytes:
    """Serialize one frame map to header + body bytes.

    Errors: ProtocolError if ``obj`` is not a dict with string keys, holds a value msgpack
    cannot encode, or encodes to more than ``max_frame`` bytes; ValueError/TypeError if
    ``max_frame`` itself is out of range (a bug).
    """
    _check_max_frame(max_frame)
    if not isinstance(obj, dict):
        raise ProtocolError(f"a frame must be a dict, got {type(obj).__name__}")
    _check_map("frame", obj)
    try:
        body = msgpack.packb(obj, use_bin_type=True, datetime=False)
    except (TypeError, ValueError, OverflowError) as exc:
        raise ProtocolError(f"frame cannot be encoded: {exc}") from None
    if len(body) > max_frame:
        raise ProtocolError(
            f"frame of {len(body)} bytes exceeds the maximum of {max_frame}",
            data={"length": len(body), "max_frame": max_frame},
        )
    return HEADER.pack(len(body)) + body


class FrameDecoder:
    """Incremental decoder: ``feed()`` bytes as they arrive, then call ``next_frame()`` until None.

    The length header is checked before any body byte is kept, so the decoder holds at most one
    incomplete frame (``max_frame + 4`` bytes) plus whatever was fed since ``next_frame()``
    last returned None; callers bound that by their read size. After a ProtocolError the
    decoder is broken for good and every later call raises the same error: close the connection.
    ``max_frame`` may be changed between frames (e.g. after the hello reply).
    """

    def __init__(self, max_frame: int = DEFAULT_MAX_FRAME) -> None:
        self._max_frame = _check_max_frame(max_frame)
        self._buf = bytearray()
        self._pos = 0  # start of the unconsumed bytes in _buf
        self._error: ProtocolError | None = None

    @property
    def max_frame(self) -> int:
        return self._max_frame

    @max_frame.setter
    def max_frame(self, value: int) -> None:
        self._max_frame = _check_max_frame(value)

    @property
    def buffered(self) -> int:
        """Number of received bytes not yet returned as a frame."""
        return len(self._buf) - self._pos

    def feed(self, data: bytes) -> None:
        """Append received bytes; an oversize header is rejected as soon as it is complete.

        Errors: ProtocolError if the decoder is broken or the next header announces a frame
        larger than ``max_frame`` (then ``data`` is not kept).
        """
        if self._error is not None:
            raise self._error
        self._buf += data
        if self.buffered >= HEADER.size:
            self._check_length()

    def _fail(self, message: str, **data: Any) -> ProtocolError:
        self._error = ProtocolError(message, data=data)
        self._buf = bytearray()
        self._pos = 0
        return self._error

    def _check_length(self) -> int:
        (n,) = HEADER.unpack_from(self._buf, self._pos)
        if n > self._max_frame:
            raise self._fail(
                f"frame length {n} exceeds the maximum of {self._max_frame}",
                length=n, max_frame=self._max_frame,
            )
        if n == 0:
            raise self._fail("empty frame (length 0)")
        return n

    def next_frame(self) -> dict[str, Any] | None:
        """Return the next complete frame map, or None if more bytes are needed.

        Only framing and msgpack shape are checked here; use ``validate_request`` /
        ``validate_reply`` for the fields.

        Errors: ProtocolError if the decoder is broken, a header announces an empty or
        oversize frame, or the body is not exactly one msgpack map with string keys (bad
        msgpack, trailing bytes, ext types or timestamps, over-deep nesting, invalid UTF-8).
        """
        if self._error is not None:
            raise self._error
        if self.buffered < HEADER.size:
            self._compact()
            return None
        n = self._check_length()
        start = self._pos + HEADER.size
        if len(self._buf) - start < n:
            self._compact()
            return None
        frame = self._decode_body(start, n)
        self._pos = start + n
        return frame

    def _compact(self) -> None:
        if self._pos:
            del self._buf[: self._pos]
            self._pos = 0

    def _decode_body(self, start: int, n: int) -> dict[str, Any]:
        limit = self._max_frame
        try:
            with memoryview(self._buf) as view, view[start : start + n] as body:
                obj = msgpack.unpackb(
                    body, raw=False, strict_map_key=True, use_list=True, timestamp=0,
                    max_str_len=limit, max_bin_len=limit, max_array_len=limit,
                    max_map_len=limit // 2, max_ext_len=0,
                )
        except (ValueError, TypeError, OverflowError, msgpack.UnpackException) as exc:
            raise self._fail(f"frame body is not valid msgpack: {type(exc).__name__}") from None
        if not isinstance(obj, dict):
            raise self._fail(f"frame body must be a map, got {type(obj).__name__}")
        for key in obj:
            if not isinstance(key, str):
                raise self._fail(f"frame has a non-string key {key!r:.40}")
        return obj


def negotiate_protocol(client_min: int, client_max: int, server_min: int, server_max: int) -> int:
    """Return the highest protocol version both sides speak.

    Errors: ProtocolError if a bound is not an int, a range is empty (min > max) or the two
    ranges do not overlap; ``data`` carries both ranges.
    """
    bounds = (client_min, client_max, server_min, server_max)
    ranges = {"client": [client_min, client_max], "server": [server_min, server_max]}
    if any(isinstance(b, bool) or not isinstance(b, int) for b in bounds):
        raise ProtocolError("protocol versions must be integers", data={})
    best, low = min(client_max, server_max), max(client_min, server_min)
    if client_min > client_max or server_min > server_max or best < low:
        raise ProtocolError(
            f"no common protocol version: app speaks {client_min}..{client_max}, "
            f"aund speaks {server_min}..{server_max}",
            data=ranges,
        )
    return best


class Hello(_Record):
    """The arguments of the ``hello`` request."""

    __slots__ = ("protocol", "min_protocol", "app")
    protocol: int
    min_protocol: int
    app: str


def validate_hello(args: object) -> Hello:
    """Check the args of a ``hello`` request.

    Errors: ProtocolError naming the field if ``protocol``/``min_protocol`` are not ints or
    ``app`` is not a non-empty string of at most 128 characters.
    """
    if not isinstance(args, dict):
        raise ProtocolError("hello args must be a map")
    for name in ("protocol", "min_protocol"):
        value = args.get(name)
        if isinstance(value, bool) or not isinstance(value, int):
            raise ProtocolError(f"hello field {name!r} must be an int")
    app = args.get("app")
    if not isinstance(app, str) or not 0 < len(app) <= 128:
        raise ProtocolError("hello field 'app' must be a non-empty string of <= 128 chars")
    return Hello(args["protocol"], args["min_protocol"], app)


def make_hello(id: Id, app: str) -> dict[str, Any]:
    """Return the app's first frame, a ``hello`` request for this module's protocol range.

    Errors: ProtocolError on an ill-typed id.
    """
    args = {"protocol": PROTOCOL_VERSION, "min_protocol": MIN_PROTOCOL_VERSION, "app": app}
    return make_request(id, HELLO_OP, args)
