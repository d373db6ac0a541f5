"""Drive the official SDK (fastaun 0.5.25, asyncio) through group scenarios against a gateway.

Run as `python fastaun_groups_driver.py SCENARIO` with env AUN_GW_URL, AUN_ROOT_CA, AUN_WORKDIR
(and N = messages per member). Prints one JSON line per check ({"check", "ok", "detail"}) and
exits 1 if any check failed. Imports only fastaun, never aund: it is the independent peer.
"""
import asyncio
import json
import os
import sys

from fastaun_common import AUNClient, WORK, check, ensure, failed, note  # noqa: F401  (re-exported)

class Member:
    """One fastaun client and what it saw: decrypted group messages (by message_id) and group events."""

    def __init__(self, name: str):
        self.name, self.aid, self.client = name, "", None
        self.messages: dict[str, dict] = {}   # message_id -> first group.message_created seen
        self.arrivals: list[str] = []         # texts in arrival order (duplicates kept)
        self.sources: dict[str, int] = {}     # delivery path (inline push, pull, ...) -> count
        self.changed: list[dict] = []
        self.undecryptable: list[dict] = []

    def text_of(self, msg):
        return (msg.get("payload") or {}).get("text")

    def on_message(self, msg):
        if not isinstance(msg, dict):
            return
        self.arrivals.append(self.text_of(msg))
        self.sources[str(msg.get("source"))] = self.sources.get(str(msg.get("source")), 0) + 1
        self.messages.setdefault(str(msg.get("message_id")), msg)

    def texts(self, prefix=""):
        return {self.text_of(m) for m in self.messages.values() if str(self.text_of(m)).startswith(prefix)}

    async def open(self, aid=None):
        aid, ident = await ensure(self.name, aid)
        self.aid = aid
        self.client = AUNClient(ident)
        self.client.on("group.message_created", self.on_message)
        self.client.on("group.changed", lambda e: self.changed.append(e) if isinstance(e, dict) else None)
        self.client.on("group.message_undecryptable", lambda e: self.undecryptable.append(e))
        await asyncio.wait_for(self.client.connect({"auto_reconnect": False}), 30)
        check(f"connect {self.name}", self.client.state.value == "ready", self.client.state.value)
        return self

    async def call(self, method, params):
        return await self.client.call(method, params)

    async def close(self):
        if self.client is not None:
            await self.client.close()


async def wait_for(pred, timeout=15.0):
    for _ in range(int(timeout / 0.05)):
        if pred():
            return True
        await asyncio.sleep(0.05)
    return pred()


async def fails(coro):
    """(True, error text) if the call raised, else (False, result)."""
    try:
        return False, await coro
    except Exception as exc:  # the SDK maps server errors to AUNError subclasses
        return True, f"{type(exc).__name__}: {exc} code={getattr(exc, 'code', None)}"


async def groups():
    """Owner + two members: create, add, 3xN E2EE messages by push and pull, thought, removal, join request."""
    n = int(os.environ.get("N", "20"))
    owner, alice, bob = Member("owner"), Member("alice"), Member("bob")
    for m in (owner, alice, bob):
        await m.open()
    everyone = (owner, alice, bob)
    await asyncio.sleep(1.0)  # let the post-connect syncs settle
    try:
        # --- create and add -------------------------------------------------------------------------
        created = await owner.call("group.create", {"name": "devnet interop", "join_mode": "approval"})
        gid = (created.get("group") or {}).get("group_id", "")
        check("create", gid.endswith(".aid.test") and created["group"].get("role") == "owner", created.get("group"))
        for m in (alice, bob):
            r = await owner.call("group.add_member", {"group_id": gid, "aid": m.aid})
            check(f"add {m.name}", (r.get("member") or {}).get("aid") == m.aid, r.get("member"))
        for m in everyone:
            r = await m.call("group.get_members", {"group_id": gid})
            roles = {x["aid"]: x["role"] for x in r.get("members", [])}
            check(f"get_members by {m.name}", roles == {owner.aid: "owner", alice.aid: "member", bob.aid: "member"},
                  roles)
            r = await m.call("group.list_my", {})
            mine = {g["group_id"]: g.get("role") for g in r.get("items", [])}
            check(f"list_my {m.name}", mine.get(gid) == ("owner" if m is owner else "member"), mine)
        state = await owner.call("group.get_state", {"group_id": gid})
        committed = {x["aid"] for x in json.loads(state.get("membership_snapshot") or "{}").get("members", [])}
        check("signed state names all three", state.get("state_version", 0) >= 3
              and committed == {owner.aid, alice.aid, bob.aid}, {"sv": state.get("state_version"), "members": committed})
        for m in (alice, bob):  # each member learned of its own admission by a pushed group.changed
            got = await wait_for(lambda m=m: any(e.get("action") == "member_added" and e.get("joined_aid") == m.aid
                                                 for e in m.changed), 10)
            check(f"{m.name} saw group.changed member_added", got, [e.get("action") for e in m.changed])

        # --- 3 x N E2EE messages, sent concurrently ----------------------------------------------------
        sent: dict[str, int] = {}  # text -> seq

        async def send_all(m: Member):
            for i in range(n):
                text = f"{m.name} {i}"
                r = await m.call("group.send", {"group_id": gid, "payload": {"type": "text", "text": text}})
                sent[text] = r.get("seq")

        await asyncio.gather(*(send_all(m) for m in everyone))
        seqs = sorted(sent.values())
        check("3N sends got seqs 1..3N", seqs == list(range(1, 3 * n + 1)), seqs[:5] + seqs[-5:])
        for m in everyone:  # each member's own messages keep their send order
            own = [sent[f"{m.name} {i}"] for i in range(n)]
            check(f"{m.name}'s sends in order", own == sorted(own), own)
        by_seq = [t for t, _ in sorted(sent.items(), key=lambda kv: kv[1])]

        for m in everyone:
            others = {t for t in sent if not t.startswith(m.name + " ")}
            got = await wait_for(lambda m=m, others=others: others <= m.texts(), 30)
            check(f"{m.name} received the {2 * n} others' messages by push", got and len(others) == 2 * n,
                  sorted(others - m.texts())[:5])
            msgs = [x for x in m.messages.values() if m.text_of(x) in others]
            check(f"{m.name} push rows decrypted and seq-bound", all(
                x.get("encrypted") is True and x.get("seq") == sent[m.text_of(x)] and x.get("group_id") == gid
                for x in msgs), [(m.text_of(x), x.get("seq"), x.get("encrypted")) for x in msgs[:3]])
            in_seq_order = [m.text_of(x) for x in sorted(msgs, key=lambda x: x["seq"])]
            check(f"{m.name} reads all {3 * n} in group order", sorted(
                in_seq_order + [t for t in sent if t.startswith(m.name + " ")], key=lambda t: sent[t]) == by_seq
                and in_seq_order == [t for t in by_seq if t in others], in_seq_order[:4])
            r = await m.call("group.pull", {"group_id": gid, "after_seq": 0, "limit": 200})
            pulled = [m.text_of(x) for x in r.get("messages", [])]
            check(f"{m.name} pull re-reads the {2 * n} others' messages in seq order",
                  pulled == [t for t in by_seq if t in others]
                  and all(x.get("encrypted") for x in r.get("messages", [])), pulled[:4])
            check(f"{m.name} nothing undecryptable", not m.undecryptable, m.undecryptable[:2])
        note(arrival_duplicates={m.name: len(m.arrivals) - len(set(m.arrivals)) for m in everyone},
             delivery_paths={m.name: dict(m.sources) for m in everyone})

        # --- one speaker: the others keep up, so each push can be consumed inline (no pull) -----------
        before = {m.name: m.sources.get("inline_push", 0) for m in (alice, bob)}
        for i in range(5):
            text = f"solo {i}"
            r = await owner.call("group.send", {"group_id": gid, "payload": {"type": "text", "text": text}})
            sent[text] = r.get("seq")
            await wait_for(lambda text=text: all(text in m.texts() for m in (alice, bob)), 10)
        for m in (alice, bob):
            solo = [x for x in m.messages.values() if str(m.text_of(x)).startswith("solo ")]
            check(f"{m.name} got the solo messages in order", [m.text_of(x) for x in solo] == [f"solo {i}" for i in range(5)]
                  and [x["seq"] for x in solo] == [sent[f"solo {i}"] for i in range(5)], [m.text_of(x) for x in solo])
            check(f"{m.name} consumed solo pushes inline", m.sources.get("inline_push", 0) - before[m.name] >= 3,
                  dict(m.sources))

        # --- thought ---------------------------------------------------------------------------------
        ctx = {"type": "run", "id": "run-1"}
        r = await owner.call("group.thought.put", {"group_id": gid, "context": ctx,
                                                   "payload": {"type": "thought", "text": "pondering"}})
        check("thought.put", r.get("stored_count") == 1, r)
        r = await alice.call("group.thought.get", {"group_id": gid, "sender_aid": owner.aid, "context": ctx})
        texts = [(t.get("payload") or {}).get("text") for t in r.get("thoughts", [])]
        check("thought.get decrypted by a member", r.get("found") is True and texts == ["pondering"], r)

        # --- remove bob ------------------------------------------------------------------------------
        r = await owner.call("group.kick", {"group_id": gid, "aid": bob.aid})
        check("kick bob", r.get("removed_aid") == bob.aid, r)
        got = await wait_for(lambda: any(e.get("action") == "member_removed" for e in bob.changed), 10)
        check("bob saw group.changed member_removed", got, [e.get("action") for e in bob.changed])
        after = []
        for m in (owner, alice):
            for i in range(3):
                text = f"after-kick {m.name} {i}"
                r = await m.call("group.send", {"group_id": gid, "payload": {"type": "text", "text": text}})
                sent[text] = r.get("seq")
                after.append(text)
        for m, peer in ((owner, alice), (alice, owner)):
            want = {t for t in after if t.startswith(f"after-kick {peer.name}")}
            got = await wait_for(lambda m=m, want=want: want <= m.texts(), 20)
            check(f"{m.name} still receives after the kick", got, sorted(want - m.texts()))
        await asyncio.sleep(1.5)
        check("bob received nothing sent after his removal", not bob.texts("after-kick"), sorted(bob.texts("after-kick")))
        raised, detail = await fails(bob.call("group.pull", {"group_id": gid, "after_seq": 0, "limit": 200}))
        check("bob's pull is refused", raised, detail)
        raised, detail = await fails(bob.call("group.v2.bootstrap", {"group_id": gid}))
        check("bob's bootstrap is refused (no keys to wrap for)", raised and "-33006" in detail, detail)
        raised, detail = await fails(bob.call("group.send", {"group_id": gid, "payload": {"type": "text", "text": "x"}}))
        check("bob cannot send", raised, detail)
        state = await owner.call("group.get_state", {"group_id": gid})
        committed = {x["aid"] for x in json.loads(state.get("membership_snapshot") or "{}").get("members", [])}
        check("signed state dropped bob", committed == {owner.aid, alice.aid}, committed)

        # --- join request + review ---------------------------------------------------------------------
        r = await bob.call("group.request_join", {"group_id": gid, "message": "let me back in"})
        check("bob's join request is pending", r.get("status") == "pending", r)
        r = await owner.call("group.list_join_requests", {"group_id": gid})
        check("owner lists the request", [x.get("aid") for x in r.get("items", [])] == [bob.aid], r.get("items"))
        r = await owner.call("group.review_join_request", {"group_id": gid, "aid": bob.aid, "approve": True})
        check("owner approves", r.get("status") == "approved", r.get("status"))
        await bob.close()  # a fresh session: the SDK stops pulling a group once it was refused
        bob2 = Member("bob")
        await bob2.open(bob.aid)
        await asyncio.sleep(1.0)
        r = await owner.call("group.send", {"group_id": gid, "payload": {"type": "text", "text": "welcome back"}})
        sent["welcome back"] = r.get("seq")
        got = await wait_for(lambda: "welcome back" in bob2.texts(), 20)
        check("re-admitted bob receives new messages", got, sorted(bob2.texts()))
        r = await bob2.call("group.pull", {"group_id": gid, "after_seq": 0, "limit": 200})
        pulled = [bob2.text_of(x) for x in r.get("messages", [])]
        check("re-admitted bob reads nothing from while he was out", pulled == ["welcome back"], pulled)
        bob = bob2
        note(group_id=gid, owner=owner.aid, alice=alice.aid, bob=bob.aid, messages=len(sent))
    finally:
        for m in (owner, alice, bob):
            await m.close()


SCENARIOS = {"groups": groups}

if __name__ == "__main__":
    asyncio.run(SCENARIOS[sys.argv[1]]())
    sys.exit(1 if failed else 0)
