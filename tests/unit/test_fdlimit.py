"""fdlimit: the soft open-file limit is raised to what the configured links need, never lowered,
and a limit that cannot be raised enough is reported with the LimitNOFILE= to set. The rlimit
functions are injected: the test process's own limits are never changed."""
from __future__ import annotations

import resource

import pytest

from aund import fdlimit

pytestmark = pytest.mark.timeout(10)


class FakeLimits:
    def __init__(self, soft: int, hard: int, refuse: bool = False) -> None:
        self.soft, self.hard, self.refuse = soft, hard, refuse
        self.calls: list[tuple[int, int]] = []

    def get(self, which: int) -> tuple[int, int]:
        assert which == resource.RLIMIT_NOFILE
        return self.soft, self.hard

    def set(self, which: int, limits: tuple[int, int]) -> None:
        assert which == resource.RLIMIT_NOFILE
        self.calls.append(limits)
        if self.refuse:
            raise ValueError("not allowed")
        self.soft, self.hard = limits

    def check(self, need: int) -> fdlimit.NofileCheck:
        return fdlimit.ensure_nofile(need, getrlimit=self.get, setrlimit=self.set)


def test_needed_counts_a_socket_per_link_plus_the_margin() -> None:
    assert fdlimit.needed(0) == fdlimit.MARGIN
    assert fdlimit.needed(10_000) == 10_000 + fdlimit.MARGIN
    assert fdlimit.needed(10, apps=5) == 15 + fdlimit.MARGIN


def test_soft_below_need_is_raised_to_the_hard_limit() -> None:
    lim = FakeLimits(1024, 524288)
    check = lim.check(fdlimit.needed(10_000))
    assert lim.calls == [(524288, 524288)]
    assert check.enough and check.raised and check.soft == 524288 and check.soft_before == 1024
    assert "hint" not in check.log_fields()


def test_soft_enough_is_left_alone() -> None:
    lim = FakeLimits(65536, 65536)
    check = lim.check(fdlimit.needed(1000))
    assert lim.calls == [] and check.enough and not check.raised


def test_hard_too_low_names_limitnofile() -> None:
    lim = FakeLimits(1024, 4096)
    check = lim.check(fdlimit.needed(10_000))
    assert lim.calls == [(4096, 4096)]  # as far as it goes
    assert not check.enough and check.soft == 4096
    fields = check.log_fields()
    assert fields["needed"] == 10_256 and "LimitNOFILE=65536" in fields["hint"]


def test_refused_raise_keeps_the_limit_and_reports() -> None:
    lim = FakeLimits(1024, 65536, refuse=True)
    check = lim.check(5000)
    assert lim.calls == [(65536, 65536)] and lim.soft == 1024
    assert not check.enough and not check.raised and check.soft == 1024


def test_unlimited_hard_raises_to_a_finite_suggestion() -> None:
    lim = FakeLimits(1024, resource.RLIM_INFINITY)
    check = lim.check(200_000)
    assert lim.calls == [(262144, resource.RLIM_INFINITY)]
    assert check.enough and check.soft == 262144


@pytest.mark.parametrize(("need", "value"), [(1, 65536), (65536, 65536), (65537, 131072), (300_000, 524288)])
def test_suggested_is_a_power_of_two_at_least_65536(need: int, value: int) -> None:
    assert fdlimit.suggested(need) == value


def test_the_real_limits_are_read_without_change() -> None:
    before = resource.getrlimit(resource.RLIMIT_NOFILE)
    check = fdlimit.ensure_nofile(min(before[0], 64))  # already enough: nothing is set
    assert check.enough and not check.raised
    assert resource.getrlimit(resource.RLIMIT_NOFILE) == before
