"""Flood a group that an aund-held AID owns with E2EE group messages from the official SDK
(fastaun 0.5.25, asyncio), in its own process. Modelled on tests/system/fastaun_flood.py and
tests/interop/fastaun_groups_driver.py; imports only aun_core, never aund.

Run as `python group_flood.py flood` with env AUN_GW_URL, AUN_ROOT_CA, AUN_WORKDIR, N (messages
in all), SENDERS (fastaun members sending at once) and GO (a file to wait for before sending).
Prints one JSON line per check ({"check", "ok", "detail"}) and exits 1 if any check failed.
Coordination with the test goes through files in AUN_WORKDIR:

  we write senders.json [aid, ...]       -> the test creates the group through aund and adds us
  test writes group.json {gid, owner}    -> we check that we are members, write ready
  test creates GO                        -> each sender sends its share of N E2EE group messages,
                                            one after the other. Message k of sender s: message_id
                                            "gf-<run>-<s>-<k>", payload {"text", "sender": s, "n": k}.
                                            A failed send is retried with the same message_id (the
                                            gateway answers a repeat with the stored seq). WORK/progress
                                            holds the count sent so far (rewritten every 10); once all
                                            are sent, sent.json lists {message_id, from, sender, n, seq}.
  test writes probe-<name>.req           -> (any time, also while sending) we ask the gateway for the
                                            group's head and every member's ack cursor and write
                                            probe-<name>.json {head, acks: {aid: last_ack_seq}}
  test writes done                       -> we close and exit (also after a 120 s deadline)
"""
import asyncio
import json
import os
import secrets
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit

GW, ROOT_CA, WORK = os.environ["AUN_GW_URL"], os.environ["AUN_ROOT_CA"], Path(os.environ["AUN_WORKDIR"])
_u = urlsplit(GW)
os.environ.setdefault("AUN_NAMESERVICE_URL", f"{'https' if _u.scheme == 'wss' else 'http'}://{_u.netloc}")
from aun_core import AIDStore, AUNClient  # noqa: E402

failed: list[str] = []
SENT_STATUSES = ("sent", "duplicate", "accepted", "delivered")


def check(name, ok, detail=None):
    print(json.dumps({"check": name, "ok": bool(ok), "detail": detail}, default=str), flush=True)
    if not ok:
        failed.append(name)


def note(**fields):
    print(json.dumps({"note": fields}, default=str), flush=True)


def write_json(path: Path, obj) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj))
    os.replace(tmp, path)


async def wait_path(path: Path, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.02)
    return True


async def open_member(name: str):
    """Register a fresh identity (the SDK's load / register / load sequence) and connect it."""
    store = AIDStore(aun_path=str(WORK / name), encryption_seed="t", root_ca_path=ROOT_CA, verify_ssl=False)
    aid = f"{name}-{secrets.token_hex(3)}.aid.test"
    loaded = store.load(aid)
    if not loaded.ok:
        store._keystore.set_metadata_value(aid, "gateway_url", GW)  # point discovery at our gateway
        registered = await store.register(aid, type="agent")
        if not registered.ok:
            raise SystemExit(f"register {aid}: {registered.error.message}")
        loaded = store.load(aid)
    client = AUNClient(loaded.data["aid"])
    await asyncio.wait_for(client.connect({"auto_reconnect": True}), 30)
    check(f"connect {name}", client.state.value == "ready", client.state.value)
    return aid, client


async def probe(client, gid: str) -> dict:
    members = await asyncio.wait_for(client.call("group.get_members", {"group_id": gid, "size": 200}), 10)
    info = await asyncio.wait_for(client.call("group.get_info", {"group_id": gid, "required": ["message_seq"]}), 10)
    return {"head": info.get("message_seq"), "acks": {m["aid"]: m.get("last_ack_seq") for m in members["members"]},
            "roles": {m["aid"]: m["role"] for m in members["members"]}}


async def serve_probes(client, gid: str, stop: asyncio.Event) -> None:
    """Answer every probe-<name>.req with probe-<name>.json (the gateway's view, at that moment)."""
    answered: set[str] = set()
    while not stop.is_set():
        for req in sorted(WORK.glob("probe-*.req")):
            name = req.name[len("probe-"):-len(".req")]
            if name in answered:
                continue
            answered.add(name)
            try:
                result = await probe(client, gid)
            except Exception as exc:  # noqa: BLE001 - reported to the test, which fails on it
                result = {"error": f"{type(exc).__name__}: {exc}"}
            write_json(WORK / f"probe-{name}.json", dict(result, t=time.time()))
        await asyncio.sleep(0.02)


async def flood():
    n, senders = int(os.environ.get("N", "400")), int(os.environ.get("SENDERS", "2"))
    go = Path(os.environ["GO"]) if os.environ.get("GO") else None
    run = secrets.token_hex(3)
    opened = await asyncio.gather(*(open_member(f"gflood{s}") for s in range(senders)))
    write_json(WORK / "senders.json", [aid for aid, _ in opened])
    stop = asyncio.Event()
    prober = None
    try:
        if not await wait_path(WORK / "group.json", 60):
            raise SystemExit("no group.json")
        info = json.loads((WORK / "group.json").read_text())
        gid, owner = info["gid"], info["owner"]
        for aid, client in opened:
            r = await client.call("group.get_members", {"group_id": gid})
            roles = {m["aid"]: m["role"] for m in r.get("members", [])}
            check(f"{aid} is a member of the aund-owned group", roles.get(aid) == "member"
                  and roles.get(owner) == "owner", roles)
        prober = asyncio.get_running_loop().create_task(serve_probes(opened[0][1], gid, stop))
        write_json(WORK / "ready", {"gid": gid})
        if go is not None:
            check("go", await wait_path(go, 60))

        sent: list[dict] = []
        progress = [0]
        errors: dict[str, int] = {}

        async def one_sender(s: int, aid: str, client, share: int) -> None:
            for k in range(share):
                message_id = f"gf-{run}-{s}-{k}"
                params = {"group_id": gid, "message_id": message_id,
                          "payload": {"type": "text", "text": f"group flood {s} {k}", "sender": s, "n": k}}
                for attempt in range(20):
                    try:
                        r = await asyncio.wait_for(client.call("group.send", dict(params)), 30)
                    except Exception as exc:  # noqa: BLE001 - count and retry with the same message_id
                        errors[type(exc).__name__] = errors.get(type(exc).__name__, 0) + 1
                        await asyncio.sleep(min(0.05 * 2 ** attempt, 1.0))
                        continue
                    if r.get("status") in SENT_STATUSES and isinstance(r.get("seq"), int):
                        break
                    errors[f"status:{r.get('status')}"] = errors.get(f"status:{r.get('status')}", 0) + 1
                else:
                    check(f"send {message_id}", False, "gave up after 20 attempts")
                    return
                sent.append({"message_id": message_id, "from": aid, "sender": s, "n": k, "seq": r["seq"]})
                progress[0] += 1
                if progress[0] % 10 == 0:
                    write_json(WORK / "progress", progress[0])

        t0 = time.monotonic()
        shares = [n // senders + (1 if s < n % senders else 0) for s in range(senders)]
        await asyncio.gather(*(one_sender(s, aid, c, shares[s]) for s, (aid, c) in enumerate(opened)))
        elapsed = time.monotonic() - t0
        write_json(WORK / "progress", progress[0])
        write_json(WORK / "sent.json", sent)
        check("all sent", len(sent) == n, {"sent": len(sent), "total": n})
        seqs = [m["seq"] for m in sent]
        check("distinct seqs", len(set(seqs)) == len(seqs), len(seqs) - len(set(seqs)))
        for s in range(senders):
            own = [m["seq"] for m in sent if m["sender"] == s]
            check(f"sender {s}'s seqs increase", own == sorted(own), own[:5])
        note(seconds=round(elapsed, 2), rate=round(len(sent) / max(elapsed, 1e-9), 1), errors=errors, gid=gid)
        await wait_path(WORK / "done", 120)
    finally:
        stop.set()
        if prober is not None:
            await asyncio.gather(prober, return_exceptions=True)
        for _, c in opened:
            await c.close()


SCENARIOS = {"flood": flood}

if __name__ == "__main__":
    asyncio.run(SCENARIOS[sys.argv[1]]())
    sys.exit(1 if failed else 0)
