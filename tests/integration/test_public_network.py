"""aund against a devnet shaped like the public AUN network's PKI (`--pki production`: P-384 root,
registry and issuer, an ES384 login signature), with revocation, and with no root configured."""
from __future__ import annotations

import json
import os
import urllib.error
import urllib.request
from contextlib import aclosing
from pathlib import Path

import pytest
import trio

from aund.identity import agent_md
from tests.inproc import APP, ready_handle, start_daemon

pytestmark = pytest.mark.timeout(120)


def _cert_status(devnet, aid) -> int:
    try:
        with urllib.request.urlopen(f"{devnet.http_url}/pki/cert/{aid}", timeout=5) as r:
            return r.status
    except urllib.error.HTTPError as exc:
        return exc.code


async def test_a_revoked_sender_is_undecryptable_on_a_production_pki(prod_devnet, tmp_path):
    tag = os.getpid() % 100000
    mallory, bob = f"mallory-{tag}.aid.test", f"bob-{tag}.aid.test"
    with trio.fail_after(90):
        async with trio.open_nursery() as nursery:
            daemon = await start_daemon(nursery, prod_devnet, tmp_path, [mallory, bob])
            m, _ = await ready_handle(daemon, mallory), await ready_handle(daemon, bob)  # ES384 login1 accepted
            assert daemon.trust.roots.names()[0] == "O=AgentUnion,CN=AUN Root CA"
            r = await m.call("message.send", {"to": bob, "payload": {"type": "text", "text": "before"}},
                             timeout=None, background=False, app=APP)
            assert r["status"] == "delivered"
            got = []
            async with aclosing(daemon.subscribe(APP, bob, ("message.received", "message.undecryptable"), "t",
                                                 "last_ack")) as events:
                async for event in events:
                    got.append(event)
                    await daemon.ack(APP, bob, "t", event.cursor)
                    if len(got) == 1:
                        req = urllib.request.Request(f"{prod_devnet.http_url}/devnet/revoke", method="POST",
                                                     data=json.dumps({"aid": mallory}).encode())
                        with urllib.request.urlopen(req, timeout=5) as resp:
                            assert json.loads(resp.read())["aid"] == mallory
                        # a fresh reader: no certificate, CRL or OCSP answer cached from before the revocation
                        # (a running one learns of it when those expire: at most an hour, as the SDK)
                        daemon.trust.replace_roots(daemon.trust.roots)
                        daemon.peers.forget()
                        r = await m.call("message.send", {"to": bob, "payload": {"type": "text", "text": "after"}},
                                         timeout=None, background=False, app=APP)
                        assert r["status"] == "delivered"
                    if len(got) == 2:
                        break
            await daemon.aclose()
    assert got[0].kind == "message.received" and got[0].data["payload"]["text"] == "before"
    assert got[0].data["encrypted"] is True
    assert got[1].kind == "message.undecryptable"
    assert got[1].data["reason"] == "certificate_revoked" and "revoked" in got[1].data["detail"]
    assert "payload" not in got[1].data


async def test_no_trusted_root_claims_no_name_and_a_dropped_in_root_heals_on_reload(prod_devnet, tmp_path):
    aid = f"lone-{os.getpid() % 100000}.aid.test"
    with trio.fail_after(90):
        async with trio.open_nursery() as nursery:
            daemon = await start_daemon(nursery, prod_devnet, tmp_path, [aid], root_ca=False)
            while aid not in daemon.identity_errors:
                await trio.sleep(0.05)
            code, message = daemon.identity_errors[aid]
            assert code == "identity.invalid"
            assert "not registering" in message and "not a trusted AUN root" in message
            assert "trust-roots.pem" in message
            assert _cert_status(prod_devnet, aid) == 404  # the name was not claimed
            (daemon.config.state_dir / "trust-roots.pem").write_text(Path(prod_devnet.root_ca).read_text())
            daemon.reload(daemon.config)  # what SIGHUP does
            handle = await ready_handle(daemon, aid)
            assert (await handle.call("meta.ping", {}, timeout=None, background=False, app=APP)) is not None
            assert aid not in daemon.identity_errors
            assert _cert_status(prod_devnet, aid) == 200
            await daemon.aclose()


async def test_a_gateway_without_the_agent_md_gets_it_again_and_the_call_succeeds(devnet, tmp_path):
    """The devnet admits clients that declare agent.md validation only with an agent.md (-32003, as
    production). aund published one at the first connection; when the gateway loses it, the next
    call is refused, aund publishes it again and the call succeeds."""
    aid, peer = f"card-{os.getpid() % 100000}.aid.test", f"peer-{os.getpid() % 100000}.aid.test"
    with trio.fail_after(90):
        async with trio.open_nursery() as nursery:
            daemon = await start_daemon(nursery, devnet, tmp_path, [aid, peer])
            handle = await ready_handle(daemon, aid)
            await ready_handle(daemon, peer)
            meta = await trio.to_thread.run_sync(daemon.store.load_meta, aid)
            assert meta["agent_md_etag"] and meta["agent_md"].startswith(f'---\naid: "{aid}"')
            req = urllib.request.Request(f"{devnet.http_url}/devnet/agent-md?aid={aid}", method="DELETE")
            with urllib.request.urlopen(req, timeout=5) as resp:
                assert json.loads(resp.read())["deleted"] is True
            r = await handle.call("message.send", {"to": peer, "payload": {"type": "text", "text": "x"},
                                                   "encrypt": False}, timeout=None, background=False, app=APP)
            assert r["status"] == "delivered"
            await daemon.aclose()
    stats = devnet.stats()
    assert stats["rpc_errors"].get("message.send -32003", 0) >= 1  # refused once, then recovered from
    with urllib.request.urlopen(urllib.request.Request(f"{devnet.http_url}/agent.md", headers={"Host": aid}),
                                timeout=5) as resp:
        again = resp.read().decode()  # the same card, signed again and published
    assert agent_md.payload_of(again) == agent_md.payload_of(meta["agent_md"]) and agent_md.MARKER in again
