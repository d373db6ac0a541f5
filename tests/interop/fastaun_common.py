"""What every fastaun driver shares: the environment (AUN_GW_URL, AUN_ROOT_CA, AUN_WORKDIR), the
SDK pointed at our gateway, check lines on stdout, and the SDK's own identity pattern.

Imported by the drivers that run fastaun in their own process (tests/interop/*driver.py,
tests/system/fastaun_flood.py); imports only fastaun, never aund.
"""
import asyncio
import json
import os
import secrets
from pathlib import Path
from urllib.parse import urlsplit

GW, ROOT_CA, WORK = os.environ["AUN_GW_URL"], os.environ["AUN_ROOT_CA"], Path(os.environ["AUN_WORKDIR"])
_u = urlsplit(GW)
# the agent.md name service is the gateway itself
os.environ.setdefault("AUN_NAMESERVICE_URL", f"{'https' if _u.scheme == 'wss' else 'http'}://{_u.netloc}")
from aun_core import AIDStore, AUNClient  # noqa: E402,F401  (re-exported to the drivers)

failed: list[str] = []


def check(name, ok, detail=None):
    """One JSON line per check; the driver exits 1 if any failed."""
    print(json.dumps({"check": name, "ok": bool(ok), "detail": detail}, default=str), flush=True)
    if not ok:
        failed.append(name)


def note(**fields):
    print(json.dumps({"note": fields}, default=str), flush=True)


def store_for(name):
    return AIDStore(aun_path=str(WORK / name), encryption_seed="t", root_ca_path=ROOT_CA, verify_ssl=False)


async def ensure(name, aid=None):
    """Load the identity; register only if absent; load again (the SDK's own guidance).
    Returns (aid, the SDK's AID object)."""
    store = store_for(name)
    aid = aid or f"{name}-{secrets.token_hex(3)}.aid.test"
    loaded = store.load(aid)
    if not loaded.ok:
        store._keystore.set_metadata_value(aid, "gateway_url", GW)  # point discovery at our gateway
        registered = await store.register(aid, type="agent")
        if not registered.ok:
            raise SystemExit(f"register {aid}: {registered.error.message}")
        loaded = store.load(aid)
    return aid, loaded.data["aid"]


async def wait_for(pred, timeout=10.0):
    for _ in range(int(timeout / 0.05)):
        if pred():
            return True
        await asyncio.sleep(0.05)
    return pred()


async def open_phase(name, phase):
    """One phase of a multi-process exchange: the identity `name` (kept in WORK/{name}.json across
    the phases' processes), connected, with the messages it receives collected. Returns
    (aid, client, received list)."""
    ids_file = WORK / f"{name}.json"
    known = json.loads(ids_file.read_text())["aid"] if ids_file.exists() else None
    aid, ident = await ensure(name, known)
    ids_file.write_text(json.dumps({"aid": aid}))
    client = AUNClient(ident)
    got = []
    client.on("message.received", lambda m: got.append(m))
    await asyncio.wait_for(client.connect({"auto_reconnect": False}), 30)
    check(f"connect {phase}", client.state.value == "ready")
    return aid, client, got
