"""Conditions a person causes get one line naming the thing and what to do, never a traceback:
a port in use, a state dir that cannot exist, a reader that goes away (`| head`); and
`aund --version`. Real `aund` processes."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from importlib import metadata

import pytest

from tests.helpers import ROOT

pytestmark = pytest.mark.timeout(60)


def aund(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "aund", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=40, env=dict(os.environ, **(env or {})))


def _one_line(r: subprocess.CompletedProcess, *words: str) -> str:
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    assert all(w in lines[0] for w in words), lines[0]
    return lines[0]


def test_version():
    r = aund("--version")
    assert r.returncode == 0 and r.stdout.strip() == f"aund {metadata.version('aund')}"


def test_devnet_port_in_use_is_one_line(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        listen = f"127.0.0.1:{taken.getsockname()[1]}"
        r = aund("devnet", "--listen", listen, "--state-dir", str(tmp_path / "dv"))
    assert r.returncode == 1
    _one_line(r, "aund devnet", f"cannot listen on {listen}", "in use")


@pytest.mark.parametrize("command", ["devnet", "run"])
def test_a_state_dir_that_cannot_exist_is_named(tmp_path, command):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    bad = blocker / "state"
    extra = ["--listen", "127.0.0.1:0"] if command == "devnet" else ["--socket", str(tmp_path / "s.sock")]
    r = aund(command, "--state-dir", str(bad), *extra, env={"AUND_ENCRYPTION_SEED": "x"})
    assert r.returncode in (1, 2)
    _one_line(r, f"aund {command}", str(blocker), "not a directory")


def test_a_reader_that_goes_away_ends_the_command_quietly(tmp_path):
    """`aund config show | true`: the reader is gone before aund writes a byte."""
    cmd = f"{sys.executable} -m aund config show 2>{tmp_path}/err | true; echo ${{PIPESTATUS[0]}}"
    r = subprocess.run(["bash", "-c", cmd], cwd=ROOT, capture_output=True, text=True, timeout=40)
    status = int(r.stdout.strip().splitlines()[-1])
    err = (tmp_path / "err").read_text()
    assert status in (0, 141), (status, err)  # done, or ended by SIGPIPE as cat or ls would be
    assert "Traceback" not in err and "BrokenPipe" not in err, err


def test_metrics_in_openmetrics_and_node_exporter_textfile(aund_on_devnet, tmp_path):
    from prometheus_client.openmetrics.parser import text_string_to_metric_families

    from aund.aun.link import LinkState
    from aund.cli.metrics import LINK_STATES
    from client_stub import Client

    assert set(LINK_STATES) == {s.value for s in LinkState}
    aid = f"metrics-{os.getpid() % 10000}.aid.test"
    daemon = aund_on_devnet([aid])
    try:
        with Client(daemon.socket) as app:
            app.ensure_identity(aid)
            s = app.session(aid)
            s.wait_ready(timeout=30)
            s.call("message.send", {"to": aid, "payload": {"type": "text", "text": "to myself"}, "encrypt": False})
            r = aund("metrics", "--socket", str(daemon.socket))
            assert r.returncode == 0, r.stderr
            families = {f.name: f for f in text_string_to_metric_families(r.stdout)}  # strict: ends with # EOF
            ready = [x for x in families["aund_links"].samples if x.labels == {"state": "ready"}]
            assert ready[0].value == 1
            rpcs = [x for x in families["aund_link_rpcs"].samples if x.labels.get("aid") == aid]
            assert rpcs and rpcs[0].name == "aund_link_rpcs_total" and rpcs[0].value >= 1
            assert families["aund_up"].samples[0].value == 1
            prom = tmp_path / "textfile" / "aund.prom"
            prom.parent.mkdir()
            r = aund("metrics", "--socket", str(daemon.socket), "--textfile", str(prom))
            assert r.returncode == 0 and "aund_links{state=\"ready\"} 1.0" in prom.read_text()
            r = aund("metrics", "--socket", str(daemon.socket), "--textfile", str(tmp_path / "nowhere" / "a.prom"))
            _one_line(r, "aund metrics", str(tmp_path / "nowhere"))
    finally:
        daemon.stop()


def test_listen_says_what_is_wrong_instead_of_waiting_forever(aund_on_devnet, tmp_path):

    daemon = aund_on_devnet()
    try:
        r = aund("listen", "nobody-here.aid.test", "--socket", str(daemon.socket))
        assert r.returncode == 1
        _one_line(r, "aund listen", "nobody-here.aid.test", "aund aid ensure")
        r = aund("listen", "nobody-here.aid.test", "--from", "yesterday", "--socket", str(daemon.socket))
        assert r.returncode == 2
        _one_line(r, "--from takes now, last_ack or a cursor", "'yesterday'")
    finally:
        daemon.stop()


def test_log_level_setting(devnet, tmp_path):
    import signal
    import time

    cfg = tmp_path / "aund.toml"
    cfg.write_text(f'gateway_url = ["{devnet.gateway_url}"]\nroot_ca = ["{devnet.root_ca}"]\nlog_level = "warning"\n')
    sock = tmp_path / "aund.sock"
    log = tmp_path / "aund.log"
    with open(log, "w") as err:
        proc = subprocess.Popen([sys.executable, "-m", "aund", "run", "--config", str(cfg), "--state-dir",
                                 str(tmp_path / "state"), "--socket", str(sock)], cwd=ROOT, stderr=err,
                                env=dict(os.environ, AUND_ENCRYPTION_SEED="x"))
    try:
        deadline = time.monotonic() + 30
        while not sock.exists() and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.05)
        assert sock.exists(), log.read_text()
        r = aund("status", "--socket", str(sock))
        assert r.returncode == 0
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    assert "daemon.started" not in log.read_text()  # an info event, below the level
    r = aund("run", "--state-dir", str(tmp_path / "s2"), "--socket", str(tmp_path / "s2.sock"),
             env={"AUND_LOG_LEVEL": "loud", "AUND_ENCRYPTION_SEED": "x"})
    assert r.returncode == 2
    _one_line(r, "AUND_LOG_LEVEL", "must be one of debug, info, warning, error")


def test_aid_show_and_reset_consumer(aund_on_devnet, tmp_path):
    import json

    from client_stub import Client

    aid = f"shown-{os.getpid() % 10000}.aid.test"
    daemon = aund_on_devnet()
    sock = str(daemon.socket)
    try:
        with Client(sock) as app:
            app.ensure_identity(aid)
            s = app.session(aid)
            s.wait_ready(timeout=30)
            for text in ("one", "two"):
                s.call("message.send", {"to": aid, "payload": {"type": "text", "text": text}, "encrypt": False})
            with s.events("reader") as events:
                for _ in range(2):
                    last = events.get(timeout=30)
                last.ack()
            shown = json.loads(aund("aid", "show", aid, "--json", "--socket", sock).stdout)
            assert shown["consumers"] == [{"consumer": "uid0/reader", "cursor": last.cursor,
                                           "updated_at": shown["consumers"][0]["updated_at"]}]  # root sees uid names
            assert shown["cert_fingerprint"].startswith("sha256:") and shown["not_after"] > shown["not_before"]
            assert shown["links"][0]["state"] == "ready" and shown["inbox_events"] == 2
            text = aund("aid", "show", aid, "--socket", sock)
            assert text.returncode == 0 and "uid0/reader" in text.stdout and "expires in" in text.stdout
            r = aund("aid", "reset-consumer", aid, "reader", "--socket", sock)
            assert r.returncode == 0 and "reads again after cursor 0" in r.stdout
            with s.events("reader") as events:  # everything again
                assert events.get(timeout=30).data["payload"]["text"] == "one"
            r = aund("aid", "reset-consumer", aid, "reader", "--to", str(last.cursor + 99), "--socket", sock)
            assert r.returncode == 1
            _one_line(r, "past the newest event")
            r = aund("aid", "show", "nobody-here.aid.test", "--socket", sock)
            assert r.returncode == 1
            _one_line(r, "aund holds no identity nobody-here.aid.test")
    finally:
        daemon.stop()


def test_a_name_taken_by_another_key_is_said_so_and_the_pending_key_set_aside(devnet, aund_on_devnet, tmp_path):
    import trio

    from aund.aun import auth
    from aund.identity import pki
    from client_stub import Client, ResourceAlreadyExistError

    aid = f"taken-{os.getpid() % 10000}.aid.test"
    trio.run(auth.create_aid, devnet.gateway_url, aid, pki.generate_key().public_key())  # someone else's key
    daemon = aund_on_devnet()
    try:
        with Client(daemon.socket) as app:
            for attempt in range(2):
                with pytest.raises(ResourceAlreadyExistError) as info:
                    app.ensure_identity(aid)
                assert "choose another name" in str(info.value)
                assert not (daemon.state_dir / "AIDs" / "_pending" / aid).exists()
                kept = sorted((daemon.state_dir / "AIDs" / "_abandoned").glob(f"{aid}.*"))
                assert len(kept) == attempt + 1 and (kept[-1] / "key.enc.json").is_file()  # set aside, not deleted
            assert aid not in {i["aid"] for i in app.list_identities()}
    finally:
        daemon.stop()


def test_shell_completion_completes_subcommands_and_their_words(tmp_path):
    script = tmp_path / "aund.bash"
    r = aund("completion", "bash")
    assert r.returncode == 0
    script.write_text(r.stdout)
    probe = (f'source {script}; for line in "aund sta" "aund aid sh" "aund link re"; do '
             'read -ra COMP_WORDS <<< "$line"; COMP_CWORD=$(( ${#COMP_WORDS[@]} - 1 )); COMPREPLY=(); '
             '_shtab_aund; echo "${COMPREPLY[*]}"; done')
    out = subprocess.run(["bash", "-c", probe], capture_output=True, text=True, timeout=20)
    assert out.stdout.split("\n")[:3] == ["status", "show", "restart"], out
    for shell in ("zsh", "tcsh"):
        assert aund("completion", shell).returncode == 0


def test_a_file_where_the_identities_directory_belongs_stops_the_start(tmp_path):
    state = tmp_path / "state"
    state.mkdir()
    (state / "AIDs").write_text("a file, not the directory")
    r = aund("run", "--state-dir", str(state), "--socket", str(tmp_path / "s.sock"), env={"AUND_ENCRYPTION_SEED": "x"})
    assert r.returncode == 1
    _one_line(r, "aund run", str(state / "AIDs"), "is not a directory", "move that file aside")
    assert (state / "AIDs").read_text() == "a file, not the directory"  # left as it was


def test_status_and_health_of_a_store_that_became_unreadable(aund_on_devnet, tmp_path):

    daemon = aund_on_devnet()
    aids = daemon.state_dir / "AIDs"
    try:
        aids.rename(daemon.state_dir / "AIDs.moved")
        aids.write_text("in the way")
        r = aund("status", "--socket", str(daemon.socket))
        assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
        assert "storage.error" in r.stdout and str(aids) in r.stdout
        r = aund("health", "--socket", str(daemon.socket))
        assert r.returncode == 1 and "Traceback" not in r.stderr and str(aids) in r.stdout + r.stderr
    finally:
        aids.unlink()
        (daemon.state_dir / "AIDs.moved").rename(aids)
        daemon.stop()


def test_a_damaged_inbox_database_is_one_line_and_left_alone(tmp_path):
    from tests.helpers import AundProcess

    state = tmp_path / "state"
    first = AundProcess(state, tmp_path / "s.sock")  # a real state dir, the seed checked
    first.start()  # waits for daemon.started: the inbox exists by then
    assert first.stop() == 0 and (state / "inbox.sqlite3").exists()
    damaged = b"not a database " * 100
    (state / "inbox.sqlite3").write_bytes(damaged)
    for extra in ("-wal", "-shm"):
        (state / f"inbox.sqlite3{extra}").unlink(missing_ok=True)
    r = aund("run", "--state-dir", str(state), "--socket", str(tmp_path / "s.sock"),
             env={"AUND_ENCRYPTION_SEED": "test-seed-not-secret"})  # AundProcess's seed
    assert r.returncode == 1
    _one_line(r, "aund run", str(state / "inbox.sqlite3"), "restore it from a backup")
    assert (state / "inbox.sqlite3").read_bytes() == damaged


def test_listen_with_an_unknown_kind_says_which_kinds_exist(aund_on_devnet, tmp_path):
    from client_stub import Client

    aid = f"kinds-{os.getpid() % 10000}.aid.test"
    daemon = aund_on_devnet()
    try:
        with Client(daemon.socket) as app:
            app.ensure_identity(aid)
        r = aund("listen", aid, "--kind", "message.recieved", "--socket", str(daemon.socket))
        assert r.returncode == 1
        _one_line(r, "unknown event kind", "'message.recieved'", "message.received")
    finally:
        daemon.stop()
