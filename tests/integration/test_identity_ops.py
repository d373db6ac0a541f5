"""Identity operations through real processes: an `aund run` daemon and a devnet whose AID
certificates live seconds (`--cert-ttl`), apps on client_stub, and the CLI.

- the renewal timer renews before expiry, again and again, while the link keeps working, and every
  certificate it replaced is still served by fingerprint and kept in the store;
- `aund aid renew` and `--rekey` (a new key: the old one is kept in keys/);
- identity.sign / verify / peer.resolve and session.notify over the socket, with clear errors for
  bad input and for an AID the app may not use.
"""
from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest
import trio

from aund.aun import auth
from aund.identity import pki
from aund.identity.store import FastaunIdentity, IdentityStore
from client_stub import AsyncClient, Client, InvalidParams, ResourceNotExistError
from tests.helpers import ROOT, AundProcess, DevnetProcess, wait_until
from tests.inproc import APP, ready_handle, start_daemon

pytestmark = pytest.mark.timeout(180)
CERT_TTL = 8  # seconds; renewal at half of it (cert_renew_fraction = 0.5)


def aund(*args: str, timeout: float = 60):
    return subprocess.run([sys.executable, "-m", "aund", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture
def short_devnet(tmp_path):
    proc = DevnetProcess(tmp_path / "devnet", extra_args=["--cert-ttl", str(CERT_TTL)])
    proc.start()
    try:
        yield proc
    finally:
        assert proc.stop() == 0


@pytest.fixture
def daemon(short_devnet, tmp_path):
    aid = f"renew-{os.getpid() % 10000}.aid.test"
    cfg = tmp_path / "aund.toml"
    cfg.write_text(f'gateway_url = ["{short_devnet.gateway_url}"]\nroot_ca = ["{short_devnet.root_ca}"]\n'
                   f'identities = ["{aid}"]\ncert_renew_fraction = 0.5\n')
    proc = AundProcess(tmp_path / "state", tmp_path / "aund.sock", cfg)
    proc.start()
    proc.aid = aid
    try:
        yield proc
    finally:
        assert proc.stop() == 0


def _cert_status(devnet, aid: str, fingerprint: str) -> int:
    try:
        with urllib.request.urlopen(f"{devnet.http_url}/pki/cert/{aid}?cert_fingerprint={fingerprint}", timeout=5) as r:
            return r.status
    except urllib.error.HTTPError as exc:
        return exc.code


def test_renewal_timer_cli_renew_and_rekey(short_devnet, daemon, tmp_path):
    aid = daemon.aid
    with Client(daemon.socket, app="renew-test", timeout=30) as client:
        session = client.session(aid)
        wait_until(lambda: _ready(session), 30, 0.2, "the configured link")
        first = client.sign(aid, b"x")["cert_fingerprint"]
        seen = {first}

        def renewed_twice():
            seen.add(client.sign(aid, b"x")["cert_fingerprint"])
            return len(seen) >= 3

        # the timer: renewed before expiry, and again for the renewed certificate
        wait_until(renewed_twice, 3 * CERT_TTL, 0.25, "two automatic renewals")
        assert session.call("meta.ping", timeout=10)["pong"] is True  # the link lives on
        assert all(_cert_status(short_devnet, aid, fp) == 200 for fp in seen)  # every one still served
        events = [e for e in daemon.log_events() if e.get("event") == "identity.cert_renewed"]
        assert len(events) >= 2 and all(e["aid"] == aid for e in events)

        # the CLI, as an operator runs it
        r = aund("aid", "renew", aid, "--socket", str(daemon.socket), "--json")
        assert r.returncode == 0, r.stderr
        renewed = json.loads(r.stdout)
        assert renewed["rekeyed"] is False and renewed["cert_fingerprint"] != renewed["old_cert_fingerprint"]
        r = aund("aid", "renew", aid, "--rekey", "--socket", str(daemon.socket))
        assert r.returncode == 0 and r.stdout.startswith(f"rekeyed {aid}  sha256:"), r.stderr
        after = client.sign(aid, b"after the rekey")
        assert client.verify(b"after the rekey", after["signature"], aid=aid)["valid"] is True
        assert session.call("meta.ping", timeout=10)["pong"] is True
        r = aund("aid", "renew", "not an aid", "--socket", str(daemon.socket))
        assert r.returncode == 1 and "InvalidParams" in r.stderr and "Traceback" not in r.stderr

    aid_dir = tmp_path / "state" / "AIDs" / aid
    assert len(list((aid_dir / "keys").glob("sha256_*.enc.json"))) == 2  # the old key and the new one
    assert len(list((aid_dir / "certs").glob("sha256_*.pem"))) >= len(seen) + 2
    assert not (aid_dir / "keys" / "rekey-pending.enc.json").exists()  # renamed into keys/, not left pending


def _ready(session) -> bool:
    try:
        return session.wait_ready(timeout=1)["state"] == "ready"
    except Exception:  # noqa: BLE001 (NotReady while it connects)
        return False


async def _async_ops(socket, aid: str):
    """The asyncio twins of the identity ops and notify."""
    async with AsyncClient(socket, app="ops-async", timeout=30) as client:
        signed = await client.sign(aid, b"async")
        good = (await client.verify(b"async", signed["signature"], aid=aid))["valid"]
        bad = (await client.verify(b"other", signed["signature"], aid=aid))["valid"]
        assert (await client.resolve_peer(aid))["cert_fingerprint"] == signed["cert_fingerprint"]
        session = client.session(aid, options={"delivery_mode": "fanout"})
        await session.wait_ready(timeout=20)
        sent = await session.notify("event/app.async", {"n": 2}, to=aid, ttl_ms=1000)
        return good, bad, sent["method"]


def test_identity_ops_over_the_socket(devnet, tmp_path):
    aid = f"ops-{os.getpid() % 10000}.aid.test"
    cfg = tmp_path / "aund.toml"
    cfg.write_text(f'gateway_url = ["{devnet.gateway_url}"]\nroot_ca = ["{devnet.root_ca}"]\n'
                   f'identities = ["{aid}"]\n')
    proc = AundProcess(tmp_path / "state", tmp_path / "aund.sock", cfg)
    proc.start()
    try:
        with Client(proc.socket, app="ops-test", timeout=30) as client:
            ops = client.hello["ops"]
            assert {"identity.sign", "identity.verify", "peer.resolve", "identity.renew", "session.notify"} <= set(ops)
            session = client.session(aid)
            wait_until(lambda: _ready(session), 30, 0.2, "the configured link")
            signed = client.sign(aid, "text is signed as UTF-8")
            assert isinstance(signed["signature"], bytes)
            ok = client.verify("text is signed as UTF-8", signed["signature_b64"], aid=aid)
            assert ok == {"valid": True, "aid": aid, "cert_fingerprint": signed["cert_fingerprint"]}
            assert client.verify(b"other text", signed["signature"], aid=aid)["valid"] is False
            peer = client.resolve_peer(aid)
            assert peer["cert_fingerprint"] == signed["cert_fingerprint"] and peer["verified"] is True
            assert client.verify(b"text is signed as UTF-8", signed["signature"], cert=peer["cert"])["valid"]
            with pytest.raises(ResourceNotExistError):  # (PermissionDenied: tests/interop/test_identity_ops_fastaun.py)
                client.sign("someone-else.aid.test", b"x")
            with pytest.raises(InvalidParams) as bad:
                client.verify(b"x", "not base64!!", aid=aid)
            assert bad.value.data["arg"] == "signature"
            with pytest.raises(InvalidParams) as bad:
                client.request("identity.verify", {"data": b"x", "signature": b"y"})
            assert bad.value.data["arg"] == "aid"
            # notify: what the SDK refuses is refused here, with the argument named
            assert session.notify("event/app.hello", {"n": 1}, to=aid) == {"sent": True,
                                                                          "method": "notification/route"}
            assert session.notify("notification/client.activity", {"state": "idle"})["method"] == \
                "notification/client.activity"
            for kwargs, arg in (({"method": "event/message.received", "to": aid}, "method"),
                                ({"method": "event/app.x"}, "method"),
                                ({"method": "event/app.x", "to": aid, "group_id": "g-1.aid.test"}, "group_id"),
                                ({"method": "event/app.x", "to": aid, "slot_id": "s"}, "slot_id"),
                                ({"method": "event/app.x", "to": aid, "ttl_ms": 60001}, "ttl_ms"),
                                ({"method": "event/app.x", "to": aid, "params": {"b": "x" * 70000}}, "params")):
                method = kwargs.pop("method")
                with pytest.raises(InvalidParams) as bad:
                    session.notify(method, **kwargs)
                assert bad.value.data["arg"] == arg, kwargs
            assert asyncio.run(_async_ops(proc.socket, aid)) == (True, False, "notification/route")
            stats = devnet.stats()
            assert stats["rpc"].get("notify notification/route", 0) >= 1
            assert stats["rpc"].get("notify notification/client.activity", 0) == 1
    finally:
        assert proc.stop() == 0


async def test_a_second_instance_takes_the_certificate_the_first_renewed(devnet, tmp_path):
    """Two daemons hold one AID; one renews. When the other has to log in again, the gateway
    refuses its (old) certificate: it takes the current one for its key from the gateway,
    verified, keeps the old one in its history, and logs in."""
    aid = f"twice-{os.getpid() % 10000}.aid.test"
    with trio.fail_after(90):
        async with trio.open_nursery() as nursery:
            one = await start_daemon(nursery, devnet, tmp_path / "one", [aid])
            await ready_handle(one, aid)
            src = await trio.to_thread.run_sync(one.store.load, aid)
            (tmp_path / "two" / "aund").mkdir(parents=True)
            other = IdentityStore(tmp_path / "two" / "aund", "seed")
            other.import_read(FastaunIdentity(aid, "-", src.private_key, src.cert, (), devnet.gateway_url))
            two = await start_daemon(nursery, devnet, tmp_path / "two", [aid])
            handle = await ready_handle(two, aid)
            renewed = await one.renew_identity(APP, aid)
            entry = two.links[(aid, "main")]
            assert entry.link.creds.cert_fingerprint == src.cert_fingerprint  # it does not know yet
            entry.link._tokens = auth.Tokens("", "", 0.0)  # fault: its tokens are gone, a full login follows
            entry.link._session.end(1006)  # and the connection drops
            while not (entry.link.state.value == "ready" and
                       entry.link.creds.cert_fingerprint == renewed["cert_fingerprint"]):
                await trio.sleep(0.05)
                assert entry.link.state.value != "connection_failed", entry.link.last_error
            assert (await handle.call("meta.ping", {}, timeout=10, background=False, app=APP))["pong"]
            assert two.store.load(aid).cert_fingerprint == renewed["cert_fingerprint"]
            history = {p.name for p in (tmp_path / "two" / "aund" / "AIDs" / aid / "certs").iterdir()}
            assert "sha256_" + src.cert_fingerprint.removeprefix("sha256:") + ".pem" in history
            assert two.sessions[aid].identity.cert_fingerprint == renewed["cert_fingerprint"]
            await one.aclose()
            await two.aclose()


async def test_new_cert_of_login2_is_checked_and_adopted(tmp_path):
    """Past half its validity the gateway renews the certificate at login (`new_cert` in
    aid_login2, protocol doc 01); aund checks it and takes it, keeping the old one."""
    devnet = DevnetProcess(tmp_path / "devnet", extra_args=["--cert-ttl", "4"])
    devnet.start()
    aid = f"login-{os.getpid() % 10000}.aid.test"
    try:
        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                daemon = await start_daemon(nursery, devnet, tmp_path, [aid], cert_renew_fraction=0.01)
                await ready_handle(daemon, aid)
                entry = daemon.links[(aid, "main")]
                first = entry.link.creds.cert_fingerprint
                cert = daemon.store.load(aid).cert
                half = (cert.not_valid_before_utc.timestamp() + cert.not_valid_after_utc.timestamp()) / 2
                await trio.sleep(max(0.0, half - time.time()) + 0.2)  # the devnet's certificate clock is real
                entry.link._tokens = auth.Tokens("", "", 0.0)  # fault: a full login follows the drop
                entry.link._session.end(1006)
                while entry.link.creds.cert_fingerprint == first or entry.link.state.value != "ready":
                    await trio.sleep(0.05)
                assert daemon.store.load(aid).cert_fingerprint == entry.link.creds.cert_fingerprint
                assert daemon.sessions[aid].identity.cert_fingerprint == entry.link.creds.cert_fingerprint
                history = list((tmp_path / "aund" / "AIDs" / aid / "certs").glob("sha256_*.pem"))
                assert len(history) == 2
                await daemon.aclose()
    finally:
        assert devnet.stop() == 0


async def test_a_rekey_the_gateway_took_before_aund_stored_it_is_finished(devnet, tmp_path):
    """The reply of auth.rekey is lost after the gateway took the new key (here: the call is made
    and its answer dropped): the next `identity.renew --rekey` finds the gateway serving a
    certificate for the kept pending key and finishes with it instead of making another key."""
    aid = f"lost-{os.getpid() % 10000}.aid.test"
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            daemon = await start_daemon(nursery, devnet, tmp_path, [aid])
            handle = await ready_handle(daemon, aid)
            old = daemon.store.load(aid)
            pending = daemon.store.rekey_pending(aid)
            # the gateway takes the new key; its answer is lost
            await auth.rekey(devnet.gateway_url, daemon.trust, aid, old.private_key, old.cert_pem, pending)
            done = await daemon.renew_identity(APP, aid, rekey=True)
            now = daemon.store.load(aid)
            assert done["rekeyed"] and now.public_key_b64 == pki.public_key_b64(pending.public_key())
            assert len(daemon.store.past_keys(aid)) == 1
            assert (await handle.call("meta.ping", {}, timeout=10, background=False, app=APP))["pong"]
            await daemon.aclose()
