"""The one argument-check family (aund.params): every decoder's checks, refusals naming the argument."""
from __future__ import annotations

import random

import pytest

from aund import params
from aund.errors import InvalidParams


def test_each_check_takes_what_it_should_and_names_what_it_refuses():
    args = {"s": "x", "e": "", "i": 5, "b": True, "m": {}, "f": 1.5, "n": None, "t": True}
    assert params.string(args, "s") == "x" and params.string(args, "e") == ""
    assert params.string(args, "n", "dflt") == "dflt" and params.integer(args, "missing", 7) == 7
    assert params.integer(args, "i", minimum=1, maximum=5) == 5
    assert params.integer({"i": 900}, "i", minimum=1, maximum=200, clamp=True) == 200
    assert params.integer({"i": -3}, "i", minimum=0, clamp=True) == 0
    assert params.boolean(args, "b") is True and params.mapping(args, "m") == {}
    assert params.number(args, "f", maximum=2) == 1.5 and params.number(args, "n", None) is None
    cases = [
        (lambda: params.string(args, "nope"), "nope", "missing argument 'nope'"),
        (lambda: params.string(args, "e", empty=False), "e", "non-empty string"),
        (lambda: params.string({"s": "xyz"}, "s", max_len=2), "s", "<= 2 characters"),
        (lambda: params.string(args, "i"), "i", "must be a string"),
        (lambda: params.integer(args, "t"), "t", "must be an integer"),  # a bool is not an integer
        (lambda: params.integer(args, "i", minimum=6), "i", ">= 6"),
        (lambda: params.integer(args, "i", maximum=4), "i", "<= 4"),
        (lambda: params.number({"f": float("nan")}, "f"), "f", "must be a number"),
        (lambda: params.number({"f": 3}, "f", maximum=2), "f", "(0, 2]"),
        (lambda: params.boolean(args, "i"), "i", "must be a boolean"),
        (lambda: params.mapping(args, "s", what="param"), "s", "param 's' must be a map"),
    ]
    for check, name, words in cases:
        with pytest.raises(params.ParamError, match=__import__("re").escape(words)) as caught:
            check()
        assert caught.value.name == name


def test_fail_as_gives_each_layer_its_own_error():
    with pytest.raises(InvalidParams) as caught, params.fail_as(params.invalid_params):
        params.integer({"size": "9"}, "size")
    assert caught.value.data == {"arg": "size"} and "size" in str(caught.value)


def test_random_values_get_a_value_or_a_param_error_never_anything_else():
    rng = random.Random(7)
    samples = [None, True, False, 0, -1, 2**70, 1.5, float("inf"), float("nan"), "", "x" * 300, [], {}, b"x", object()]
    checks = [(lambda a: params.string(a, "v", max_len=256, empty=False), lambda r: isinstance(r, str) and 0 < len(r) <= 256),
              (lambda a: params.integer(a, "v", minimum=0), lambda r: type(r) is int and r >= 0),
              (lambda a: params.integer(a, "v", 1, minimum=1, maximum=9, clamp=True), lambda r: type(r) is int and 1 <= r <= 9),
              (lambda a: params.number(a, "v"), lambda r: type(r) is float and r > 0 and r == r),
              (lambda a: params.boolean(a, "v", False), lambda r: type(r) is bool),
              (lambda a: params.mapping(a, "v", {}), lambda r: type(r) is dict)]
    outcomes = {"taken": 0, "refused": 0}
    for _ in range(2000):
        value, (check, holds) = rng.choice(samples), rng.choice(checks)
        try:
            result = check({"v": value})
        except params.ParamError as exc:
            assert exc.name == "v"
            outcomes["refused"] += 1
        else:
            assert holds(result), (value, result)
            outcomes["taken"] += 1
    assert outcomes["taken"] > 100 and outcomes["refused"] > 100
