"""The daemon decides per uid which AIDs an app may use (SO_PEERCRED + `[policy]`).

Runs as root (the CI does) so that it can start apps under other uids; anywhere else it FAILS,
loudly, rather than skip.

How the app reaches the socket: the daemon makes its socket 0660 and, when it creates the
socket's directory, 0750, both owned by the daemon's uid/gid (root). Rather than loosening those
modes after the fact, the test does what an admin does for a system service (systemd's
`RuntimeDirectory=` with a `Group=`): it creates the socket directory beforehand, owned by
root:nogroup with mode 2750 (setgid), under /tmp (whose other ancestors are world-searchable).
The daemon keeps an existing directory's mode, and the setgid bit makes the socket file inherit
the directory's group, so members of `nogroup` (gid 65534) can traverse the directory and
connect, and nobody else can. Who may act as which AID is then the policy's call alone:
`nobody` (uid 65534) is granted one AID and not the other.

The probe apps start as root and drop to the other uid/gid for good (setgroups([]), setgid,
setuid) right after their imports and before they connect, since the test's interpreter may live
where the other uid cannot exec it (here under /root, mode 0700); SO_PEERCRED records the
credentials at connect(), so the daemon sees the other uid exactly as if it had been exec'ed so.
"""
from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from client_stub import Client
from tests.system.harness import (
    aid,
    finish,
    group_socket_dir,
    kill_all,
    spawn_app,
    start_aund,
)

pytestmark = pytest.mark.timeout(90)

NOBODY, NOGROUP = 65534, 65534
STRANGER = 65533  # a uid the policy does not name (primary gid nogroup: it can reach the socket)
OUTSIDER = 65532  # neither in the policy nor in the socket's group: cannot even open the socket


def _require_root() -> None:
    if os.geteuid() != 0:
        pytest.fail("test_uid_policy must run as root (the CI does): it starts apps under other uids "
                    f"(setresuid to {NOBODY}) to test aund's per-uid policy; running as uid {os.geteuid()}",
                    pytrace=False)


def _probe(sock: Path, allowed: str, denied: str, uid: int, gid: int, log: Path) -> dict:
    proc = spawn_app("uid-probe", {"socket": str(sock), "allowed": allowed, "denied": denied, "uid": uid,
                                   "gid": gid}, log)
    try:
        return finish(proc, 60, log)
    finally:
        kill_all([proc])


def test_other_uid_gets_only_the_aids_the_policy_grants(devnet, tmp_path):
    _require_root()
    allowed, denied = aid("uidok"), aid("uidno")
    with group_socket_dir(NOGROUP) as sock:
        daemon = start_aund(tmp_path, devnet, [allowed, denied], socket=sock,
                            policy={allowed: {"uids": [NOBODY]}})
        try:
            st = os.stat(sock)
            assert stat.S_IMODE(st.st_mode) == 0o660 and st.st_gid == NOGROUP, (oct(st.st_mode), st.st_gid)
            assert stat.S_IMODE(os.stat(sock.parent).st_mode) == 0o2750  # the daemon kept the admin's mode
            with Client(sock, app="owner") as owner:  # root (an owner) may use both
                for a in (allowed, denied):
                    owner.ensure_identity(a)
                    owner.session(a).wait_ready(30)

            got = _probe(sock, allowed, denied, NOBODY, NOGROUP, tmp_path / "probe-nobody.log")
            assert (got["uid"], got["gid"], got["groups"]) == ([NOBODY] * 3, [NOGROUP] * 3, [])
            assert got["connect"] == "ok" and got["ping"] == "ok"
            assert got["listed"] == [allowed]  # identity.list shows only what it may use
            for step in ("ensure.allowed", "open.allowed", "call.allowed", "subscribe.allowed"):
                assert got[step] == "ok", (step, got)
            for step in ("ensure.denied", "open.denied", "subscribe.denied", "ack.denied"):
                assert got[step] == "PermissionDenied", (step, got)

            # a uid the policy does not name is refused at connect, though it can reach the socket
            stranger = _probe(sock, allowed, denied, STRANGER, NOGROUP, tmp_path / "probe-stranger.log")
            assert stranger["connect"] == "PermissionDenied", stranger

            # a uid outside the socket's group cannot open the socket at all: a clear hint, no hang
            outsider = _probe(sock, allowed, denied, OUTSIDER, OUTSIDER, tmp_path / "probe-outsider.log")
            assert outsider["connect"] == "DaemonUnavailable", outsider
            assert "may not open" in (outsider.get("connect.hint") or ""), outsider

            refused = [e for e in daemon.log_events() if e.get("event") == "broker.permission_denied"]
            assert {e.get("aid") for e in refused} == {denied} and all(e.get("uid") == NOBODY for e in refused)
            assert any(e.get("event") == "broker.connection_rejected" and e.get("uid") == STRANGER
                       for e in daemon.log_events())
        finally:
            assert daemon.stop() == 0
