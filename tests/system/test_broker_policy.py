"""The policy against apps of other uids, with real processes.

- 3: SIGHUP reloads `[policy]` (validated as at start; an invalid one is refused and the old one
  stays) and takes away what it no longer allows: a uid that lost one AID loses that AID's
  session, subscription and call in flight, and keeps the other; a uid no longer admitted has its
  connection ended with PermissionDenied and new connections refused.
- 8: a subscribe-only app (`aund listen`) holds its AID's link past the idle timeout and receives
  a message sent afterwards.
- 9: `aund status` run by an admitted non-root uid shows only its AIDs and its own apps.
- 15: `identity.ensure` of a name with the Kelvin sign (U+212A, which folds to `k`) is decided
  by the normalised name.
- 18: a uid admitted only through a supplementary group (`groupadd`, SO_PEERGROUPS) is admitted,
  also with 300 supplementary groups (more than CPython's getsockopt buffer holds).

Like test_uid_policy (whose socket-directory setup this shares, see its docstring): runs as root
and FAILS elsewhere; apps start as root and drop to the other uid/gid/groups before connecting.
"""
from __future__ import annotations

import grp
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from client_stub import Client
from tests.helpers import ROOT, AundProcess, DevnetProcess, wait_until
from tests.system.harness import (
    NOGROUP,
    aid,
    finish,
    group_socket_dir,
    kill_all,
    run_cli_as,
    shared_work_dir,
    spawn_app,
    start_aund,
    wait_file,
    write_config,
)

pytestmark = pytest.mark.timeout(150)

NOBODY = 65534
STRANGER = 65533
GROUPIE = 65530  # named by no rule: admitted only through a supplementary group


def _require_root() -> None:
    if os.geteuid() != 0:
        pytest.fail("test_broker_policy must run as root (the CI does): it starts apps under other uids "
                    f"and groups; running as uid {os.geteuid()}", pytrace=False)


def _probe(sock: Path, work: Path, uid: int, steps: list[dict[str, Any]], log: Path, *,
           groups: list[int] | None = None, gid: int = NOGROUP):
    return spawn_app("policy-probe", {"socket": str(sock), "work": str(work), "uid": uid, "gid": gid,
                                      "groups": groups or [], "steps": steps}, log)


def _run_probe(sock: Path, work: Path, uid: int, steps: list[dict[str, Any]], log: Path, **kw: Any) -> dict:
    proc = _probe(sock, work, uid, steps, log, **kw)
    try:
        return finish(proc, 90, log)
    finally:
        kill_all([proc])


def _events(daemon: AundProcess, name: str) -> list[dict[str, Any]]:
    return [e for e in daemon.log_events() if e.get("event") == name]


def _sighup(daemon: AundProcess, devnet: DevnetProcess, aids: list[str], policy: dict[str, Any]) -> dict:
    """Rewrite the config file with `policy`, SIGHUP the daemon and wait for its answer (the
    `daemon.reloaded` or `daemon.reload_failed` line that follows)."""
    assert daemon.config_file is not None and daemon.proc is not None
    before = len(_events(daemon, "daemon.reloaded")) + len(_events(daemon, "daemon.reload_failed"))
    write_config(daemon.config_file, devnet, aids, policy)
    daemon.proc.send_signal(signal.SIGHUP)
    wait_until(lambda: len(_events(daemon, "daemon.reloaded")) + len(_events(daemon, "daemon.reload_failed"))
               > before, 20, what="the daemon's answer to SIGHUP")
    return [e for e in daemon.log_events() if e.get("event") in ("daemon.reloaded", "daemon.reload_failed")][-1]


# --- 3 -------------------------------------------------------------------------------------------
def test_sighup_reloads_the_policy_and_takes_away_what_it_no_longer_allows(devnet, tmp_path):
    _require_root()
    a, b, sender = aid("rla"), aid("rlb"), aid("rls")
    aids = [a, b, sender]
    v1 = {a: {"uids": [NOBODY]}, b: {"uids": [NOBODY]}}
    with group_socket_dir() as sock, shared_work_dir() as work:
        daemon = start_aund(tmp_path, devnet, aids, socket=sock, policy=v1)
        probe = None
        try:
            with Client(sock, app="monitor") as monitor:
                for x in aids:
                    monitor.ensure_identity(x)
                steps = [
                    {"op": "connect"},
                    {"op": "open", "aid": a, "as": "open.a"}, {"op": "open", "aid": b, "as": "open.b"},
                    {"op": "subscribe", "aid": a, "as": "sub.a"}, {"op": "subscribe", "aid": b, "as": "sub.b"},
                    {"op": "touch", "file": "ready"},
                    {"op": "wait", "file": "go-call"},
                    {"op": "call_bg", "aid": b, "method": "meta.ping", "timeout": 60, "as": "inflight.b"},
                    {"op": "touch", "file": "calling"},
                    {"op": "wait", "file": "go-1"},  # b was taken from this uid
                    {"op": "join", "name": "inflight.b", "as": "inflight.b.result"},
                    {"op": "ended", "aid": b, "seconds": 10, "as": "sub.b.end"},
                    {"op": "call", "aid": b, "method": "meta.ping", "as": "call.b.after"},
                    {"op": "ensure", "aid": b, "as": "ensure.b.after"},
                    {"op": "call", "aid": a, "method": "meta.ping", "as": "call.a.after"},
                    {"op": "report", "file": "phase-1"},
                    {"op": "wait", "file": "go-2"},  # a message to a is on its way
                    {"op": "await_event", "aid": a, "seconds": 30, "as": "sub.a.alive"},
                    {"op": "touch", "file": "phase-2"},
                    {"op": "wait", "file": "go-3"},  # an invalid policy was refused
                    {"op": "call", "aid": a, "method": "meta.ping", "as": "call.a.invalid"},
                    {"op": "touch", "file": "phase-3"},
                    {"op": "wait", "file": "go-4"},  # this uid is no longer admitted at all
                    {"op": "ended", "aid": a, "seconds": 10, "as": "sub.a.end"},
                    {"op": "call", "aid": a, "method": "meta.ping", "as": "call.a.removed"},
                    {"op": "fresh_connect", "as": "connect.removed"},
                ]
                probe = _probe(sock, work, NOBODY, steps, tmp_path / "probe.log")
                wait_file(work / "ready", 60)

                # a call of b in flight (the gateway holds every reply 15 s) when b is taken away
                devnet.set_faults(reply_delay_ms=15000)
                (work / "go-call").touch()
                wait_file(work / "calling", 20)
                wait_until(lambda: monitor.status()["broker"]["calls_in_flight"] >= 1, 10, what="the call in flight")
                reloaded = _sighup(daemon, devnet, aids, {a: {"uids": [NOBODY]}})
                assert reloaded["event"] == "daemon.reloaded", reloaded
                devnet.set_faults(reply_delay_ms=0)
                (work / "go-1").touch()
                wait_file(work / "phase-1", 60)
                got = json.loads((work / "phase-1").read_text())
                for step in ("connect", "open.a", "open.b", "sub.a", "sub.b", "call.a.after"):
                    assert got[step] == "ok", (step, got)
                # b taken away: the call in flight answers at once (not after the gateway's 15 s), the
                # subscription ends, the session and new requests are refused; a is untouched
                assert got["inflight.b.result"] == "PermissionDenied" and got["inflight.b.result.seconds"] < 10, got
                assert got["sub.b.end.how"] == "PermissionDenied", got
                assert got["call.b.after"] == "PermissionDenied" and got["ensure.b.after"] == "PermissionDenied", got

                sent = monitor.session(sender).call("message.send", {"to": a, "payload": {"type": "text", "text": "after reload"}},
                                                    timeout=30)
                assert sent.get("message_id"), sent
                (work / "go-2").touch()
                wait_file(work / "phase-2", 60)

                # invalid: names an unknown user, and would take a away too if it were applied
                failed = _sighup(daemon, devnet, aids, {b: {"uids": ["no-such-user-aund-test"]}})
                assert failed["event"] == "daemon.reload_failed", failed
                assert "no-such-user-aund-test" in failed["error"] and "policy" in failed["error"], failed
                (work / "go-3").touch()
                wait_file(work / "phase-3", 60)

                reloaded = _sighup(daemon, devnet, aids, {b: {"uids": [STRANGER]}})
                assert reloaded["event"] == "daemon.reloaded", reloaded
                (work / "go-4").touch()
                got = finish(probe, 60, tmp_path / "probe.log")

                for step in ("sub.a.alive", "call.a.invalid"):
                    assert got[step] == "ok", (step, got)
                # the uid removed: its connection ended, and a new one is refused
                assert got["sub.a.end.how"] == "PermissionDenied", got
                assert got["call.a.removed"] == "PermissionDenied" and got["connect.removed"] == "PermissionDenied", got

                assert [e.get("policy_changed") for e in _events(daemon, "daemon.reloaded")] == [True, True]
                revoked = _events(daemon, "broker.access_revoked")
                by_aid = [e for e in revoked if e.get("scope") == "aid"]
                assert by_aid and by_aid[0]["aids"] == [b] and by_aid[0]["uid"] == NOBODY, revoked
                assert by_aid[0]["sessions"] == 1 and by_aid[0]["subscriptions"] == 1 and by_aid[0]["requests"] >= 1
                assert any(e.get("scope") == "connection" and e["uid"] == NOBODY for e in revoked), revoked
                assert any(e.get("reason") == "policy" and e.get("uid") == NOBODY
                           for e in _events(daemon, "broker.connection_rejected"))
                # nothing of the probe is held any more
                wait_until(lambda: not [x for x in monitor.status()["broker"]["apps"] if x["uid"] == NOBODY], 10,
                           what="the probe's connections to go")
        finally:
            kill_all([probe])
            devnet.set_faults(reply_delay_ms=0)
            assert daemon.stop() == 0


# --- 8 -------------------------------------------------------------------------------------------
def test_a_subscribe_only_app_keeps_its_link_past_the_idle_timeout(devnet, tmp_path):
    listener, other, sender = aid("lsn"), aid("lso"), aid("lss")
    daemon = start_aund(tmp_path, devnet, [sender], extra={"idle_link_seconds": 1})
    listen = None
    try:
        with Client(daemon.socket, app="monitor") as monitor:
            sessions = []
            for x in (listener, other):  # both on demand, then let go: they would close after 1 s
                monitor.ensure_identity(x)
                s = monitor.session(x)
                s.wait_ready(30)
                sessions.append(s)
            listen = subprocess.Popen([sys.executable, "-m", "aund", "listen", listener, "--socket",
                                       str(daemon.socket), "--count", "1", "--json"], cwd=ROOT,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            wait_until(lambda: any(x["app"] == "aund-cli listen" and x["subscriptions"] == 1
                                   for x in monitor.status()["broker"]["apps"]), 30, what="aund listen's subscription")
            for s in sessions:
                s.close()
            # the reaper ran past the idle timeout: it closed the other on-demand link ...
            wait_until(lambda: any(e.get("aid") == other for e in _events(daemon, "link.idle_close")), 20,
                       what="the other idle link to close")
            # ... and not the one aund listen subscribes to
            assert not [e for e in _events(daemon, "link.idle_close") if e.get("aid") == listener]
            held = [x for x in monitor.status()["links"] if x["aid"] == listener]
            assert held and held[0]["holders"] == 1 and held[0]["state"] == "ready", held
            sent = monitor.session(sender).call("message.send", {"to": listener, "payload": {"type": "text", "text": "still here?"}},
                                                timeout=30)
            out, err = listen.communicate(timeout=30)
            assert listen.returncode == 0, err
            event = json.loads(out.splitlines()[-1])
            assert event["kind"] == "message.received" and event["data"]["message_id"] == sent["message_id"], event
            # the subscription ended with aund listen: the link is nobody's any more and closes
            wait_until(lambda: any(e.get("aid") == listener for e in _events(daemon, "link.idle_close")), 20,
                       what="the listener's link to close once aund listen left")
    finally:
        if listen is not None and listen.poll() is None:
            listen.kill()
            listen.communicate(timeout=10)
        assert daemon.stop() == 0


# --- 9 -------------------------------------------------------------------------------------------
def test_status_shows_a_non_root_uid_only_its_aids_and_apps(devnet, tmp_path):
    _require_root()
    mine, theirs = aid("stmine"), aid("sttheirs")
    with group_socket_dir() as sock:
        daemon = start_aund(tmp_path, devnet, [mine, theirs], socket=sock, policy={mine: {"uids": [NOBODY]}})
        try:
            with Client(sock, app="owner-monitor") as monitor:
                wait_until(lambda: len([x for x in monitor.status()["links"] if x["state"] == "ready"]) == 2, 30,
                           what="both links ready")
                run = run_cli_as(NOBODY, NOGROUP, ["status", "--json", "--socket", str(sock)])
                assert run.returncode == 0, run.stderr
                seen = json.loads(run.stdout)
                assert [x["aid"] for x in seen["links"]] == [mine], seen["links"]
                assert set(seen["inbox"]) <= {mine} and seen["identities"] == 1, seen
                assert seen["broker"]["apps"] and {x["uid"] for x in seen["broker"]["apps"]} == {NOBODY}, seen["broker"]
                assert seen["view"] == {"uid": NOBODY, "all": False}
                assert all(w.get("aid") in (None, mine) for w in seen["warnings"]), seen["warnings"]

                text = run_cli_as(NOBODY, NOGROUP, ["status", "--socket", str(sock)])
                assert text.returncode == 0, text.stderr
                assert mine in text.stdout and theirs not in text.stdout and "owner-monitor" not in text.stdout
                assert f"only what uid {NOBODY} may use" in text.stdout, text.stdout

                full = monitor.status()  # root sees everything
                assert {x["aid"] for x in full["links"]} == {mine, theirs} and full["view"]["all"] is True
                assert "owner-monitor" in {x["app"] for x in full["broker"]["apps"]}
        finally:
            assert daemon.stop() == 0


# --- 15 ------------------------------------------------------------------------------------------
def test_identity_ensure_is_authorised_by_the_normalised_name(devnet, tmp_path):
    _require_root()
    granted, refused = aid("kelvinok"), aid("kelvinno")
    kelvin = "\u212a"  # KELVIN SIGN: lower() folds it to "k"
    granted_k, refused_k = kelvin + granted[1:], kelvin + refused[1:]
    # the refused rule matches the raw name (its first character is not "k") and not the normalised one
    policy = {granted: {"uids": [NOBODY]}, "[!k]" + refused[1:]: {"uids": [NOBODY]}}
    with group_socket_dir() as sock, shared_work_dir() as work:
        daemon = start_aund(tmp_path, devnet, [], socket=sock, policy=policy)
        try:
            got = _run_probe(sock, work, NOBODY, [
                {"op": "connect"},
                {"op": "ensure", "aid": granted_k, "as": "ensure.granted"},
                {"op": "open", "aid": granted_k, "as": "open.granted"},
                {"op": "subscribe", "aid": granted_k, "as": "subscribe.granted"},
                {"op": "ensure", "aid": refused_k, "as": "ensure.refused"},
                {"op": "open", "aid": refused_k, "as": "open.refused"},
            ], tmp_path / "probe.log")
            assert got["connect"] == "ok", got
            assert got["ensure.granted"] == "ok" and got["ensure.granted.aid"] == granted, got
            assert got["open.granted"] == "ok" and got["subscribe.granted"] == "ok", got
            assert got["ensure.refused"] == "PermissionDenied" and got["open.refused"] == "PermissionDenied", got
            with Client(sock, app="owner") as owner:
                listed = {i["aid"] for i in owner.list_identities()}
            assert granted in listed and refused not in listed, listed  # nothing registered for the refused name
            denied = _events(daemon, "broker.permission_denied")
            assert {e["aid"] for e in denied} == {refused}, denied  # logged by the normalised name
        finally:
            assert daemon.stop() == 0


# --- 18 ------------------------------------------------------------------------------------------
def test_a_uid_admitted_only_by_a_supplementary_group(devnet, tmp_path):
    _require_root()
    group = f"aundpt{os.getpid() % 100000}"
    made = subprocess.run(["groupadd", group], capture_output=True, text=True, check=False)
    assert made.returncode == 0, f"groupadd {group}: {made.stderr}"
    try:
        gid = grp.getgrnam(group).gr_gid
        a = aid("grp")
        with group_socket_dir() as sock, shared_work_dir() as work:
            daemon = start_aund(tmp_path, devnet, [], socket=sock, policy={a: {"gids": [group]}})
            try:
                steps = [{"op": "connect"}, {"op": "ensure", "aid": a, "as": "ensure"},
                         {"op": "open", "aid": a, "as": "open"}]
                member = _run_probe(sock, work, GROUPIE, steps, tmp_path / "member.log", groups=[gid])
                assert member["groups"] == [gid] and member["gid"] == [NOGROUP] * 3, member
                assert member["connect"] == "ok" and member["ensure"] == "ok" and member["open"] == "ok", member
                # 300 supplementary groups, the granting one last: more than one getsockopt() of CPython reads
                many = [g for g in range(70000, 70300) if g != gid][:299] + [gid]
                crowd = _run_probe(sock, work, GROUPIE, steps[:2], tmp_path / "crowd.log", groups=many)
                assert len(crowd["groups"]) == 300 and crowd["connect"] == "ok" and crowd["ensure"] == "ok", crowd
                # the same uid without the group is refused at connect
                alone = _run_probe(sock, work, GROUPIE, steps[:1], tmp_path / "alone.log")
                assert alone["groups"] == [] and alone["connect"] == "PermissionDenied", alone
            finally:
                assert daemon.stop() == 0
    finally:
        subprocess.run(["groupdel", group], capture_output=True, check=False)
