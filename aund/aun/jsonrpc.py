"""AUN layer: the JSON-RPC 2.0 text-frame codec used on the gateway WebSocket (sans-IO).

Shared by aund's gateway links and the devnet, so both ends parse frames the same strict way:
duplicate keys, NaN/Infinity and integers beyond +-(2^53-1) are errors, as in the official SDK.
"""
from __future__ import annotations

import json
import math
import re
import secrets
from typing import Any

MAX_SAFE_INT = 2**53 - 1

# the error codes, for `rpc.INVALID_PARAMS` and the like at the call sites (defined in aund.aun.codes)
from aund.aun.codes import (  # noqa: E402,F401
    AGENT_MD_REQUIRED, AUTH_FAILED, BACKEND_ERROR, BAD_NONCE, CERT_INVALID, CLIENT_SIGNATURE_INVALID, CONFLICT,
    E2EE_PREKEY_INVALID, INTERNAL_ERROR, INVALID_PARAMS, INVALID_REQUEST, METHOD_NOT_FOUND, MISSING_PARAMS,
    NOT_FOUND, NOT_FOUND_4040, PARSE_ERROR, PERMISSION_DENIED, RATE_LIMITED, SESSION_REQUIRED, VERSION_MISMATCH,
)


class FrameError(ValueError):
    """A text frame is not valid strict JSON (`code` -32700), or not a JSON-RPC 2.0 object (-32600)."""

    def __init__(self, message: str, code: int = PARSE_ERROR) -> None:
        super().__init__(message)
        self.code = code


def _reject_constant(name: str) -> Any:
    raise FrameError(f"non-finite number {name} is not allowed")


def _checked_int(text: str) -> int:
    value = int(text)
    if abs(value) > MAX_SAFE_INT:
        raise FrameError("integer outside +-(2^53-1)")
    return value


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        raise FrameError("duplicate key in JSON object")
    return obj


def _checked_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise FrameError(f"number {text[:20]} overflows a double")
    return value


_decoder = json.JSONDecoder(object_pairs_hook=_no_duplicates, parse_constant=_reject_constant,
                            parse_int=_checked_int, parse_float=_checked_float)
MAX_DEPTH = 128  # far beyond any AUN message; keeps re-encoding and walking the value safe
_ESCAPED_SURROGATE = re.compile(r"\\u[dD][89a-fA-F]")


def _check_structure(value: Any, strings: bool) -> None:
    """Iteratively bound the nesting depth and (when asked) reject lone surrogates in strings."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            if depth > MAX_DEPTH:
                raise FrameError(f"JSON nested deeper than {MAX_DEPTH}")
            if strings:
                stack.extend((k, depth) for k in item)
            stack.extend((v, depth + 1) for v in item.values())
        elif isinstance(item, list):
            if depth > MAX_DEPTH:
                raise FrameError(f"JSON nested deeper than {MAX_DEPTH}")
            stack.extend((v, depth + 1) for v in item)
        elif strings and isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                raise FrameError("lone surrogate in a JSON string") from None


def check_depth(value: Any, limit: int = MAX_DEPTH) -> None:
    """Raise FrameError if `value` nests deeper than `limit` (iteratively; any size)."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, (dict, list)):
            if depth > limit:
                raise FrameError(f"JSON nested deeper than {limit}", INVALID_PARAMS)
            stack.extend((v, depth + 1) for v in (item.values() if isinstance(item, dict) else item))


def loads(text: str) -> Any:
    """Strict JSON decode; raises FrameError (malformed, duplicate keys, non-finite or unsafe
    numbers, lone surrogates, nesting deeper than MAX_DEPTH, trailing data)."""
    try:
        text.encode("utf-8")  # raw lone surrogates are not text
    except UnicodeEncodeError:
        raise FrameError("lone surrogate in frame") from None
    try:
        value, end = _decoder.raw_decode(text)
    except FrameError:
        raise
    except (ValueError, RecursionError) as exc:
        raise FrameError(f"malformed JSON: {str(exc)[:200]}") from None
    if text[end:].strip():
        raise FrameError("trailing data after JSON value")
    escaped = "\\u" in text and _ESCAPED_SURROGATE.search(text) is not None
    if escaped or text.count("[") + text.count("{") > MAX_DEPTH:
        _check_structure(value, escaped)
    return value


class Encoded(dict):
    """A params object whose compact JSON text is already made (`text`), e.g. the very text a
    `client_signature` hashed: `dumps` splices it into the frame instead of encoding the params
    again, so a signed call is serialised once and the gateway reads the bytes that were signed.
    A change through the dict's own methods forgets the text (the params are then encoded again)."""

    __slots__ = ("text",)

    def __init__(self, value: dict[str, Any], text: str) -> None:
        super().__init__(value)
        self.text: str | None = text

    def _forgetting(name: str):  # noqa: N805 - builds the mutators below
        method = getattr(dict, name)

        def mutate(self, *args: Any, **kwargs: Any) -> Any:
            self.text = None
            return method(self, *args, **kwargs)
        mutate.__name__ = name
        return mutate

    __setitem__ = _forgetting("__setitem__")
    __delitem__ = _forgetting("__delitem__")
    __ior__ = _forgetting("__ior__")
    pop = _forgetting("pop")
    popitem = _forgetting("popitem")
    clear = _forgetting("clear")
    update = _forgetting("update")
    setdefault = _forgetting("setdefault")
    del _forgetting


def dumps(obj: Any) -> str:
    params = obj.get("params") if type(obj) is dict else None
    if type(params) is Encoded and params.text is not None:
        head = json.dumps({k: v for k, v in obj.items() if k != "params"}, ensure_ascii=False,
                          separators=(",", ":"), allow_nan=False)
        return f'{head[:-1]}{"," if len(head) > 2 else ""}"params":{params.text}}}'
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"), allow_nan=False)


def new_id() -> str:
    return "rpc-" + secrets.token_hex(8)


def request(method: str, params: dict[str, Any], id: str | None = None) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "id": id or new_id(), "method": method, "params": params}


def notification(method: str, params: dict[str, Any]) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "method": method, "params": params}


def result(id: Any, value: dict[str, Any]) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "id": id, "result": value}


def error(id: Any, code: int, message: str, data: dict[str, Any] | None = None) -> dict[str, Any]:
    err: dict[str, Any] = {"code": code, "message": message}
    if data is not None:
        err["data"] = data
    return {"jsonrpc": "2.0", "id": id, "error": err}


def parse_frame(text: str) -> dict[str, Any]:
    """Decode one text frame into a JSON-RPC object (request, response or notification).

    Raises FrameError when the text is not strict JSON, not an object, or lacks the fields of
    any JSON-RPC 2.0 message shape.
    """
    obj = loads(text)
    if not isinstance(obj, dict):
        raise FrameError("frame is not a JSON object", INVALID_REQUEST)
    if obj.get("jsonrpc") != "2.0":
        raise FrameError("jsonrpc must be \"2.0\"", INVALID_REQUEST)
    if "method" in obj:
        if not isinstance(obj["method"], str) or not obj["method"]:
            raise FrameError("method must be a non-empty string", INVALID_REQUEST)
        if "params" in obj and not isinstance(obj["params"], dict):
            raise FrameError("params must be an object", INVALID_REQUEST)
        if "id" in obj and not isinstance(obj["id"], (str, int)) or isinstance(obj.get("id"), bool):
            raise FrameError("id must be a string or an integer", INVALID_REQUEST)
    elif "id" not in obj or ("result" in obj) == ("error" in obj):
        raise FrameError("a response needs an id and exactly one of result or error", INVALID_REQUEST)
    return obj
