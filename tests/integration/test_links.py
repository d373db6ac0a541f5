"""One daemon keeps many AIDs connected through gateway restarts, kicks and failover."""
from __future__ import annotations

import json
import os
import statistics
import time

import pytest

from tests.helpers import AundProcess, DevnetProcess, wait_until
from tests.integration.kick import take_slot

pytestmark = pytest.mark.timeout(240)


def _connected_aids(devnet: DevnetProcess) -> set[str]:
    return {e["aid"] for e in devnet.stats()["connections"] if e["event"] == "connect"}


def _write_config(path, devnets, aids):
    gws = ", ".join(f'"{d.gateway_url}"' for d in devnets)
    roots = ", ".join(f'"{d.root_ca}"' for d in devnets)
    ids = ", ".join(f'"{a}"' for a in aids)
    path.write_text(f"gateway_url = [{gws}]\nroot_ca = [{roots}]\nidentities = [{ids}]\n")


def test_fifty_links_survive_a_gateway_kill(devnet, tmp_path):
    aids = [f"agent{i:03d}-{os.getpid() % 10000}.aid.test" for i in range(50)]
    cfg = tmp_path / "aund.toml"
    _write_config(cfg, [devnet], aids)
    daemon = AundProcess(tmp_path / "state", tmp_path / "aund.sock", cfg)
    daemon.start()
    try:
        wait_until(lambda: _connected_aids(devnet) >= set(aids), 90, 0.2, "50 links ready")
        pid = daemon.proc.pid
        devnet.kill()
        devnet.start()  # same port, same state dir
        t0 = time.monotonic()
        wait_until(lambda: _connected_aids(devnet) >= set(aids), 120, 0.1, "50 links back after restart")
        elapsed = time.monotonic() - t0
        assert daemon.proc.poll() is None and daemon.proc.pid == pid  # no restart of aund
        connects = [e["t"] for e in devnet.stats()["connections"] if e["event"] == "connect"]
        spread = max(connects) - min(connects)
        # jitter: reconnects are spread out, not a thundering herd within one instant
        assert spread > 0.3, f"reconnects not spread: {spread:.3f} s"
        assert statistics.pstdev(connects) > 0.05
        # nobody registered again: identities and tokens were reused (refresh or login only)
        assert devnet.stats()["rpc"].get("auth.create_aid", 0) == 0
        print(f"50 links back in {elapsed:.2f} s after the devnet restart; connect spread {spread:.2f} s")
    finally:
        assert daemon.stop() == 0


def test_kick_stops_only_that_link(devnet, tmp_path):
    aids = [f"kick{i}-{os.getpid() % 10000}.aid.test" for i in range(3)]
    cfg = tmp_path / "aund.toml"
    _write_config(cfg, [devnet], aids)
    daemon = AundProcess(tmp_path / "state", tmp_path / "aund.sock", cfg)
    daemon.start()
    try:
        wait_until(lambda: _connected_aids(devnet) >= set(aids), 60, 0.1, "links ready")
        # a second daemon-like client takes the same (aid, device, slot): the gateway kicks ours
        take_slot(devnet, daemon.state_dir, aids[0])
        wait_until(lambda: any(e.get("event") == "link.state" and e.get("aid") == aids[0]
                               and e.get("new") == "connection_failed" for e in daemon.log_events()),
                   30, 0.1, "kicked link to stop")
        events = devnet.stats()["connections"]
        first_aid_connects = [e for e in events if e["event"] == "connect" and e["aid"] == aids[0]]
        assert len(first_aid_connects) == 2  # ours, then the taker; ours never came back
        others = [e for e in events if e["aid"] in aids[1:] and e["event"] == "close"]
        assert others == []  # the other links were untouched
    finally:
        assert daemon.stop() == 0


def test_failover_to_the_second_gateway(tmp_path):
    # Two gateways of one network: two devnet processes over the same state (CA and database).
    first = DevnetProcess(tmp_path / "net")
    second = DevnetProcess(tmp_path / "net")
    first.start()
    second.start()
    try:
        aids = [f"fo{i}-{os.getpid() % 10000}.aid.test" for i in range(3)]
        cfg = tmp_path / "aund.toml"
        _write_config(cfg, [first, second], aids)
        daemon = AundProcess(tmp_path / "state", tmp_path / "aund.sock", cfg)
        daemon.start()
        try:
            wait_until(lambda: _connected_aids(first) >= set(aids), 60, 0.1, "links on the first gateway")
            assert not _connected_aids(second)
            first.kill()
            wait_until(lambda: _connected_aids(second) >= set(aids), 90, 0.1, "links moved to the second gateway")
        finally:
            assert daemon.stop() == 0
    finally:
        assert second.stop() == 0


def test_second_daemon_on_the_same_state_dir_refuses(devnet, tmp_path):
    cfg = tmp_path / "aund.toml"
    _write_config(cfg, [devnet], [])
    first = AundProcess(tmp_path / "state", tmp_path / "a.sock", cfg)
    first.start()
    try:
        second = AundProcess(tmp_path / "state", tmp_path / "b.sock", cfg)
        with pytest.raises(AssertionError) as info:
            second.start(timeout=15)
        assert second.proc.returncode == 1
        text = second.log_path.read_text()
        assert f"in use by aund pid {first.proc.pid}" in text
    finally:
        assert first.stop() == 0


def test_a_kicked_link_restarts_without_a_daemon_restart(devnet, tmp_path):
    """Kicked with 4015 the link stops for good (another instance took the slot); `aund link
    restart` starts it again, in place: the app's session works again without reopening."""
    from client_stub import Client
    from tests.integration.test_cli import aund

    aid = f"rekick-{os.getpid() % 10000}.aid.test"
    cfg = tmp_path / "aund.toml"
    _write_config(cfg, [devnet], [aid])
    daemon = AundProcess(tmp_path / "state", tmp_path / "aund.sock", cfg)
    daemon.start()
    try:
        with Client(daemon.socket) as app:
            app.ensure_identity(aid)
            s = app.session(aid)
            s.wait_ready(timeout=30)
            r = aund("link", "restart", aid, "--socket", str(daemon.socket))
            assert r.returncode == 0 and "left as it is" in r.stdout  # running: untouched
            take_slot(devnet, daemon.state_dir, aid)
            wait_until(lambda: app.status()["links"][0]["state"] == "connection_failed", 30, 0.1, "kicked")
            r = aund("link", "restart", aid, "--socket", str(daemon.socket), "--json")
            assert r.returncode == 0 and json.loads(r.stdout)["restarted"] is True, r.stderr
            s.wait_ready(timeout=30)  # the same session
            assert s.call("meta.ping", {}, timeout=10) is not None
            r = aund("link", "restart", "nobody-here.aid.test", "--socket", str(daemon.socket))
            assert r.returncode == 1 and "ResourceNotExistError" in r.stderr and len(r.stderr.splitlines()) == 1
    finally:
        assert daemon.stop() == 0
