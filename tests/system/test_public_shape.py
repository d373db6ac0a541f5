"""The public network's shape on loopback (tests/netsim.py): TLS devnets with the production PKI on
port 443 of loopback addresses named gateway.{issuer}; aund and fastaun are given only AIDs (and the
devnet roots as AUN trust roots), discover their gateways, and exchange E2EE messages both ways:
on one devnet, and across two federated devnets of different issuer domains."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest

from client_stub import Client
from tests.helpers import ROOT, DevnetProcess, wait_until
from tests.netsim import NetSim

pytestmark = [pytest.mark.interop, pytest.mark.timeout(180)]


def _devnets(tmp_path, issuers, *, federate: bool):
    net = NetSim(tmp_path / "net", list(issuers))
    if net.skip_reason:
        pytest.skip(net.skip_reason)
    devnets = {}
    for issuer in issuers:
        cert, key = net.cert_files(issuer)
        args = ["--pki", "production", "--issuer", issuer, "--tls-cert", str(cert), "--tls-key", str(key)]
        if federate:
            args += [a for other in issuers if other != issuer for a in ("--federate", f"{other}=https://gateway.{other}")]
        devnets[issuer] = DevnetProcess(tmp_path / f"devnet-{issuer}", port=443, host=net.address(issuer),
                                        extra_args=args, wrap=net.wrap, env=net.env())
        devnets[issuer].start()
        assert devnets[issuer].gateway_url == f"wss://{net.address(issuer)}:443/aun"
    roots = tmp_path / "roots.pem"  # every devnet root, one bundle (fastaun takes one file)
    roots.write_text("".join(Path(d.root_ca).read_text() for d in devnets.values()))
    return net, devnets, roots


def _listening(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX) as s:
        try:
            s.connect(str(path))
        except OSError:
            return False
    return True


@contextmanager
def _aund_and_fastaun(tmp_path, net, devnets, roots, aund_issuer: str, fastaun_issuer: str, scenario: str,
                      expect: set[str]):
    """An aund daemon holding x.{aund_issuer} (found by discovery) and an app session on it, then a
    fastaun driver (`scenario`) holding y.{fastaun_issuer}: yields (session, fastaun's AID, work dir),
    and judges the driver's checks at the end: all passed, and those named in `expect` were made."""
    aid = f"x-{os.getpid() % 100000}.{aund_issuer}"
    sock = tmp_path / "aund.sock"
    env = net.env({**os.environ, "AUND_ENCRYPTION_SEED": "test-seed-not-secret"})
    root_args = [a for d in devnets.values() for a in ("--root-ca", d.root_ca)]
    log = open(tmp_path / "aund.log", "w")
    daemon = subprocess.Popen(net.wrap([sys.executable, "-m", "aund", "run", "--state-dir", str(tmp_path / "aund"),
                                        "--socket", str(sock), *root_args, "--identity", aid]),
                              cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=log)
    fastaun = None
    try:
        wait_until(lambda: _listening(sock), 30, 0.05, "the daemon's socket")
        with Client(str(sock), connect_timeout=30) as app:
            app.ensure_identity(aid)  # load; register only if absent (by discovery); load again
            s = app.session(aid)
            s.wait_ready(timeout=60)
            status = subprocess.run([sys.executable, "-m", "aund", "status", "--json", "--socket", str(sock)],
                                    capture_output=True, text=True, timeout=30).stdout
            assert f"wss://gateway.{aund_issuer}/aun" in status  # discovered, by name, over TLS
            net.add_host(aid, aund_issuer)  # now https://{aid}/agent.md resolves too (fastaun reads it)
            work = tmp_path / "sdk"
            work.mkdir()
            fastaun = subprocess.Popen(
                net.wrap([sys.executable, str(ROOT / "tests/interop/fastaun_discovery_driver.py"), scenario]),
                env=net.env({**os.environ, "AUN_ROOT_CA": str(roots), "AUN_WORKDIR": str(work), "PEER_AID": aid,
                             "AUN_ISSUER": fastaun_issuer}),
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            wait_until(lambda: (work / "fa.json").exists() or fastaun.poll() is not None, 60, 0.05, "fastaun")
            assert fastaun.poll() is None, fastaun.communicate()
            yield s, json.loads((work / "fa.json").read_text())["aid"], work
            out, err = fastaun.communicate(timeout=60)
            checks = [json.loads(x) for x in out.splitlines() if x.startswith("{")]
            assert fastaun.returncode == 0 and checks and all(c["ok"] for c in checks), \
                json.dumps([c for c in checks if not c["ok"]] or checks) + "\n" + err[-3000:]
            assert expect <= {c["check"] for c in checks}, (expect, checks)
    finally:
        for proc in (fastaun, daemon):
            if proc is not None and proc.poll() is None:
                proc.terminate() if proc is daemon else proc.kill()
                try:
                    proc.wait(20)
                except subprocess.TimeoutExpired:
                    proc.kill()
        log.close()
        for devnet in devnets.values():
            assert devnet.stop() == 0


def _exchange(tmp_path, net, devnets, roots, aund_issuer: str, fastaun_issuer: str) -> None:
    """aund holds x.{aund_issuer}; fastaun y.{fastaun_issuer}: one E2EE message each way."""
    with _aund_and_fastaun(tmp_path, net, devnets, roots, aund_issuer, fastaun_issuer, "p2p",
                           {"e2ee send to aund", "e2ee reply from aund decrypted",
                            "peer agent.md downloaded and verified"}) as (s, peer, _):
        first = next(iter(s.events(consumer="t", kinds=("message.received", "message.undecryptable"))))
        assert first.kind == "message.received", first.data
        assert first.data["from"] == peer and first.data["encrypted"] is True
        assert first.data["payload"]["text"] == "hi from fastaun"
        first.ack()
        r = s.call("message.send", {"to": peer, "payload": {"type": "text", "text": "hi from aund"}})
        assert r["status"] == "delivered"


def _group_text(events, text: str):
    """The next group message event until `text` arrives (anything undecryptable fails the test)."""
    for event in events:
        assert event.kind != "message.undecryptable", event.data
        event.ack()
        if event.kind == "group.message.received" and event.data["payload"].get("text") == text:
            return event.data
    raise AssertionError(f"the event stream ended before {text!r}")


def test_aund_and_fastaun_find_a_tls_production_devnet_by_discovery(tmp_path):
    net, devnets, roots = _devnets(tmp_path, ["aid.test"], federate=False)
    _exchange(tmp_path, net, devnets, roots, "aid.test", "aid.test")


def test_e2ee_across_two_federated_issuer_domains(tmp_path):
    net, devnets, roots = _devnets(tmp_path, ["aid.test", "other.test"], federate=True)
    _exchange(tmp_path, net, devnets, roots, "aid.test", "other.test")


def test_groups_across_two_federated_issuer_domains(tmp_path):
    """Group A lives on aund's devnet (aid.test), group B on fastaun's (other.test); in each, the
    member of the other issuer is admitted, and E2EE group messages go both ways."""
    net, devnets, roots = _devnets(tmp_path, ["aid.test", "other.test"], federate=True)
    with _aund_and_fastaun(tmp_path, net, devnets, roots, "aid.test", "other.test", "groups", {
            "our admission to a foreign group was pushed to us", "decrypted 'aund to A' across domains",
            "decrypted 'aund to B' across domains", "list_my merges both devnets", "nothing undecryptable"}) \
            as (s, peer, work):
        events = iter(s.events(consumer="g", kinds=("group.message.received", "message.undecryptable")))
        gid_a = s.call("group.create", {"name": "aund home", "join_mode": "approval"})["group"]["group_id"]
        assert gid_a.endswith(".aid.test")
        assert s.call("group.add_member", {"group_id": gid_a, "aid": peer})["member"]["aid"] == peer
        (work / "group_a.json").write_text(json.dumps({"gid": gid_a}))
        got = _group_text(events, "fa to A")
        assert got["from"] == peer and got["encrypted"] is True and got["group_id"] == gid_a
        assert isinstance(s.call("group.send", {"group_id": gid_a, "payload": {"type": "text", "text": "aund to A"}})
                          ["seq"], int)

        wait_until(lambda: (work / "group_b.json").exists(), 60, 0.05, "fastaun's group B")
        gid_b = json.loads((work / "group_b.json").read_text())["gid"]
        assert gid_b.endswith(".other.test")
        members = s.call("group.get_members", {"group_id": gid_b})["members"]  # answered by other.test
        assert {m["aid"]: m["role"] for m in members} == {peer: "owner", s.aid: "member"}
        assert isinstance(s.call("group.send", {"group_id": gid_b, "payload": {"type": "text", "text": "aund to B"}})
                          ["seq"], int)
        got = _group_text(events, "fa to B")
        assert got["from"] == peer and got["encrypted"] is True and got["group_id"] == gid_b
        (work / "done").write_text("1")
