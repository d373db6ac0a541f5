"""The gateway streams on real loopback sockets: HTTP and WebSocket through an HTTP CONNECT proxy
named by the environment, the last-known-address fallback when a name stops resolving (the
resolver failure is the injected fault), and TLS failures reported with a reason a person can act on.
"""
from __future__ import annotations

import datetime as dt
import functools
import socket
import ssl

import pytest
import trio
import trio_websocket
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from aund.aun import transport, ws as websocket
from aund.aun.http import http_get, http_request
from aund.errors import GatewayUnavailable

pytestmark = pytest.mark.timeout(30)


@pytest.fixture(autouse=True)
def _no_proxy_env(monkeypatch, tmp_path):
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY", "http_proxy", "https_proxy",
                 "all_proxy", "no_proxy"):
        monkeypatch.delenv(name, raising=False)
    transport.use_dns_cache(tmp_path / "dns-cache.json")
    yield
    transport.use_dns_cache(None)


async def _http_server(nursery, body: bytes = b"hello") -> tuple[int, list[bytes]]:
    """A one-line HTTP/1.1 server on 127.0.0.1; returns its port and the request heads it saw."""
    seen: list[bytes] = []

    async def handle(stream):
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = await stream.receive_some(4096)
            if not chunk:
                return
            data += chunk
        seen.append(data.split(b"\r\n\r\n")[0])
        await stream.send_all(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s"
                              % (len(body), body))
        await stream.aclose()

    listeners = await nursery.start(functools.partial(trio.serve_tcp, handle, 0, host="127.0.0.1"))
    return listeners[0].socket.getsockname()[1], seen


async def _connect_proxy(nursery, *, refuse: bool = False) -> tuple[int, list[str]]:
    """A CONNECT proxy on 127.0.0.1 that records the targets and pipes bytes both ways."""
    targets: list[str] = []

    async def pipe(src, dst):
        try:
            while data := await src.receive_some(65536):
                await dst.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            await trio.aclose_forcefully(dst)

    async def handle(client):
        data = b""
        while b"\r\n\r\n" not in data:
            data += await client.receive_some(4096)
        target = data.split(b" ")[1].decode()
        targets.append(target)
        if refuse:
            await client.send_all(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n")
            await client.aclose()
            return
        host, _, port = target.rpartition(":")
        upstream = await trio.open_tcp_stream(host.strip("[]"), int(port))
        await client.send_all(b"HTTP/1.1 200 Connection established\r\n\r\n")
        async with trio.open_nursery() as n:
            n.start_soon(pipe, client, upstream)
            n.start_soon(pipe, upstream, client)

    listeners = await nursery.start(functools.partial(trio.serve_tcp, handle, 0, host="127.0.0.1"))
    return listeners[0].socket.getsockname()[1], targets


async def test_http_and_websocket_go_through_the_environments_proxy(monkeypatch):
    async with trio.open_nursery() as nursery:
        http_port, seen = await _http_server(nursery)
        proxy_port, targets = await _connect_proxy(nursery)
        monkeypatch.setenv("HTTP_PROXY", f"http://user:pw@127.0.0.1:{proxy_port}")
        assert await http_get(f"http://127.0.0.1:{http_port}/pki/chain") == (200, b"hello")
        assert targets == [f"127.0.0.1:{http_port}"]
        assert seen[0].startswith(b"GET /pki/chain HTTP/1.1") and b"host: 127.0.0.1:%d" % http_port in seen[0].lower()

        async def echo(request):
            ws = await request.accept()
            await ws.send_message(await ws.get_message())

        ws_server = await nursery.start(trio_websocket.serve_websocket, echo, "127.0.0.1", 0, None)
        ws_port = ws_server.port
        ws, stream = await transport.connect(nursery, f"ws://127.0.0.1:{ws_port}/aun", max_frame=1 << 20, timeout=5)
        await ws.send_message("ping")
        assert await ws.get_message() == "ping"
        await transport.close(ws, stream)
        assert targets[-1] == f"127.0.0.1:{ws_port}"

        monkeypatch.setenv("NO_PROXY", "127.0.0.1")  # the exception list is honoured
        assert await http_get(f"http://127.0.0.1:{http_port}/") == (200, b"hello")
        assert len(targets) == 2
        nursery.cancel_scope.cancel()


async def test_a_proxy_that_refuses_is_named_with_its_answer(monkeypatch):
    async with trio.open_nursery() as nursery:
        proxy_port, _ = await _connect_proxy(nursery, refuse=True)
        monkeypatch.setenv("HTTPS_PROXY", f"127.0.0.1:{proxy_port}")
        with pytest.raises(GatewayUnavailable, match=r"proxy 127.0.0.1 refused CONNECT gateway.aid.test:443: HTTP 403"):
            await http_get("https://gateway.aid.test/.well-known/aun-gateway")
        nursery.cancel_scope.cancel()


async def test_a_name_that_stops_resolving_uses_its_last_address(monkeypatch, tmp_path):
    async with trio.open_nursery() as nursery:
        port, _ = await _http_server(nursery)
        real = trio.socket.getaddrinfo
        broken = {"gateway.aid.test"}

        async def getaddrinfo(host, *args, **kwargs):
            if host in broken:  # the injected fault: the resolver fails for this name
                raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
            return await real(host, *args, **kwargs)

        monkeypatch.setattr(trio.socket, "getaddrinfo", getaddrinfo)
        with pytest.raises(GatewayUnavailable, match="cannot resolve the host name: Name or service not known"):
            await http_get(f"http://gateway.aid.test:{port}/")
        assert await http_get(f"http://localhost:{port}/") == (200, b"hello")  # resolved: remembered
        assert transport.DNS_CACHE.get("localhost") == "127.0.0.1"
        transport.DNS_CACHE.remember("gateway.aid.test", "127.0.0.1")
        transport.use_dns_cache(tmp_path / "dns-cache.json")  # the cache survives a restart
        assert transport.DNS_CACHE.get("gateway.aid.test") == "127.0.0.1"
        assert await http_get(f"http://gateway.aid.test:{port}/") == (200, b"hello")
        assert (tmp_path / "dns-cache.json").stat().st_mode & 0o777 == 0o600
        nursery.cancel_scope.cancel()


def _tls_material(tmp_path, hostname: str):
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.timezone.utc)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test web CA")])
    ca = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
          .serial_number(1).not_valid_before(now - dt.timedelta(days=1)).not_valid_after(now + dt.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True).sign(key, hashes.SHA256()))
    leaf_key = ec.generate_private_key(ec.SECP256R1())
    leaf = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostname)]))
            .issuer_name(name).public_key(leaf_key.public_key()).serial_number(2)
            .not_valid_before(now - dt.timedelta(days=1)).not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(hostname)]), critical=False)
            .sign(key, hashes.SHA256()))
    (tmp_path / "ca.pem").write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    (tmp_path / "leaf.pem").write_bytes(leaf.public_bytes(serialization.Encoding.PEM))
    (tmp_path / "leaf.key").write_bytes(leaf_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    return tmp_path / "ca.pem"


async def test_tls_failures_say_what_did_not_verify(monkeypatch, tmp_path):
    ca = _tls_material(tmp_path, "gateway.aid.test")
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(tmp_path / "leaf.pem", tmp_path / "leaf.key")

    async def handle(stream):
        try:
            await stream.do_handshake()
            await stream.receive_some(4096)
            await stream.send_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok")
        except trio.BrokenResourceError:
            pass

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(functools.partial(trio.serve_ssl_over_tcp, handle, 0, server_ctx, host="127.0.0.1"))
        port = listeners[0].transport_listener.socket.getsockname()[1]
        transport.DNS_CACHE.remember("gateway.aid.test", "127.0.0.1")
        real = trio.socket.getaddrinfo

        async def getaddrinfo(host, *args, **kwargs):
            if host == "gateway.aid.test":
                raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
            return await real(host, *args, **kwargs)

        monkeypatch.setattr(trio.socket, "getaddrinfo", getaddrinfo)
        monkeypatch.setenv("SSL_CERT_FILE", str(tmp_path / "nothing.pem"))
        with pytest.raises(GatewayUnavailable, match="TLS certificate not accepted: unable to get local issuer"):
            await http_get(f"https://gateway.aid.test:{port}/")
        monkeypatch.setenv("SSL_CERT_FILE", str(ca))
        assert await http_get(f"https://gateway.aid.test:{port}/") == (200, b"ok")
        with pytest.raises(GatewayUnavailable, match="TLS certificate not accepted: .*mismatch"):
            await http_request("GET", f"https://127.0.0.1:{port}/")
        reason = ""
        async with trio.open_nursery() as inner:
            try:
                await transport.connect(inner, f"wss://127.0.0.1:{port}/aun", max_frame=1 << 20, timeout=5)
            except trio.BrokenResourceError as exc:  # the WebSocket path fails the same way, and says why
                reason = transport.describe(exc)
        assert reason.startswith("TLS certificate not accepted: IP address mismatch")
        nursery.cancel_scope.cancel()


def test_describe_never_returns_an_empty_reason():
    wrapped = trio.BrokenResourceError()
    wrapped.__cause__ = ConnectionRefusedError(111, "")
    assert transport.describe(wrapped) == "connection refused (nothing listens there)"
    assert transport.describe(websocket.HandshakeError("")) == "HandshakeError"
    assert transport.describe(trio.TooSlowError()) == "timed out"
