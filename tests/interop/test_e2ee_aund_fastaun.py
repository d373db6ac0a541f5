"""E2EE v2 between an aund-held AID and the official SDK, both directions, through devnet."""
from __future__ import annotations

import json
import os
import sys
from contextlib import aclosing, asynccontextmanager

import pytest
import trio

from aund.broker.backend import AppIdentity
from aund.errors import InvalidParams
from tests.helpers import ROOT
from tests.inproc import APP, ready_handle, start_daemon

pytestmark = [pytest.mark.interop, pytest.mark.timeout(180)]


async def _fastaun(scenario, devnet, work, **env):
    full_env = dict(os.environ, AUN_GW_URL=devnet.gateway_url, AUN_ROOT_CA=devnet.root_ca, AUN_WORKDIR=str(work),
                    **env)
    return await trio.run_process([sys.executable, str(ROOT / "tests/interop/fastaun_driver.py"), scenario],
                                  env=full_env, capture_stdout=True, capture_stderr=True, check=False)


async def _collect(daemon, app, aid, consumer, n, kinds=("message.received",)):
    out = []
    async with aclosing(daemon.subscribe(app, aid, kinds, consumer, "last_ack")) as events:
        async for event in events:
            out.append(event)
            await daemon.ack(app, aid, consumer, event.cursor)
            if len(out) >= n:
                return out


async def test_e2ee_both_ways_with_protected_headers(devnet, tmp_path):
    n = 100
    alice = f"alice-{os.getpid() % 100000}.aid.test"
    work = tmp_path / "sdk"
    work.mkdir()
    app = AppIdentity(1, os.getpid(), os.getuid(), os.getgid(), "test")
    result = {}
    with trio.fail_after(150):
        async with trio.open_nursery() as nursery:
            daemon = await start_daemon(nursery, devnet, tmp_path, [alice])
            handle = await ready_handle(daemon, alice, app)
            handle.set_protected_headers(app, {"trace": "from-aund"})

            async def run_peer():
                result["proc"] = await _fastaun("peer", devnet, work, PEER_AID=alice, N=str(n))

            nursery.start_soon(run_peer)
            while not (work / "peer.json").exists():
                await trio.sleep(0.05)
            bob = json.loads((work / "peer.json").read_text())["aid"]
            for i in range(n):
                r = await handle.call("message.send", {"to": bob, "payload": {"type": "text", "text": f"a2f {i}"}},
                                      timeout=None, background=False, app=app)
                assert r["status"] == "delivered"
            (work / "go").touch()
            events = await _collect(daemon, app, alice, "t", n)
            while "proc" not in result:
                await trio.sleep(0.05)
            await daemon.aclose()
    proc = result["proc"]
    checks = [json.loads(x) for x in proc.stdout.decode().splitlines() if x.startswith("{")]
    failed = [c for c in checks if not c.get("ok", True)]
    assert proc.returncode == 0 and not failed, (failed, proc.stderr.decode()[-3000:])
    assert [e.data["payload"]["text"] for e in events] == [f"f2a {i}" for i in range(n)]
    assert all(e.kind == "message.received" and e.data["encrypted"] for e in events)
    assert all(e.data["from"] == bob and e.data["to"] == alice for e in events)
    hdrs = [e.data["protected_headers"] for e in events]
    assert all(h["trace"] == "from-fastaun" for h in hdrs) and [h["seq_hint"] for h in hdrs] == [str(i) for i in range(n)]
    assert len({e.data["message_id"] for e in events}) == n


def _checks(proc):
    checks = [json.loads(x) for x in proc.stdout.decode().splitlines() if x.startswith("{")]
    failed = [c for c in checks if not c.get("ok", True)]
    assert proc.returncode == 0 and checks and not failed, (failed, proc.stderr.decode()[-3000:])
    return checks


async def test_e2ee_while_the_receiver_is_offline_and_after_prekey_rotation(devnet, tmp_path):
    n = 100
    alice = f"alice-{os.getpid() % 100000}.aid.test"
    work = tmp_path / "sdk"
    work.mkdir()
    app = AppIdentity(1, os.getpid(), os.getuid(), os.getgid(), "test")
    with trio.fail_after(170):
        # 1. alice's daemon runs once (publishing her prekey), then stops
        async with trio.open_nursery() as nursery:
            daemon = await start_daemon(nursery, devnet, tmp_path, [alice])
            handle = await ready_handle(daemon, alice, app)
            first_spk = daemon.sessions[alice].current_spk_id
            await daemon.aclose()
        # 2. fastaun sends n messages while alice is offline
        _checks(await _fastaun("peer_phase", devnet, work, PEER_AID=alice, N=str(n), PHASE="send"))
        bob = json.loads((work / "fastpeer.json").read_text())["aid"]
        # 3. alice comes back: everything arrives by pull, in order; then she sends n while bob is away
        async with trio.open_nursery() as nursery:
            daemon = await start_daemon(nursery, devnet, tmp_path, [alice])
            handle = await daemon.open_session(app, alice, "main")
            await handle.wait_ready()
            events = await _collect(daemon, app, alice, "t", n)
            rotated_spk = daemon.sessions[alice].current_spk_id
            for i in range(n):
                await handle.call("message.send", {"to": bob, "payload": {"type": "text", "text": f"a2f-off {i}"}},
                                  timeout=None, background=False, app=app)
            # 4. bob comes back, gets alice's messages by pull, and sends n more to her rotated prekey
            _checks(await _fastaun("peer_phase", devnet, work, PEER_AID=alice, N=str(n), PHASE="recv"))
            late = await _collect(daemon, app, alice, "t", n)
            await daemon.aclose()
    assert [e.data["payload"]["text"] for e in events] == [f"f2a-off {i}" for i in range(n)]
    assert rotated_spk != first_spk  # reading a message wrapped to the published prekey rotated it
    assert [e.data["payload"]["text"] for e in late] == [f"f2a-late {i}" for i in range(n)]
    assert all(e.kind == "message.received" and e.data["encrypted"] for e in events + late)


@asynccontextmanager
async def _aund_and_peer(devnet, tmp_path, alice, scenario, ready_file, **env):
    """An in-process daemon holding `alice` and the fastaun `scenario` (PEER_AID=alice, `env`)
    beside it; yields (call, work dir) once the peer wrote `ready_file`; on exit waits for the
    peer and asserts its checks."""
    work = tmp_path / "sdk"
    work.mkdir()
    result = {}
    async with trio.open_nursery() as nursery:
        daemon = await start_daemon(nursery, devnet, tmp_path, [alice])
        handle = await ready_handle(daemon, alice)

        async def call(method, params):
            return await handle.call(method, params, timeout=None, background=False, app=APP)

        async def run_peer():
            result["proc"] = await _fastaun(scenario, devnet, work, PEER_AID=alice, **env)

        nursery.start_soon(run_peer)
        while not (work / ready_file).exists():
            await trio.sleep(0.05)
        yield call, work
        while "proc" not in result:
            await trio.sleep(0.05)
        await daemon.aclose()
    _checks(result["proc"])


async def test_p2p_thoughts_both_ways_end_to_end_encrypted(devnet, tmp_path):
    """message.thought.put / get between an aund-held AID and fastaun: each reads the other's
    thought decrypted, and fastaun finds a V2 envelope in what aund put (never plaintext)."""
    alice = f"think-{os.getpid() % 100000}.aid.test"
    ctx = {"type": "run", "id": "run-aund"}
    with trio.fail_after(90):
        async with _aund_and_peer(devnet, tmp_path, alice, "thoughts", "put") as (call, work):
            bob = json.loads((work / "thinker.json").read_text())["aid"]
            got = await call("message.thought.get", {"sender_aid": bob, "context": ctx})
            assert got["found"] is True and len(got["thoughts"]) == 1, got
            thought = got["thoughts"][0]
            assert thought["encrypted"] is True and thought["payload"] == {"type": "thought", "text": "f-thought"}
            assert thought["protected_headers"]["step"] == "1"
            with pytest.raises(InvalidParams):  # never in plaintext
                await call("message.thought.put", {"to": bob, "context": ctx, "encrypt": False,
                                                   "payload": {"type": "thought", "text": "plain"}})
            put = await call("message.thought.put", {"to": bob, "context": ctx,
                                                     "payload": {"type": "thought", "text": "a-thought"}})
            assert put["thought_id"].startswith("mt-") and put["stored_count"] == 1
            (work / "aund_put").touch()


async def test_p2p_history_both_ways_decrypted(devnet, tmp_path):
    """message.history between an aund-held AID and fastaun: aund hands its app the peer's
    messages decrypted (never ciphertext), page by page; fastaun reads aund's the same way."""
    n = 5
    alice = f"hist-{os.getpid() % 100000}.aid.test"
    with trio.fail_after(120):
        async with _aund_and_peer(devnet, tmp_path, alice, "history", "sent", N=str(n)) as (call, work):
            bob = json.loads((work / "historian.json").read_text())["aid"]
            for i in range(n):
                await call("message.send", {"to": bob, "payload": {"type": "text", "text": f"a-hist {i}"}})
            (work / "aund_sent").touch()
            first = await call("message.history", {"sender_aid": bob, "before_seq": 10**9, "limit": 3})
            assert first["has_older"] is True and len(first["messages"]) == 3, first
            older = await call("message.history", {"sender_aid": bob, "before_seq": first["next_before_seq"],
                                                   "limit": 3})
            assert older["has_older"] is False and len(older["messages"]) == n - 3, older
            rows = older["messages"] + first["messages"]
            assert [r["payload"]["text"] for r in rows] == [f"f-hist {i}" for i in range(n)]
            assert all(r["encrypted"] is True and r["from"] == bob and r["to"] == alice for r in rows)
            assert [r["seq"] for r in rows] == sorted(r["seq"] for r in rows)
            assert "envelope_json" not in json.dumps(first) + json.dumps(older)  # no ciphertext handed on
            for bad, arg in (({"before_seq": 10}, "sender_aid"), ({"sender_aid": bob}, "before_seq"),
                             ({"sender_aid": bob, "before_seq": 5, "limit": 201}, "limit")):
                with pytest.raises(InvalidParams) as refused:
                    await call("message.history", bad)
                assert refused.value.data["arg"] == arg
