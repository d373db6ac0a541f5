"""The CLI as people and scripts use it: real daemon and devnet processes, real exit codes."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from tests.helpers import ROOT, wait_until

pytestmark = pytest.mark.timeout(180)


def aund(*args: str, env: dict | None = None, timeout: float = 60, stdin: str | None = None):
    return subprocess.run([sys.executable, "-m", "aund", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, input=stdin, env=dict(os.environ, **(env or {})))


@pytest.fixture
def daemon(aund_on_devnet):
    aid = f"cli-{os.getpid() % 10000}.aid.test"
    proc = aund_on_devnet([aid])
    proc.aid = aid
    return proc


def _ready(daemon):
    r = aund("health", "--socket", str(daemon.socket))
    return r.returncode == 0


def test_health_exit_codes(devnet, daemon, tmp_path):
    wait_until(lambda: _ready(daemon), 30, 0.2, "healthy")
    r = aund("health", "--socket", str(daemon.socket), "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["healthy"] is True
    devnet.kill()  # the gateway goes away: the configured link cannot be ready
    wait_until(lambda: aund("health", "--socket", str(daemon.socket)).returncode == 1, 30, 0.2, "unhealthy")
    r = aund("health", "--socket", str(daemon.socket), "--json")
    body = json.loads(r.stdout)
    assert r.returncode == 1 and body["healthy"] is False
    assert any(reason["code"] == "link.not_ready" and reason["aid"] == daemon.aid for reason in body["reasons"])
    r = aund("health", "--socket", str(tmp_path / "nobody.sock"))
    assert r.returncode == 2 and "cannot connect to aund" in r.stderr
    devnet.start()
    wait_until(lambda: _ready(daemon), 60, 0.2, "healthy again")


def test_status_call_aid_and_listen(daemon):
    wait_until(lambda: _ready(daemon), 30, 0.2, "healthy")
    sock = str(daemon.socket)
    status = json.loads(aund("status", "--socket", sock, "--json").stdout)
    link = next(link for link in status["links"] if link["aid"] == daemon.aid)
    assert link["state"] == "ready" and link["pinned"] is True
    human = aund("status", "--socket", sock).stdout
    assert daemon.aid in human and "ready" in human
    r = aund("call", daemon.aid, "meta.status", "--socket", sock)
    assert r.returncode == 0 and json.loads(r.stdout)["aid"] == daemon.aid
    bad = aund("call", daemon.aid, "message.v2.pull", '{"sender_aid": "x1234.aid.test"}', "--socket", sock)
    assert bad.returncode == 1 and "InvalidParams" in bad.stderr
    other = f"peer-{os.getpid() % 10000}.aid.test"
    r = aund("aid", "ensure", other, "--socket", sock, "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["aid"] == other
    listing = aund("aid", "list", "--socket", sock, "--json")
    assert {i["aid"] for i in json.loads(listing.stdout)} >= {daemon.aid, other}
    listener = subprocess.Popen([sys.executable, "-m", "aund", "listen", daemon.aid, "--socket", sock, "--json",
                                 "--count", "1", "--kind", "message.received"], cwd=ROOT, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
    time.sleep(0.5)  # listen starts "from now": let it subscribe first
    sent = aund("call", other, "message.send", json.dumps({"to": daemon.aid, "payload": {"type": "text",
                                                                                         "text": "via cli"}}),
                "--socket", sock)
    assert sent.returncode == 0, sent.stderr
    out, err = listener.communicate(timeout=30)
    event = json.loads(out.splitlines()[0])
    assert event["kind"] == "message.received" and event["data"]["payload"]["text"] == "via cli"
    assert event["data"]["encrypted"] is True


def test_config_show_names_sources(tmp_path):
    cfg = tmp_path / "aund.toml"
    cfg.write_text('gateway_url = ["ws://127.0.0.1:9/aun"]\ncall_timeout = 12\n')
    r = aund("config", "show", "--config", str(cfg), "--json",
             env={"AUND_STATE_DIR": str(tmp_path / "s"), "AUND_ENCRYPTION_SEED": "must-not-appear"})
    assert r.returncode == 0
    shown = json.loads(r.stdout)
    assert shown["call_timeout"] == {"value": 12.0, "source": str(cfg)}
    assert shown["state_dir"]["source"] == "environment AUND_STATE_DIR"
    assert shown["slot_id"]["source"] == "default"
    assert "must-not-appear" not in r.stdout
    cfg.write_text("gateway_urls = 3\n")  # unknown key
    r = aund("config", "show", "--config", str(cfg))
    assert r.returncode == 1 and "unknown key 'gateway_urls'" in r.stderr and str(cfg) in r.stderr
    cfg.write_text('call_timeout = "soon"\n')  # wrong type
    r = aund("config", "show", "--config", str(cfg))
    assert r.returncode == 1 and "call_timeout" in r.stderr


def test_demo_runs_and_cleans_up():
    r = aund("demo", timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "bob -> alice: 'hello alice' (delivered" in r.stdout
    assert "alice <- bob" in r.stdout and "encrypted=True" in r.stdout and "'app': 'demo-bob'" in r.stdout
    assert "bob <- alice" in r.stdout and "cleaned up" in r.stdout
    tmp_line = next(x for x in r.stdout.splitlines() if "state in" in x)
    tmp_dir = tmp_line.rsplit("state in ", 1)[1].rstrip(")")
    assert not os.path.exists(tmp_dir)


def test_sigterm_lets_in_flight_calls_finish_and_refuses_new_apps(devnet, daemon):
    """Graceful stop: a call already on its way is answered; a new app is told aund is stopping."""
    import threading

    from client_stub import Client, NotReady

    wait_until(lambda: _ready(daemon), 30, 0.2, "healthy")
    devnet.set_faults(reply_delay_ms=1500)  # the call is still in flight when SIGTERM arrives
    result = {}

    def slow_call():
        with Client(daemon.socket) as c:
            result["reply"] = c.session(daemon.aid).call("meta.status", {}, timeout=20)

    caller = threading.Thread(target=slow_call)
    caller.start()
    time.sleep(0.5)
    daemon.proc.send_signal(15)
    time.sleep(0.2)
    with pytest.raises(NotReady):
        with Client(daemon.socket, reconnect_attempts=0) as late:
            late.ping()
    caller.join(20)
    assert result["reply"]["aid"] == daemon.aid
    assert daemon.proc.wait(20) == 0
    devnet.set_faults(reply_delay_ms=0)
