"""Argument checks, one family for every decoder in aund (pure, stdlib only).

The app socket (aund.broker), the devnet's JSON-RPC handlers (aund.devnet) and the AUN layer
read untrusted maps the same way: a named argument, present or defaulted, of one type, within
bounds. Each check raises `ParamError` naming the argument; each layer turns that into its own
error at its edge (`InvalidParams` with `data.arg` for apps, JSON-RPC -32602 for gateway peers)
with `fail_as`.

    with params.fail_as(params.invalid_params):
        size = params.integer(args, "size", 50, minimum=1, maximum=200)
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

MISSING: Any = object()
MAX_SAFE_INT = 2**53 - 1  # JSON-safe (the SDK's and JavaScript's)


class ParamError(ValueError):
    """An argument is missing or wrong; `name` names it, the message says what it must be."""

    def __init__(self, name: str, message: str) -> None:
        super().__init__(message)
        self.name = name


@contextmanager
def fail_as(convert: Callable[[ParamError], Exception]) -> Iterator[None]:
    """Raise `convert(error)` (from None) for a ParamError raised inside."""
    try:
        yield
    except ParamError as exc:
        raise convert(exc) from None


def invalid_params(exc: ParamError) -> Exception:
    """The app-facing error (aund.errors.InvalidParams, `data.arg` naming the argument)."""
    from aund.errors import InvalidParams

    return InvalidParams(str(exc), data={"arg": exc.name})


def get(args: Mapping[str, Any], name: str, default: Any = MISSING, *, what: str = "argument") -> Any:
    """`args[name]` unless absent or None, else `default` (a ParamError when there is none)."""
    value = args.get(name)
    if value is not None:
        return value
    if default is MISSING:
        raise ParamError(name, f"missing {what} {name!r}")
    return default


def string(args: Mapping[str, Any], name: str, default: Any = MISSING, *, max_len: int | None = None,
           empty: bool = True, what: str = "argument") -> Any:
    """A string (non-empty unless `empty`; at most `max_len` characters)."""
    value = get(args, name, default, what=what)
    if value is default and default is not MISSING:
        return value
    if not isinstance(value, str) or (not empty and not value) or (max_len is not None and len(value) > max_len):
        bounds = "a non-empty string" if not empty else "a string"
        raise ParamError(name, f"{what} {name!r} must be {bounds}"
                               + (f" of <= {max_len} characters" if max_len is not None else ""))
    return value


def integer(args: Mapping[str, Any], name: str, default: Any = MISSING, *, minimum: int | None = None,
            maximum: int | None = None, clamp: bool = False, what: str = "argument") -> Any:
    """An integer (not a bool) within [minimum, maximum]; out of range it is refused, or with
    `clamp` brought into range (a gateway's page sizes)."""
    value = get(args, name, default, what=what)
    if value is default and default is not MISSING:
        return value
    if isinstance(value, bool) or not isinstance(value, int):
        raise ParamError(name, f"{what} {name!r} must be an integer")
    if clamp:
        lo = value if minimum is None else max(minimum, value)
        return lo if maximum is None else min(maximum, lo)
    if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
        bounds = [f">= {minimum}"] * (minimum is not None) + [f"<= {maximum}"] * (maximum is not None)
        raise ParamError(name, f"{what} {name!r} must be an integer {' and '.join(bounds)}")
    return value


def number(args: Mapping[str, Any], name: str, default: Any = MISSING, *, above: float = 0.0,
           maximum: float | None = None, what: str = "argument") -> Any:
    """A finite number in (above, maximum]."""
    value = get(args, name, default, what=what)
    if value is default and default is not MISSING:
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value) \
            or not value > above or (maximum is not None and value > maximum):
        raise ParamError(name, f"{what} {name!r} must be a number in ({above:g}, {maximum:g}]"
                         if maximum is not None else f"{what} {name!r} must be a number > {above:g}")
    return float(value)


def boolean(args: Mapping[str, Any], name: str, default: Any = MISSING, *, what: str = "argument") -> Any:
    value = get(args, name, default, what=what)
    if not isinstance(value, bool) and not (value is default and default is not MISSING):
        raise ParamError(name, f"{what} {name!r} must be a boolean")
    return value


def mapping(args: Mapping[str, Any], name: str, default: Any = MISSING, *, what: str = "argument") -> Any:
    value = get(args, name, default, what=what)
    if not isinstance(value, dict) and not (value is default and default is not MISSING):
        raise ParamError(name, f"{what} {name!r} must be a map")
    return value
