"""The netsim harness itself: names resolve only inside its namespace, TLS verifies with its CA."""
import subprocess
import sys

import pytest

from tests.netsim import NetSim

PROBE = r'''
import socket, ssl, sys, threading
addr, cert, key = sys.argv[1], sys.argv[2], sys.argv[3]
srv = socket.socket(); srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind((addr, 443)); srv.listen()
sctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER); sctx.load_cert_chain(cert, key)
def serve():
    c, _ = srv.accept()
    with sctx.wrap_socket(c, server_side=True) as s:
        s.sendall(b"hi")
threading.Thread(target=serve, daemon=True).start()
print(socket.gethostbyname("gateway.aid.test"))
ctx = ssl.create_default_context()
with socket.create_connection(("gateway.aid.test", 443), timeout=5) as raw:
    with ctx.wrap_socket(raw, server_hostname="gateway.aid.test") as t:
        print(t.recv(2).decode())
try:
    socket.gethostbyname("example.com"); print("LEAK")
except OSError:
    print("unknown-fails")
'''


def test_netsim_resolves_and_verifies(tmp_path):
    net = NetSim(tmp_path, ["aid.test", "other.test"])
    if net.skip_reason:
        pytest.skip(net.skip_reason)
    cert, key = net.cert_files("aid.test")
    r = subprocess.run(net.wrap([sys.executable, "-c", PROBE, net.address("aid.test"), cert, key]),
                       env=net.env(), capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == [net.address("aid.test"), "hi", "unknown-fails"]
    assert net.address("other.test").rsplit(".", 1)[0] == net.address("aid.test").rsplit(".", 1)[0]
    with open("/etc/hosts") as f:
        assert "gateway.aid.test" not in f.read()
