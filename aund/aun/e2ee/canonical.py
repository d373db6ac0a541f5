"""Canonical JSON for E2EE v2 (protocol 5.4). Pure layer: stdlib only, no I/O, no trio.

Output rules, which every AUN SDK must reproduce byte for byte because the bytes are signed,
MAC'd and used as AES-GCM associated data:

* object keys sorted by code point, recursively; arrays keep their order; no whitespace;
* strings: UTF-8 as is, escapes only for ``"`` ``\\`` ``\\b`` ``\\f`` ``\\n`` ``\\r`` ``\\t`` and
  ``\\u00xx`` (lower-case hex) for the other code points below U+0020;
* ``null`` / ``true`` / ``false``; integers within +-(2**53 - 1);
* floats: NaN/Infinity refused, ``-0.0``/``0.0`` -> ``0``, integral values -> integer token,
  otherwise Python's shortest ``repr`` with any exponent written out positionally.

Errors: ``TypeError`` for values JSON cannot hold (bytes, sets, non-string keys, ...),
``ValueError`` for out-of-range integers, NaN/Infinity, nesting deeper than ``MAX_DEPTH`` and
strings that cannot be UTF-8 encoded (lone surrogates; ``UnicodeEncodeError``).
"""

from __future__ import annotations

from json.encoder import encode_basestring as _quote  # C-accelerated, escapes exactly the set above
from typing import Any

__all__ = ["MAX_DEPTH", "MAX_SAFE_INTEGER", "canonical_json", "canonical_json_str"]

MAX_SAFE_INTEGER = 2**53 - 1
#: Deepest nesting accepted. Far beyond any real payload; keeps recursion well clear of the limit.
MAX_DEPTH = 200


def canonical_json(obj: Any) -> bytes:
    """Return the canonical JSON encoding of ``obj`` as UTF-8 bytes."""
    return canonical_json_str(obj).encode("utf-8")


def canonical_json_str(obj: Any) -> str:
    """Like :func:`canonical_json` but returns the text (protected header values use the text)."""
    parts: list[str] = []
    _emit(obj, parts.append, 0)
    return "".join(parts)


def _emit(obj: Any, out: Any, depth: int) -> None:
    # Order of tests: str first (most frequent), bool before int (bool is an int subclass).
    if isinstance(obj, str):
        out(_quote(obj))
    elif obj is None:
        out("null")
    elif obj is True:
        out("true")
    elif obj is False:
        out("false")
    elif isinstance(obj, int):
        if -MAX_SAFE_INTEGER <= obj <= MAX_SAFE_INTEGER:
            out(int.__repr__(obj))
        else:
            raise ValueError("canonical_json: integer outside the safe range +-(2**53-1)")
    elif isinstance(obj, dict):
        if depth >= MAX_DEPTH:
            raise ValueError("canonical_json: nesting too deep")
        if not obj:
            out("{}")
            return
        for key in obj:
            if not isinstance(key, str):
                raise TypeError(f"canonical_json: object key must be str, not {type(key).__name__}")
        out("{")
        first = True
        for key in sorted(obj):
            if first:
                first = False
            else:
                out(",")
            value = obj[key]
            if type(value) is str:  # the common case (AAD, headers): skip a recursive call
                out(f"{_quote(key)}:{_quote(value)}")
            else:
                out(_quote(key) + ":")
                _emit(value, out, depth + 1)
        out("}")
    elif isinstance(obj, (list, tuple)):
        if depth >= MAX_DEPTH:
            raise ValueError("canonical_json: nesting too deep")
        out("[")
        first = True
        for item in obj:
            if first:
                first = False
            else:
                out(",")
            _emit(item, out, depth + 1)
        out("]")
    elif isinstance(obj, float):
        out(_float_token(obj))
    else:
        raise TypeError(f"canonical_json: unsupported type {type(obj).__name__}")


def _float_token(value: float) -> str:
    if value != value or value in (float("inf"), float("-inf")):
        raise ValueError("canonical_json: NaN and Infinity are not allowed")
    if value == 0.0:
        return "0"
    if value.is_integer():
        as_int = int(value)
        if -MAX_SAFE_INTEGER <= as_int <= MAX_SAFE_INTEGER:
            return str(as_int)
        raise ValueError("canonical_json: integer outside the safe range +-(2**53-1)")
    text = float.__repr__(value)
    if "e" not in text:
        return text
    return _positional(text)


def _positional(text: str) -> str:
    """Rewrite a repr like ``-1.25e-07`` as ``-0.000000125`` (same digits, no exponent)."""
    sign = ""
    if text[0] == "-":
        sign, text = "-", text[1:]
    mantissa, _, exponent = text.partition("e")
    whole, _, fraction = mantissa.partition(".")
    digits = whole + fraction
    point = len(whole) + int(exponent)  # position of the decimal point within ``digits``
    if point <= 0:
        return f"{sign}0.{'0' * -point}{digits}"
    if point >= len(digits):
        return sign + digits + "0" * (point - len(digits))
    return f"{sign}{digits[:point]}.{digits[point:]}"
