"""Against real processes: a hostile local user squatting aund's socket,
params nested ~990 deep, and terminal escapes in an app's name.

Item 1 needs two more uids: VICTIM (an ordinary user without XDG_RUNTIME_DIR, as under cron or
`su`) and ATTACKER (another local user). They are bare uids (no /etc/passwd entry is needed, the
kernel only compares numbers; HOME is set explicitly), used by the actors of tests/system/squat.py,
which start as root and drop to their uid after their imports, like test_uid_policy's probes. Runs
as root (the CI does); anywhere else it FAILS rather than skip.

What "refused" means here: the stub raises DaemonUnavailable whose message names the directory (or
the listener's uid) and what to do, and the impostor receives no byte of the victim's hello; the
daemon prints one line and exits non-zero without creating anything in the attacker's directory.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import msgpack
import pytest

import aund
from client_stub import Client, InvalidParams, wire
from tests.helpers import ROOT, AundProcess, read_line, wait_until
from tests.system.harness import aid, start_aund

pytestmark = pytest.mark.timeout(120)

VICTIM, ATTACKER = 65531, 65530
SQUAT = Path(f"/tmp/aund-{VICTIM}")  # where aund <= e4dd994 put the victim's socket without XDG_RUNTIME_DIR
SQUAT_SOCKET = SQUAT / "aund" / "aund.sock"
DEPTH = 990


def _require_root() -> None:
    if os.geteuid() != 0:
        pytest.fail(f"test_local_hostile must run as root (the CI does): it runs processes as uids {VICTIM} and "
                    f"{ATTACKER}; running as uid {os.geteuid()}", pytrace=False)


@pytest.fixture
def box():
    """A world-searchable temp dir with the victim's home (0700) in it; /tmp/aund-<victim> removed
    before and after (nothing else may own that name on a test machine)."""
    _require_root()
    shutil.rmtree(SQUAT, ignore_errors=True)
    base = Path(tempfile.mkdtemp(prefix="aund-hostile-", dir="/tmp"))
    os.chmod(base, 0o755)
    home = base / "home"
    home.mkdir(mode=0o700)
    os.chown(home, VICTIM, VICTIM)
    procs: list[subprocess.Popen] = []
    try:
        yield base, home, procs
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait(10)
            if proc.stdout:
                proc.stdout.close()
        shutil.rmtree(base, ignore_errors=True)
        shutil.rmtree(SQUAT, ignore_errors=True)


def _env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("XDG_RUNTIME_DIR", "XDG_STATE_HOME", "AUND_SOCKET", "AUND_STATE_DIR", "AUND_CONFIG")}
    return {**env, "HOME": str(home), "PYTHONPATH": str(ROOT), "AUND_ENCRYPTION_SEED": "test-seed-not-secret"}


def _actor(procs: list, command: str, cfg: dict, env: dict, stderr) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-m", "tests.system.squat", command, json.dumps(cfg)], cwd=ROOT,
                            env=env, stdout=subprocess.PIPE, stderr=stderr, text=True)
    procs.append(proc)
    return proc


def _squatter(procs: list, socket: Path, dirs: list[Path], home: Path, log: Path) -> subprocess.Popen:
    with open(log, "w") as err:
        proc = _actor(procs, "squatter", {"uid": ATTACKER, "gid": ATTACKER, "socket": str(socket),
                                          "dirs": [str(d) for d in dirs]}, _env(home), err)
    line = read_line(proc, time.monotonic() + 20)
    assert json.loads(line) == {"listening": str(socket)}, line
    return proc


def _heard(squatter: subprocess.Popen) -> list[str]:
    """The ops the impostor received (after killing it)."""
    squatter.kill()
    out, _ = squatter.communicate(timeout=10)
    return [json.loads(x)["got"] for x in out.splitlines() if x.startswith('{"got"')]


def _victim_app(procs: list, home: Path, log: Path, socket: Path | None = None) -> dict:
    cfg = {"uid": VICTIM, "gid": VICTIM, **({"socket": str(socket)} if socket else {})}
    with open(log, "w") as err:
        proc = _actor(procs, "victim", cfg, _env(home), err)
    out, _ = proc.communicate(timeout=60)
    lines = [x for x in out.splitlines() if x.startswith("{")]
    assert proc.returncode == 0 and lines, f"victim app exited {proc.returncode}: {log.read_text()[-2000:]}"
    return json.loads(lines[-1])


def _victim_daemon(procs: list, home: Path, log: Path, *args: str) -> subprocess.Popen:
    with open(log, "w") as err:
        return _actor(procs, "aund", {"uid": VICTIM, "gid": VICTIM, "argv": ["run", *args]}, _env(home), err)


def _events(log: Path) -> list[dict]:
    out = []
    for line in log.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            continue
    return out


def test_stub_will_not_talk_to_a_socket_another_user_planted_in_tmp(box):
    base, home, procs = box
    squatter = _squatter(procs, SQUAT_SOCKET, [SQUAT, SQUAT / "aund"], home, base / "squat.log")
    assert (os.stat(SQUAT).st_uid, os.stat(SQUAT).st_mode & 0o777) == (ATTACKER, 0o777)

    # the default path no longer leads to /tmp: there is no daemon, and the stub says so
    default = _victim_app(procs, home, base / "victim-default.log")
    assert not default["path"].startswith(str(SQUAT)), default
    assert default["path"] == str(home / ".local" / "state" / "aund" / "run" / "aund.sock"), default
    assert default["outcome"] == "DaemonUnavailable", default

    # pointed at the squatted socket explicitly, the stub refuses before sending a byte
    explicit = _victim_app(procs, home, base / "victim-explicit.log", SQUAT_SOCKET)
    assert explicit["outcome"] == "DaemonUnavailable", explicit
    message = explicit["message"]
    assert message.startswith(f"refusing to talk to aund at {SQUAT_SOCKET}: ") and "\n" not in message, message
    assert f"{SQUAT / 'aund'} is writable by others (mode 0777)" in message, message
    assert "XDG_RUNTIME_DIR" in message, message
    assert (explicit["async.outcome"], explicit["async.message"]) == ("DaemonUnavailable", message), explicit

    assert _heard(squatter) == []  # the impostor never got the hello


def test_stub_refuses_a_listener_whose_uid_is_not_root_yours_or_the_directorys_owner(box):
    """SO_PEERCRED: the victim's own private directory, but the socket in it is held by the attacker
    (root moved it there: a rename keeps the listener). The directory check passes; the peer does not."""
    base, home, procs = box
    theirs, mine = base / "attacker-run", base / "victim-run"
    for d, uid, mode in ((theirs, ATTACKER, 0o755), (mine, VICTIM, 0o700)):
        d.mkdir()
        os.chown(d, uid, uid)
        os.chmod(d, mode)
    squatter = _squatter(procs, theirs / "aund.sock", [], home, base / "squat.log")
    os.rename(theirs / "aund.sock", mine / "aund.sock")

    got = _victim_app(procs, home, base / "victim.log", mine / "aund.sock")
    assert got["outcome"] == "DaemonUnavailable", got
    assert f"the process listening on {mine / 'aund.sock'} runs as uid {ATTACKER}, not as root, you (uid {VICTIM})" \
        in got["message"], got
    assert (got["async.outcome"], got["async.message"]) == ("DaemonUnavailable", got["message"]), got
    assert _heard(squatter) == []


def test_victim_daemon_will_not_bind_in_a_squatted_dir_and_its_own_is_accepted(box):
    base, home, procs = box
    # the attacker prepares /tmp/aund-<victim>/aund, world-writable, before the victim's first start
    squatter = _squatter(procs, SQUAT / "decoy.sock", [SQUAT, SQUAT / "aund"], home, base / "squat.log")

    # told to listen there, `aund run` refuses with one line and exits non-zero
    log = base / "aund-explicit.log"
    daemon = _victim_daemon(procs, home, log, "--socket", str(SQUAT_SOCKET))
    wait_until(lambda: daemon.poll() is not None or any(e.get("event") == "daemon.started" for e in _events(log)),
               60, what="the victim's aund to exit or start")
    assert not SQUAT_SOCKET.exists(), "the victim's daemon bound inside the attacker's directory"
    assert daemon.wait(10) != 0
    text = log.read_text()
    last = text.strip().splitlines()[-1]
    assert last.startswith(f"aund run: refusing to listen on {SQUAT_SOCKET}: {SQUAT / 'aund'} is writable by others"), \
        last
    assert "Traceback" not in text, text[-2000:]

    # by default it listens under its own home instead, and its own app is accepted
    log = base / "aund-default.log"
    daemon = _victim_daemon(procs, home, log)
    started = wait_until(lambda: [e for e in _events(log) if e.get("event") == "daemon.started"]
                         or daemon.poll() is not None, 60, what="the victim's aund to start")
    assert isinstance(started, list), log.read_text()[-2000:]
    own = home / ".local" / "state" / "aund" / "run" / "aund.sock"
    assert started[0]["socket"] == str(own), started
    assert not SQUAT_SOCKET.exists()
    got = _victim_app(procs, home, base / "victim.log")
    assert (got["path"], got["outcome"], got.get("daemon_version")) == (str(own), "ok", aund.__version__), got
    assert got["async.outcome"] == "ok", got
    daemon.send_signal(signal.SIGTERM)
    assert daemon.wait(20) == 0
    assert _heard(squatter) == []


# --- item 16: params nested ~990 deep ----------------------------------------------------------------
def _deep(depth: int) -> bytes:
    """msgpack of {"a": {"a": ... {}}} with `depth` maps (built by hand: the packer stops at 512)."""
    return b"\x81\xa1a" * (depth - 1) + b"\x80"


def _request_bytes(request_id: int, op: str, args_head: dict, deep_key: str, depth: int) -> bytes:
    """A req frame whose args are `args_head` plus `deep_key`: a `depth`-deep map."""
    pack = msgpack.packb
    args = bytes([0x80 | (len(args_head) + 1)]) + b"".join(pack(k) + pack(v) for k, v in args_head.items())
    args += pack(deep_key) + _deep(depth)
    body = (b"\x84" + pack("kind") + pack("req") + pack("id") + pack(request_id) + pack("op") + pack(op)
            + pack("args") + args)
    return wire.HEADER.pack(len(body)) + body


class Raw:
    """A blocking raw connection (the stub itself refuses to send such params)."""

    def __init__(self, path: Path) -> None:
        import socket

        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(40)
        self.sock.connect(str(path))
        self.decoder = wire.FrameDecoder(wire.HARD_MAX_FRAME)

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def answer(self, request_id: int):
        while True:
            frame = self.decoder.next_frame()
            if frame is not None:
                msg = wire.validate_reply(frame)
                if getattr(msg, "id", None) == request_id:
                    return msg
                continue
            data = self.sock.recv(65536)
            assert data, f"the daemon closed the connection instead of answering request {request_id}"
            self.decoder.feed(data)

    def request(self, request_id: int, op: str, args: dict):
        self.send(wire.encode_frame(wire.make_request(request_id, op, args)))
        return self.answer(request_id)


def test_params_nested_990_deep_get_invalid_params_and_the_session_lives(devnet, tmp_path):
    me = aid("deep")
    daemon = start_aund(tmp_path, devnet, [me])
    try:
        raw = Raw(daemon.socket)
        assert isinstance(raw.request(1, "hello", wire.make_hello(1, "deep-raw")["args"]), wire.Reply)
        assert isinstance(raw.request(8, "identity.ensure", {"aid": me}), wire.Reply)
        opened = raw.request(2, "session.open", {"aid": me})
        assert isinstance(opened, wire.Reply), opened
        sid = opened.result["session"]
        assert isinstance(raw.request(3, "session.wait_ready", {"session": sid, "timeout": 30}), wire.Reply)

        raw.send(_request_bytes(4, "call", {"session": sid, "method": "meta.ping"}, "params", DEPTH))
        answer = raw.answer(4)
        assert isinstance(answer, wire.ErrorReply), answer
        exc = answer.exception()
        assert isinstance(exc, InvalidParams) and exc.data == {"arg": "args", "max_depth": wire.MAX_DEPTH}, exc
        raw.send(_request_bytes(5, "identity.ensure", {"aid": me}, "extra", DEPTH))
        assert isinstance(raw.answer(5).exception(), InvalidParams)

        # the same connection and session go on working
        pong = raw.request(6, "call", {"session": sid, "method": "meta.ping", "params": {}, "timeout": 20})
        assert isinstance(pong, wire.Reply) and pong.result.get("pong") is True, pong
        assert isinstance(raw.request(7, "ping", {}), wire.Reply)

        # the stub refuses such params itself, and its connection is unharmed too
        with Client(daemon.socket, app="deep-stub") as client:
            session = client.session(me)
            session.wait_ready(30)
            params: dict = {}
            node = params
            for _ in range(DEPTH):
                node["a"] = {}
                node = node["a"]
            with pytest.raises(InvalidParams, match="nested more than 64"):
                session.call("meta.ping", params)
            assert session.call("meta.ping", {}, timeout=20).get("pong") is True
        raw.sock.close()
    finally:
        assert daemon.stop() == 0
    text = daemon.log_path.read_text()
    assert "Traceback" not in text and "RecursionError" not in text, text[-3000:]
    assert not [e for e in daemon.log_events() if e.get("level") in ("error", "critical")]


# --- item 17: terminal escapes in peer-supplied text ------------------------------------------------
def test_status_prints_control_characters_of_an_app_name_escaped(tmp_path):
    evil = "evil\x1b[2J\x1b]0;pwned\x07\nforged-row \u202egnp.exe\x9b"
    daemon = AundProcess(tmp_path / "state", tmp_path / "aund.sock")
    daemon.start()
    try:
        with Client(daemon.socket, app=evil) as client:
            client.ping()
            done = subprocess.run([sys.executable, "-m", "aund", "status", "--socket", str(daemon.socket)],
                                  cwd=ROOT, capture_output=True, text=True, timeout=30)
            as_json = subprocess.run([sys.executable, "-m", "aund", "status", "--json", "--socket",
                                      str(daemon.socket)], cwd=ROOT, capture_output=True, text=True, timeout=30)
    finally:
        assert daemon.stop() == 0
    assert done.returncode == 0, done.stderr
    out = done.stdout
    for raw in ("\x1b", "\x07", "\x9b", "\u202e"):
        assert raw not in out, (raw, out)
    assert not any(line.startswith("forged-row") for line in out.splitlines()), out
    rows = [line for line in out.splitlines() if "evil" in line]
    assert len(rows) == 1 and "evil\\x1b[2J\\x1b]0;pwned\\x07\\nforged-row \\u202egnp.exe\\x9b" in rows[0], out
    names = [a.get("app_name") or a.get("app") for a in json.loads(as_json.stdout)["broker"]["apps"]]
    assert evil in names  # --json carries the name intact (JSON escapes it)
