"""With AUND_DEBUG=true and a full E2EE exchange, no secret reaches the logs: not the seed,
tokens, identity or prekey private keys, nor message plaintext."""
from __future__ import annotations

import base64
import secrets

import pytest
from cryptography.hazmat.primitives import serialization

from aund.identity.store import IdentityStore
from client_stub import Client
from tests.helpers import AundProcess

pytestmark = pytest.mark.timeout(120)
SEED = "log-test-seed-" + secrets.token_hex(8)


def test_debug_logs_carry_no_secrets(devnet, tmp_path):
    alice, bob = (f"{n}-{secrets.token_hex(3)}.aid.test" for n in ("alice", "bob"))
    cfg = tmp_path / "aund.toml"
    cfg.write_text(f'gateway_url = ["{devnet.gateway_url}"]\nroot_ca = ["{devnet.root_ca}"]\n')
    daemon = AundProcess(tmp_path / "state", tmp_path / "aund.sock", cfg,
                         env={"AUND_DEBUG": "true", "AUND_ENCRYPTION_SEED": SEED})
    plaintext = "plaintext-" + secrets.token_hex(12)
    daemon.start()
    try:
        with Client(daemon.socket) as client:
            for aid in (alice, bob):
                client.ensure_identity(aid)
            a, b = client.session(alice), client.session(bob)
            a.wait_ready(timeout=30)
            b.wait_ready(timeout=30)
            with b.events("c", start="last_ack") as events:
                a.call("message.send", {"to": bob, "payload": {"type": "text", "text": plaintext},
                                        "protected_headers": {"note": "x"}})
                event = next(iter(events))
                assert event.data["payload"]["text"] == plaintext
                event.ack()
    finally:
        assert daemon.stop() == 0
    log = daemon.log_path.read_text()
    events = daemon.log_events()
    assert any(e.get("event") == "link.rpc" and e.get("level") == "debug" for e in events)  # debug was on
    assert any(e.get("event") == "broker.op" for e in events)
    store = IdentityStore(tmp_path / "state", SEED)
    found = {"seed": SEED, "plaintext": plaintext}
    for aid in (alice, bob):
        ident = store.load(aid)
        tokens = store.load_tokens(aid)
        found[f"{aid} access token"] = tokens["access_token"]
        found[f"{aid} refresh token"] = tokens["refresh_token"]
        der = ident.private_key.private_bytes(serialization.Encoding.DER, serialization.PrivateFormat.PKCS8,
                                              serialization.NoEncryption())
        found[f"{aid} key (b64)"] = base64.b64encode(der).decode()[16:64]
        pem = ident.private_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                              serialization.NoEncryption()).decode()
        found[f"{aid} key (pem)"] = pem.splitlines()[1]
        found[f"{aid} key (hex)"] = der.hex()[40:100]
        for record in store.load_prekeys(aid):
            found[f"{aid} prekey"] = record["private_pem"].splitlines()[1]
    assert all(len(v) >= 16 for v in found.values())
    leaked = [name for name, value in found.items() if value in log]
    assert leaked == [], f"secrets in the debug log: {leaked}"
