"""The public network's shape on loopback (tests/netsim.py): a TLS devnet with the production PKI on
port 443 of a loopback address named gateway.aid.test; aund and fastaun are given only AIDs (and
the devnet root as AUN trust root), discover the gateway, and exchange E2EE messages both ways."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from client_stub import Client
from tests.helpers import ROOT, DevnetProcess, wait_until
from tests.netsim import NetSim

pytestmark = [pytest.mark.interop, pytest.mark.timeout(180)]


def test_aund_and_fastaun_find_a_tls_production_devnet_by_discovery(tmp_path):
    net = NetSim(tmp_path / "net", ["aid.test"])
    if net.skip_reason:
        pytest.skip(net.skip_reason)
    cert, key = net.cert_files("aid.test")
    devnet = DevnetProcess(tmp_path / "devnet", port=443, host=net.address("aid.test"),
                           extra_args=["--pki", "production", "--tls-cert", str(cert), "--tls-key", str(key)])
    devnet.start()
    assert devnet.gateway_url == f"wss://{net.address('aid.test')}:443/aun"
    aid = f"x-{os.getpid() % 100000}.aid.test"
    sock = tmp_path / "aund.sock"
    env = net.env({**os.environ, "AUND_ENCRYPTION_SEED": "test-seed-not-secret"})
    log = open(tmp_path / "aund.log", "w")
    daemon = subprocess.Popen(net.wrap([sys.executable, "-m", "aund", "run", "--state-dir", str(tmp_path / "aund"),
                                        "--socket", str(sock), "--root-ca", devnet.root_ca, "--identity", aid]),
                              cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=log)
    fastaun = None
    try:
        wait_until(sock.exists, 30, 0.05, "the daemon's socket")
        with Client(str(sock), connect_timeout=30) as app:
            app.ensure_identity(aid)  # load; register only if absent (by discovery); load again
            s = app.session(aid)
            s.wait_ready(timeout=60)
            status = json.loads(subprocess.run([sys.executable, "-m", "aund", "status", "--json", "--socket",
                                                str(sock)], capture_output=True, text=True, timeout=30).stdout)
            assert json.dumps(status).count("wss://gateway.aid.test/aun") >= 1  # discovered, by name, over TLS
            work = tmp_path / "sdk"
            work.mkdir()
            fastaun = subprocess.Popen(
                net.wrap([sys.executable, str(ROOT / "tests/interop/fastaun_discovery_driver.py")]),
                env=net.env({**os.environ, "AUN_ROOT_CA": devnet.root_ca, "AUN_WORKDIR": str(work), "PEER_AID": aid}),
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            events = s.events(consumer="t", kinds=("message.received",))
            first = next(iter(events))
            peer = json.loads((work / "fa.json").read_text())["aid"]
            assert first.data["from"] == peer and first.data["encrypted"] is True
            assert first.data["payload"]["text"] == "hi from fastaun"
            first.ack()
            r = s.call("message.send", {"to": peer, "payload": {"type": "text", "text": "hi from aund"}})
            assert r["status"] == "delivered"
            out, err = fastaun.communicate(timeout=60)
            checks = [json.loads(x) for x in out.splitlines() if x.startswith("{")]
            assert fastaun.returncode == 0 and checks and all(c["ok"] for c in checks), (checks, err[-3000:])
    finally:
        for proc in (fastaun, daemon):
            if proc is not None and proc.poll() is None:
                proc.terminate() if proc is daemon else proc.kill()
                try:
                    proc.wait(20)
                except subprocess.TimeoutExpired:
                    proc.kill()
        log.close()
        assert devnet.stop() == 0
