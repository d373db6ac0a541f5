"""Flood aund-held AIDs with E2EE messages from the official SDK (fastaun 0.5.25, asyncio), in its
own process. Modelled on tests/interop/fastaun_driver.py; imports only aun_core, never aund.

Run as `python fastaun_flood.py SCENARIO` with env AUN_GW_URL, AUN_ROOT_CA, AUN_WORKDIR.
Prints one JSON line per check ({"check", "ok", "detail"}) and exits 1 if any check failed.

Scenario `flood` (env TARGETS = comma-separated AIDs, N = messages in all, SENDERS = fastaun
identities sending at once, GO = optional file to wait for before sending; or PHASES = comma-
separated counts, each phase waiting for WORK/go-<p> and writing WORK/done-<p> when sent):
register SENDERS identities and connect them, write WORK/senders.json, wait for GO, then each
sender sends its share of N E2EE messages round-robin to TARGETS, one after the other (so each
sender's messages to one target have increasing gateway seqs). Message k of sender s has
payload {"text": "flood s k", "sender": s, "n": k} and message_id "fl-<run>-<s>-<k>". Progress
(messages sent so far, all senders) goes to WORK/progress as one integer, rewritten every 10
messages. A send that fails is retried with the same message_id (the gateway deduplicates it);
WORK/sent.json lists every message_id that was accepted, with sender, target and n.
"""
import asyncio
import json
import os
import secrets
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "interop"))  # the shared driver preamble
from fastaun_common import AUNClient, WORK, check, ensure, failed, note  # noqa: E402,F401

async def open_sender(name):
    aid, ident = await ensure(name)
    client = AUNClient(ident)
    await asyncio.wait_for(client.connect({"auto_reconnect": True}), 30)
    check(f"connect {name}", client.state.value == "ready", client.state.value)
    return aid, client


async def _wait_path(path: Path, timeout: float = 120.0) -> bool:
    for _ in range(int(timeout / 0.05)):
        if path.exists():
            return True
        await asyncio.sleep(0.05)
    return path.exists()


async def flood():
    targets = [t.strip() for t in os.environ["TARGETS"].split(",") if t.strip()]
    senders = int(os.environ.get("SENDERS", "2"))
    if os.environ.get("PHASES"):
        phases = [int(x) for x in os.environ["PHASES"].split(",")]
        gates = [WORK / f"go-{p + 1}" for p in range(len(phases))]
    else:
        phases = [int(os.environ.get("N", "1000"))]
        gates = [Path(os.environ["GO"]) if os.environ.get("GO") else None]
    run = secrets.token_hex(3)
    opened = await asyncio.gather(*(open_sender(f"flood{s}") for s in range(senders)))
    (WORK / "senders.json").write_text(json.dumps([aid for aid, _ in opened]))
    sent: list[dict] = []
    progress = [0]
    errors: dict[str, int] = {}
    next_k = [0] * senders

    async def one_sender(s: int, aid: str, client, share: int) -> None:
        for _ in range(share):
            k = next_k[s]
            to = targets[k % len(targets)]
            message_id = f"fl-{run}-{s}-{k}"
            params = {"to": to, "encrypt": True, "message_id": message_id,
                      "payload": {"type": "text", "text": f"flood {s} {k}", "sender": s, "n": k}}
            for attempt in range(20):
                try:
                    r = await asyncio.wait_for(client.call("message.send", params), 30)
                except Exception as exc:  # noqa: BLE001 - count and retry with the same message_id
                    errors[type(exc).__name__] = errors.get(type(exc).__name__, 0) + 1
                    await asyncio.sleep(min(0.05 * 2 ** attempt, 1.0))
                    continue
                if r.get("status") in ("delivered", "sent", "accepted", "duplicate"):
                    break
                errors[f"status:{r.get('status')}"] = errors.get(f"status:{r.get('status')}", 0) + 1
            else:
                check(f"send {message_id}", False, "gave up after 20 attempts")
                return
            next_k[s] = k + 1
            sent.append({"message_id": message_id, "from": aid, "to": to, "sender": s, "n": k})
            progress[0] += 1
            if progress[0] % 10 == 0:
                (WORK / "progress.tmp").write_text(str(progress[0]))
                os.replace(WORK / "progress.tmp", WORK / "progress")

    t0 = time.monotonic()
    try:
        for p, (count, gate) in enumerate(zip(phases, gates)):
            if gate is not None:
                check(f"go {p + 1}", await _wait_path(gate))
                t0 = time.monotonic() if p == 0 else t0
            shares = [count // senders + (1 if s < count % senders else 0) for s in range(senders)]
            await asyncio.gather(*(one_sender(s, aid, c, shares[s]) for s, (aid, c) in enumerate(opened)))
            (WORK / "sent.json").write_text(json.dumps(sent))
            (WORK / f"done-{p + 1}").write_text(str(len(sent)))
    finally:
        elapsed = time.monotonic() - t0
        (WORK / "sent.json").write_text(json.dumps(sent))
        (WORK / "progress").write_text(str(progress[0]))
        for _, c in opened:
            await c.close()
    check("all sent", len(sent) == sum(phases), {"sent": len(sent), "total": sum(phases)})
    note(seconds=round(elapsed, 2), rate=round(len(sent) / max(elapsed, 1e-9), 1), errors=errors)


SCENARIOS = {"flood": flood}

if __name__ == "__main__":
    asyncio.run(SCENARIOS[sys.argv[1]]())
    sys.exit(1 if failed else 0)
