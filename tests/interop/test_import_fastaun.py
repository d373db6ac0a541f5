"""An identity registered by the official SDK moves into aund and connects from there."""
from __future__ import annotations

import json
import urllib.request
from pathlib import Path

import pytest
import trio

from aund.aun import auth
from aund.aun.link import Link, LinkConfig
from aund.daemon import StoreCredentials
from aund.identity.store import IdentityStore
from tests.helpers import run_fastaun

pytestmark = [pytest.mark.interop, pytest.mark.timeout(120)]


async def test_fastaun_identity_imports_and_connects(devnet, tmp_path):
    work = tmp_path / "sdk"
    await trio.to_thread.run_sync(lambda: run_fastaun("register_only", devnet, work))
    aid = json.loads((work / "ids.json").read_text())["imported"]
    store = IdentityStore(tmp_path / "aund-state", "aund-seed")
    identity = await trio.to_thread.run_sync(store.import_fastaun, work / "imported", aid, "t")
    assert identity.aid == aid
    # the certificate the gateway holds for the AID is the one we imported
    pem = await trio.to_thread.run_sync(
        lambda: urllib.request.urlopen(f"{devnet.http_url}/pki/cert/{aid}", timeout=5).read().decode())
    assert pem.strip() == identity.cert_pem.strip()
    trust = auth.GatewayTrust.from_files([Path(devnet.root_ca)])
    link = Link(StoreCredentials(store, identity), LinkConfig((devnet.gateway_url,), device_id=identity.device_id),
                trust)
    with trio.fail_after(30):
        async with trio.open_nursery() as n:
            await n.start(link.run)
            await link.wait_ready()
            status = await link.call("meta.status", {})
            await link.aclose()
    assert status["aid"] == aid and status["device_id"] == identity.device_id
