"""PageSizer: the row limit of catch-up pages, halved on 1009, grown back slowly, and the verdict
that a row fits in no page (aund.aun.paging)."""
from __future__ import annotations

import pytest

from aund.aun.paging import PageSizer, frame_too_big
from aund.errors import GatewayUnavailable, RpcTimeout


def too_big() -> GatewayUnavailable:
    """A fresh 1009 failure (each close of the link is its own error)."""
    return GatewayUnavailable("connection to the gateway closed (code 1009)", data={"close_code": 1009})


DROPPED = GatewayUnavailable("connection to the gateway closed (code 1006)", data={"close_code": 1006})


def test_only_a_1009_counts():
    assert frame_too_big(too_big())
    assert not frame_too_big(DROPPED)
    assert not frame_too_big(RpcTimeout("rpc timeout: message.v2.pull"))
    sizer = PageSizer(200, "a.aid.test")
    assert sizer.too_big(DROPPED, "ns", 0, 200) is False and sizer.limit == 200


def test_halves_from_what_was_asked_down_to_one():
    sizer = PageSizer(200, "a.aid.test")
    assert sizer.rows() == 200
    assert sizer.rows(remaining=12) == 12  # never more than the head leaves
    assert sizer.rows(remaining=0) == 200  # an unknown or stale head bounds nothing
    seen = []
    asked = sizer.rows(remaining=12)
    while asked > 1:
        assert sizer.too_big(too_big(), "ns", 0, asked) is False
        asked = sizer.rows(remaining=12)
        seen.append(asked)
    assert seen == [6, 3, 1] and sizer.limit == 1 and sizer.shrinks == 3


def test_grows_back_after_full_pages_only():
    sizer = PageSizer(200, "a.aid.test", grow_after=3)
    sizer.too_big(too_big(), "ns", 0, 200)
    sizer.too_big(too_big(), "ns", 0, 100)
    assert sizer.limit == 50
    for _ in range(5):
        sizer.fitted("ns", 7)  # short pages (bounded by the head) say nothing about 50
    assert sizer.limit == 50
    for _ in range(3):
        sizer.fitted("ns", 50)
    assert sizer.limit == 100
    for _ in range(6):
        sizer.fitted("ns", sizer.limit)
    assert sizer.limit == 200  # never above the maximum
    sizer.fitted("ns", 200)
    assert sizer.limit == 200


def test_a_row_is_skipped_after_two_strikes_at_one_cursor_on_one_row_pages():
    sizer = PageSizer(200, "a.aid.test")
    assert sizer.too_big(too_big(), "ns", 5, 2) is False  # a two-row page: shrink only
    assert sizer.limit == 1
    assert sizer.too_big(too_big(), "ns", 5, 1) is False  # one strike: may have been another message
    assert sizer.too_big(too_big(), "other", 9, 1) is False  # strikes are per namespace
    assert sizer.too_big(too_big(), "ns", 5, 1) is True
    assert sizer.skipped == 1
    # the strikes are gone: the next cursor starts afresh, and a success in between clears them
    assert sizer.too_big(too_big(), "ns", 6, 1) is False
    sizer.fitted("ns", 1)
    assert sizer.too_big(too_big(), "ns", 6, 1) is False
    assert sizer.too_big(too_big(), "ns", 7, 1) is False  # another cursor: the count restarts
    assert sizer.too_big(too_big(), "ns", 7, 1) is True


def test_one_error_shared_by_coalesced_pulls_counts_once():
    sizer = PageSizer(200, "a.aid.test")
    sizer.too_big(too_big(), "ns", 0, 8)
    assert sizer.limit == 4
    shared = too_big()
    assert sizer.too_big(shared, "ns", 0, 1) is False
    assert sizer.too_big(shared, "ns", 0, 1) is False  # the same close, seen by a second caller
    assert sizer.limit == 1 and sizer.skipped == 0


def test_a_single_remaining_row_strikes_at_once_even_with_a_large_limit():
    sizer = PageSizer(200, "a.aid.test")
    assert sizer.too_big(too_big(), "ns", 3, sizer.rows(remaining=1)) is False
    assert sizer.limit == 1
    assert sizer.too_big(too_big(), "ns", 3, 1) is True


def test_gateway_max_frame_is_configurable_but_not_below_64_kib(tmp_path):
    from aund import config

    toml = tmp_path / "aund.toml"
    toml.write_text("gateway_max_frame = 0\n")
    assert config.load(toml, env={}).gateway_max_frame == 0  # 0: the built-in 8 MiB
    loaded = config.load(toml, env={"AUND_GATEWAY_MAX_FRAME": "600000"})
    assert loaded.gateway_max_frame == 600000
    assert loaded.source_of("gateway_max_frame") == "environment AUND_GATEWAY_MAX_FRAME"
    with pytest.raises(config.ConfigError, match="gateway_max_frame.*at least 65536"):
        config.load(toml, env={"AUND_GATEWAY_MAX_FRAME": "1000"})
    toml.write_text("gateway_max_frame = -1\n")
    with pytest.raises(config.ConfigError, match="non-negative integer"):
        config.load(toml, env={})
