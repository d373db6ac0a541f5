"""Hypothesis fuzz of the devnet's frame handling, against one live in-process devnet.

One devnet and a few connections live for the whole test; hypothesis runs in a worker thread
and drives each example on the trio loop (`trio.from_thread.run`), so state accumulates across
examples as it would in a long-lived gateway. After every example:

- the fuzzed connection still answers `meta.ping` (an authenticated one with `pong`, a pre-auth
  one with -32013), unless the frame was an `auth.connect` request: a failed `auth.connect` is
  the documented way to get closed (4001 for auth/nonce failures, 1008 otherwise);
- every request frame with a usable id gets exactly a reply (result or error) or an id-less
  error when the frame is refused as a whole;
- a second, untouched connection (another AID, receiving the pushes) answers `meta.ping`.

The inputs include those that once killed a connection with 1011 (escaped lone surrogates, float
literals that overflow to infinity, non-ASCII digit signature timestamps; see the regression tests
in test_gateway.py). Stored payloads stay shallow here: how deep a payload may be is
test_gateway.py's business.
"""
from __future__ import annotations

import json
import string
from typing import Any

import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from trio_websocket import ConnectionClosed

from aund.aun import jsonrpc as rpc
from aund.aun import signing
from aund.devnet.gateway import HANDLERS
from tests.devnet.rawclient import RawClient, dial, http, http_base

MAX_EXAMPLES = 500

PARAM_KEYS = {
    "auth.create_aid": ["aid", "public_key", "curve"],
    "auth.aid_login1": ["aid", "cert", "client_nonce"],
    "auth.aid_login2": ["aid", "request_id", "nonce", "client_time", "signature"],
    "auth.refresh_token": ["aid", "refresh_token", "device_id", "slot_id", "access_token"],
    "auth.connect": ["nonce", "auth", "protocol", "device", "client", "options", "delivery_mode", "capabilities"],
    "message.v2.put_peer_pk": ["peer_aid", "key_source", "spk_id", "spk_pk", "spk_signature", "spk_timestamp"],
    "message.v2.bootstrap": ["peer_aid", "e2ee_wrap_capabilities"],
    "message.send": ["to", "payload", "message_id", "need_render", "ttl", "persist", "encrypt"],
    "message.peers": ["filter", "limit", "page_token"],
    "message.v2.pull": ["cursor_scope", "sender_aid", "after_seq", "limit", "ack_up_to_seq", "window_mode", "force",
                        "after_volatile_cursor"],
    "message.v2.ack": ["cursor_scope", "sender_aid", "up_to_seq", "device_id", "slot_id", "volatile_cursors",
                       "volatile_cursor", "volatile_ids"],
    "message.recall": ["message_ids"],
    "message.read": ["states", "scope", "topic_key", "last_read_message_id"],
    "message.read_state": ["scope", "topic_key", "aid"],
    "group.recall": ["group_id", "message_ids", "reason"],
    "message.thought.put": ["to", "payload", "encrypted", "thought_id", "timestamp", "context"],
    "message.thought.get": ["sender_aid", "peer_aid", "to", "context"],
}
ALL_KEYS = sorted({k for keys in PARAM_KEYS.values() for k in keys})

# --- strategies ------------------------------------------------------------------------------
scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=20))
json_values = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)), max_leaves=12)
safe_ints = st.integers(-(2**53 - 1), 2**53 - 1)
# values that stay parseable (ints within +-(2^53-1), finite floats) so the frame reaches a handler
safe_scalars = st.one_of(st.none(), st.booleans(), safe_ints, st.floats(allow_nan=False, allow_infinity=False),
                         st.text(max_size=30))
safe_values = st.recursive(safe_scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)), max_leaves=12)
NUMBER_TOKENS = ["NaN", "Infinity", "-Infinity", "-0", "0.0", "1E+2", "1.0e-400", "-1e308", "1e400", "-1e309",
                 "9007199254740991", "9007199254740992", "-9007199254740992", "1" * 400, "0x10", "01", ".5", "1.", "+1"]
ESCAPED_SURROGATES = ["\\ud800", "\\udfff", "a\\ud83d", "\\udc00\\ud800", "\\ud83d\\ude00"]  # the last is a valid pair
TIMESTAMPS = st.one_of(st.text(alphabet="0123456789\u00b2\u00b3\u0663\u09e6\uff11 -+.", max_size=14), st.text(max_size=5))


def nested(depth: int, open_: str = "[", close: str = "]") -> str:
    return open_ * depth + close * depth


# nesting on both sides of jsonrpc.MAX_DEPTH, near Python's recursion limit, and far beyond it
depths = st.one_of(st.integers(1, 300), st.integers(900, 1100), st.sampled_from([5_000, 100_000]))


@st.composite
def request_frames(draw, plausible: list[Any]) -> dict[str, Any]:
    """A request for a devnet method with fuzzed (mostly wrong-typed) params; meta only for the frame."""
    method = draw(st.sampled_from(sorted(HANDLERS) + ["no.such.method", "message.pull", ""]))
    keys = st.sampled_from(PARAM_KEYS.get(method, []) + ALL_KEYS[:5]) if method in PARAM_KEYS else st.sampled_from(ALL_KEYS)
    values = st.one_of(safe_values, st.sampled_from(plausible))
    params = draw(st.dictionaries(st.one_of(keys, st.text(max_size=6)), values, max_size=6))
    if method == "message.send" and draw(st.booleans()):  # often a real target with an object payload
        params.update(to=draw(st.sampled_from(plausible[:2])),
                      payload=draw(st.dictionaries(st.text(max_size=6), safe_values, max_size=4)))
    sign = method in signing.SIGNED_METHODS and draw(st.sampled_from([True, True, True, False]))  # mostly signed
    timestamp = draw(st.one_of(st.none(), st.none(), TIMESTAMPS)) if sign else None  # a mangled signature time
    return {"method": method, "params": params, "sign": sign, "timestamp": timestamp,
            "id": draw(st.one_of(st.integers(0, 2**53 - 1),
                                 st.text(alphabet=string.ascii_letters, min_size=1, max_size=12)))}


def raw_texts() -> st.SearchStrategy[str | bytes]:
    req = '{"jsonrpc":"2.0","id":"raw","method":"meta.ping","params":%s}'
    return st.one_of(
        json_values.map(json.dumps),                                                  # any JSON value (NaN too)
        st.binary(max_size=200).map(lambda b: b.decode("utf-8", "replace")),          # random bytes, decoded
        st.binary(max_size=200).map(lambda b: b.decode("latin-1")),
        st.binary(max_size=64),                                                       # a binary frame
        depths.map(nested),                                                           # deep nesting
        depths.map(lambda d: req % ('{"x":' + nested(d) + "}")),
        depths.map(lambda d: req % ('{"x":' + nested(d, '{"a":', "}").replace("}", "1}", 1) + "}")),
        st.integers(2**53, 2**4000).map(lambda n: req % ('{"n":%d}' % n)),            # huge ints
        st.integers(2**53, 2**80).map(lambda n: '{"jsonrpc":"2.0","id":%d,"method":"meta.ping"}' % n),
        st.sampled_from(NUMBER_TOKENS).map(lambda t: req % ('{"n":%s}' % t)),        # NaN, huge, odd numbers
        st.tuples(st.sampled_from(sorted(HANDLERS)), st.sampled_from(ALL_KEYS), st.sampled_from(NUMBER_TOKENS + [
            '"%s"' % s for s in ESCAPED_SURROGATES])).map(
            lambda t: '{"jsonrpc":"2.0","id":"tok","method":"%s","params":{"%s":%s}}' % t),  # ... in any method
        st.sampled_from(NUMBER_TOKENS).map(lambda t: '{"jsonrpc":"2.0","id":%s,"method":"meta.ping"}' % t),
        st.just('{"jsonrpc":"2.0","id":"dup","id":"dup2","method":"meta.ping"}'),      # duplicate keys
        st.just(req % '{"a":1,"a":2}'),
        st.sampled_from(['{"jsonrpc":"2.0","id":"x","result":{}}', '{"jsonrpc":"2.0","method":"event/x"}',
                         '{"jsonrpc":"2.0","id":"x","error":{"code":1,"message":"m"}}', '{"jsonrpc":"2.0"}',
                         '{"jsonrpc":"2.0","id":"x","method":"meta.ping","params":null}', "", " ", "\u0000",
                         '{"jsonrpc":"2.0","id":"x","method":"meta.ping","params":{}}' * 2]),
    )


# --- the test ----------------------------------------------------------------------------------
class Harness:
    def __init__(self, nursery: trio.Nursery, url: str, alice, bob) -> None:
        self.nursery, self.url, self.alice, self.bob = nursery, url, alice, bob
        self.conns: dict[str, RawClient] = {}
        self.examples = 0
        self.reopened = 0

    async def open(self, name: str) -> None:
        old = self.conns.pop(name, None)
        if old is not None:
            await old.aclose()
        c = await dial(self.nursery, self.url)
        if name == "main":
            reply = await c.authenticate(self.alice.token, "fuzz-dev", "default")
            assert reply["result"]["status"] == "ok", reply
            c.identity = self.alice.identity
        elif name == "watch":
            reply = await c.authenticate(self.bob.token, "watch-dev", "default")
            assert reply["result"]["status"] == "ok", reply
        self.conns[name] = c

    async def alive(self, name: str) -> bool:
        c = self.conns[name]
        reply = await c.call("meta.ping", {})
        c.frames.clear()
        if name == "pre":
            return reply.get("error", {}).get("code") == rpc.SESSION_REQUIRED
        return reply.get("result", {}).get("pong") is True

    async def example(self, target: str, frame: str | bytes | dict[str, Any]) -> None:
        with trio.fail_after(10):
            self.examples += 1
            c = self.conns[target]
            expect_id, closes = None, False
            if isinstance(frame, dict):
                params = frame["params"]
                if frame["sign"]:
                    ident = self.alice.identity
                    params = signing.sign_params(frame["method"], params, aid=ident.aid, key=ident.key,
                                                 cert_fingerprint=ident.fingerprint)
                    if frame["timestamp"] is not None:
                        params["client_signature"]["timestamp"] = frame["timestamp"]
                text: str | bytes = rpc.dumps({"jsonrpc": "2.0", "id": frame["id"], "method": frame["method"],
                                               "params": params})
            else:
                text = frame
            try:  # the same strict parser the devnet uses tells which frames are requests
                parsed: Any = rpc.parse_frame(text) if isinstance(text, str) else None
            except rpc.FrameError:
                parsed = None
            if isinstance(parsed, dict) and "method" in parsed and "id" in parsed:
                expect_id = parsed["id"]
                closes = parsed["method"] == "auth.connect"  # a failed auth.connect closes; here it always fails
            try:
                await (c.ws.send_message(text))
                if expect_id is not None:
                    reply = await c.next_frame(lambda f: f.get("id") == expect_id and ("result" in f or "error" in f))
                    assert "error" in reply or not closes, reply
                    if isinstance(frame, dict) and frame["timestamp"] is not None and target == "main":
                        assert reply["error"]["code"] == rpc.CLIENT_SIGNATURE_INVALID, reply
                if closes:
                    code = await c.closed_code()
                    assert code in (4001, 1008), (code, text[:200])
                    self.reopened += 1
                    await self.open(target)
                else:
                    assert await self.alive(target), text[:200]
            except ConnectionClosed as exc:
                await self.open(target)
                raise AssertionError(f"{target} connection closed with {exc.reason} after {text[:300]!r}") from None
            assert await self.alive("watch"), "the untouched connection stopped answering"


async def test_fuzz_frames_on_live_connections(devnet_inproc, alice, bob):
    url = devnet_inproc.gateway_url
    plausible = [bob.aid, alice.aid, "peer", "all", "pending", "tail", "short", "long", "kite_token", "P-256",
                 0, 1, -1, 200, 10**9, True, False, None, "", {}, [], "AA==", "sha256:" + "0" * 16]
    with trio.fail_after(120):
        async with trio.open_nursery() as nursery:
            h = Harness(nursery, url, alice, bob)
            for name in ("main", "pre", "watch"):
                await h.open(name)

            requests = st.tuples(st.sampled_from(["main", "main", "pre"]), request_frames(plausible))
            cases = st.one_of(st.tuples(st.sampled_from(["main", "pre"]), raw_texts()), requests, requests)

            def run_hypothesis() -> None:
                @settings(max_examples=MAX_EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
                @given(case=cases)
                def fuzz(case):
                    trio.from_thread.run(h.example, *case)

                fuzz()

            await trio.to_thread.run_sync(run_hypothesis)
            assert h.examples >= MAX_EXAMPLES
            # the devnet as a whole is fine: fresh sockets authenticate, HTTP answers, the task is alive
            await h.open("main")
            assert await h.alive("main") and await h.alive("watch")
            assert (await http("GET", http_base(url) + "/health")).status == 200
            for c in list(h.conns.values()):
                await c.aclose()
            nursery.cancel_scope.cancel()  # the trio-websocket reader tasks of closed sockets
