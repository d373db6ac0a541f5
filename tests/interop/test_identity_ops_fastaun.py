"""Identity operations of an aund-held AID judged by the official SDK, through the devnet:
identity.sign verified by fastaun (before and after a renewal, each by its certificate's
fingerprint), fastaun's signature checked by identity.verify, peer.resolve, session.notify reaching
fastaun as `app.ping`, and a rekey: a message fastaun sent to the old key while aund was offline is
still read after it, fastaun reaches the new key, and fastaun verifies and decrypts aund's next one."""
from __future__ import annotations

import base64
import json
import os
import sys
from contextlib import aclosing
from pathlib import Path

import pytest
import trio

from aund.errors import PermissionDenied
from aund.broker.backend import AppIdentity
from tests.helpers import ROOT
from tests.inproc import APP, ready_handle, start_daemon

pytestmark = [pytest.mark.interop, pytest.mark.timeout(240)]
STRANGER = AppIdentity(9, os.getpid(), os.getuid() + 4242, os.getgid() + 4242, "stranger")


async def _wait_file(path: Path, seconds: float = 60.0) -> None:
    with trio.fail_after(seconds):
        while not path.exists():
            await trio.sleep(0.05)


async def _received(daemon, aid: str, consumer: str, text: str, seconds: float = 60.0):
    with trio.fail_after(seconds):
        async with aclosing(daemon.subscribe(APP, aid, ("message.received", "message.undecryptable"),
                                             consumer, "last_ack")) as events:
            async for event in events:
                await daemon.ack(APP, aid, consumer, event.cursor)
                if (event.data.get("payload") or {}).get("text") == text or event.kind == "message.undecryptable":
                    return event


async def test_sign_verify_resolve_notify_renew_rekey_with_fastaun(devnet, tmp_path):
    alice = f"alice-{os.getpid() % 100000}.aid.test"
    work = tmp_path / "sdk"
    work.mkdir()
    env = dict(os.environ, AUN_GW_URL=devnet.gateway_url, AUN_ROOT_CA=devnet.root_ca, AUN_WORKDIR=str(work),
               PEER_AID=alice)
    proc: dict = {}

    async def run_judge():
        proc["done"] = await trio.run_process(
            [sys.executable, str(ROOT / "tests/interop/fastaun_identity_driver.py"), "judge"], env=env,
            capture_stdout=True, capture_stderr=True, check=False)

    with trio.fail_after(220):
        async with trio.open_nursery() as outer:
            async with trio.open_nursery() as nursery:
                daemon = await start_daemon(nursery, devnet, tmp_path, [alice])
                handle = await ready_handle(daemon, alice)
                outer.start_soon(run_judge)
                await _wait_file(work / "judge.json")
                bob = json.loads((work / "judge.json").read_text())["aid"]

                # sign: the key never leaves aund; verified here and (below) by fastaun
                first = await daemon.sign(APP, alice, b"first")
                assert first["algorithm"] == "ECDSA-SHA256" and first["signature_b64"]
                mine = await daemon.verify(APP, b"first", first["signature"], aid=alice)
                assert mine == {"valid": True, "aid": alice, "cert_fingerprint": first["cert_fingerprint"]}
                assert not (await daemon.verify(APP, b"firsT", first["signature"], aid=alice))["valid"]
                with pytest.raises(PermissionDenied):
                    await daemon.sign(STRANGER, alice, b"not yours")
                renewed = await daemon.renew_identity(APP, alice)
                assert renewed["old_cert_fingerprint"] == first["cert_fingerprint"] != renewed["cert_fingerprint"]
                second = await daemon.sign(APP, alice, b"second")
                assert second["cert_fingerprint"] == renewed["cert_fingerprint"]
                old = await daemon.verify(APP, b"first", first["signature"], aid=alice,
                                          fingerprint=first["cert_fingerprint"])
                assert old["valid"] and old["cert_fingerprint"] == first["cert_fingerprint"]
                (work / "signed.json").write_text(json.dumps([
                    {"data_b64": base64.b64encode(d).decode(), "signature_b64": s["signature_b64"],
                     "cert_fingerprint": s["cert_fingerprint"]} for d, s in ((b"first", first), (b"second", second))]))

                # fastaun's signature, checked against its verified certificate
                await _wait_file(work / "fa_signed.json")
                theirs = json.loads((work / "fa_signed.json").read_text())
                data = base64.b64decode(theirs["data_b64"])
                checked = await daemon.verify(APP, data, base64.b64decode(theirs["signature_b64"]), aid=bob,
                                              fingerprint=theirs["cert_fingerprint"])
                assert checked == {"valid": True, "aid": bob, "cert_fingerprint": theirs["cert_fingerprint"]}
                peer = await daemon.resolve_peer(APP, bob)
                assert peer["cert_fingerprint"] == theirs["cert_fingerprint"] and peer["gateway"] == devnet.gateway_url
                by_cert = await daemon.verify(APP, data, base64.b64decode(theirs["signature_b64"]),
                                              cert_pem=peer["cert"])
                assert by_cert["valid"] and by_cert["aid"] == bob

                # notify: best effort, so sent until fastaun says it has one
                while not (work / "got_ping").exists():
                    assert (await handle.notify("event/app.ping", {"n": 1}, app=APP, to=bob)) == \
                        {"sent": True, "method": "notification/route"}
                    await trio.sleep(0.3)
                await daemon.aclose()

            # offline: fastaun sends to the key aund has now; then aund rekeys before it reads it
            (work / "go_before").touch()
            await _wait_file(work / "sent_before")
            async with trio.open_nursery() as nursery:
                daemon = await start_daemon(nursery, devnet, tmp_path, [])  # no link yet: nothing is read
                rekeyed = await daemon.renew_identity(APP, alice, rekey=True)
                assert rekeyed["rekeyed"] and rekeyed["old_cert_fingerprint"] == renewed["cert_fingerprint"]
                assert len(await trio.to_thread.run_sync(daemon.store.past_keys, alice)) == 1
                handle = await ready_handle(daemon, alice)
                late = await _received(daemon, alice, "late", "before-rekey")
                assert late.kind == "message.received" and late.data["encrypted"], late.data
                assert daemon.sessions[alice].opened_with_past_key == 1  # wrapped to the key before the rekey
                (work / "rekeyed").touch()
                after = await _received(daemon, alice, "late", "after-rekey")
                assert after.kind == "message.received" and after.data["encrypted"], after.data
                r = await handle.call("message.send", {"to": bob, "payload": {"type": "text",
                                                                                "text": "from-aund-after-rekey"}},
                                      timeout=None, background=False, app=APP)
                assert r["status"] == "delivered"
                with trio.fail_after(90):
                    while "done" not in proc:
                        await trio.sleep(0.1)
                await daemon.aclose()
    done = proc["done"]
    checks = [json.loads(x) for x in done.stdout.decode().splitlines() if x.startswith("{")]
    failed = [c for c in checks if not c.get("ok", True)]
    assert done.returncode == 0 and checks and not failed, (failed, done.stderr.decode()[-3000:])
    assert sum(1 for c in checks if c["check"].startswith("fastaun verifies aund's signature")) == 2
