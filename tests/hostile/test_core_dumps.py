"""A core dump would hold the seed, private keys and tokens, so there is none:
the daemon makes itself non-dumpable (PR_SET_DUMPABLE 0) with RLIMIT_CORE 0 (soft and hard), even
when started from a shell with `ulimit -c unlimited`, and the systemd unit says LimitCORE=0."""
from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from tests.hostile.common import daemon_user, require_root, shared_dir, unit, user_daemon

pytestmark = pytest.mark.timeout(60)


def _limits(pid: int) -> tuple[str, str]:
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max core file size"):
            soft, hard = re.split(r"\s{2,}", line.strip())[1:3]
            return soft, hard
    raise AssertionError("no core size line in /proc/PID/limits")


def _uids(pid: int) -> list[int]:
    line = next(x for x in Path(f"/proc/{pid}/status").read_text().splitlines() if x.startswith("Uid:"))
    return [int(v) for v in line.split()[1:]]


def test_daemon_is_not_dumpable_and_has_no_core_limit():
    require_root("the daemon runs as a second uid, where /proc shows whether it is dumpable")
    uid, gid = daemon_user()
    with shared_dir("aund-core-") as base:
        daemon = user_daemon(base, uid, gid, prelude="ulimit -c unlimited")  # an operator's permissive shell
        daemon.start()
        try:
            pid = daemon.proc.pid
            assert _uids(pid) == [uid] * 4  # the daemon itself, exec'ed as the other uid
            # proc(5): the files of /proc/PID are root:root instead of the process's uid exactly when
            # its dumpable attribute is not 1 (PR_SET_DUMPABLE 0); they are the uid's otherwise
            st = os.stat(f"/proc/{pid}/status")
            assert (st.st_uid, st.st_gid) == (0, 0), f"/proc/{pid}/status is {st.st_uid}:{st.st_gid}: dumpable"
            assert _limits(pid) == ("0", "0"), _limits(pid)
        finally:
            assert daemon.stop() == 0


def test_systemd_unit_sets_limit_core_zero():
    assert unit("aund.service").get("Service", "LimitCORE", fallback=None) == "0"
