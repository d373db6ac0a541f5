"""agent.md signing: the AUN-SIGNATURE block over the payload bytes, with the AID key; bad input refused.
(fastaun's own verification of what aund publishes is tests/system/test_public_shape.py.)"""
from __future__ import annotations

import random
import re
import time

import pytest

from aund.identity import agent_md, pki
from tests.unit.test_trust import make_cert


def _identity():
    key = pki.generate_key()
    return key, make_cert("card-1234.aid.test", key, ca=False)


def test_the_default_card_is_signed_over_its_payload():
    key, cert = _identity()
    text = agent_md.sign(agent_md.default_document("card-1234.aid.test"), key, cert, now=1_800_000_000)
    payload, _, block = text.partition(agent_md.MARKER)
    assert payload.startswith('---\naid: "card-1234.aid.test"\nname: "card-1234"\ntype: "agent"\n')
    assert payload.endswith("# card-1234\n")
    fields = dict(re.findall(r"^(\w+): (.+)$", block, re.M))
    assert fields["cert_fingerprint"] == pki.cert_fingerprint(cert)
    assert fields["public_key_fingerprint"] == pki.spki_fingerprint(cert.public_key())
    assert fields["timestamp"] == "1800000000" and block.rstrip().endswith("-->")
    assert pki.verify_signature(cert.public_key(), pki.b64d(fields["signature"]), payload.encode())
    again = agent_md.sign(text, key, cert)  # re-signing replaces the old block, never stacks them
    assert again.count(agent_md.MARKER) == 1 and agent_md.payload_of(again) == payload


def test_what_cannot_be_signed_is_refused():
    key, cert = _identity()
    with pytest.raises(agent_md.AgentMdError, match="newline"):
        agent_md.sign("---\naid: x\n---\nno newline", key, cert)
    with pytest.raises(agent_md.AgentMdError, match="larger than 4096"):
        agent_md.sign("x" * 5000 + "\n", key, cert)
    other, _ = _identity()
    with pytest.raises(agent_md.AgentMdError, match="not the certificate"):
        agent_md.sign("hello\n", other, cert)


# --- validate: the one check of the daemon (before upload) and the devnet (on PUT) ----------------
AID = "card-1234.aid.test"


def _signed(text: str | None = None, **kw):
    key, cert = _identity()
    return agent_md.sign(agent_md.default_document(AID) if text is None else text, key, cert, **kw), key, cert


def test_a_signed_card_validates_and_says_what_it_holds():
    text, _, cert = _signed()
    checked = agent_md.validate(text, aid=AID, cert=cert)
    assert checked.front["aid"] == AID and checked.front["version"] == "1.0.0"
    assert checked.payload == agent_md.payload_of(text)
    assert checked.signature["cert_fingerprint"] == pki.cert_fingerprint(cert)
    assert agent_md.validate(text.encode(), aid=AID.upper(), cert=cert).front == checked.front  # bytes; AID case


def _front(**fields) -> str:
    base = {"aid": f'"{AID}"', "name": '"Card"', "type": '"agent"', "version": '"1.0.0"'}
    base.update(fields)
    return "---\n" + "".join(f"{k}: {v}\n" for k, v in base.items() if v is not None) + "---\n\n# Card\n"


@pytest.mark.parametrize(("text", "field", "words"), [
    (_front(aid=None), "aid", "lacks aid"),
    (_front(name=None), "name", "lacks name"),
    (_front(version=None), "version", "lacks version"),
    (_front(aid='"other-1.aid.test"'), "aid", "is not card-1234.aid.test"),
    (_front(aid='"no dots"'), "aid", "not an AID"),
    (_front(name='""'), "name", "non-empty string"),
    (_front(version="1.0"), "version", "MAJOR.MINOR.PATCH"),
    (_front(description='"' + "d" * 101 + '"'), "description", "101 characters; at most 100"),
    (_front(description="[1]"), "description", "must be a string"),
    (_front(avatar='"' + "a" * 257 + '"'), "avatar", "at most 256"),
    (_front(tags='["ok", 3]'), "tags", "list of strings"),
    (_front(tags='"one"'), "tags", "list of strings"),
    (_front(exttype="4"), "exttype", "must be a string"),
    (_front(type='"group"'), "type", "not supported"),
    (_front(extra="&a 1"), "front_matter", "anchors"),
    ('---\naid: "a.aid.test"\naid: "b.aid.test"\n---\n', "aid", "appears twice"),
    ("---\n[1, 2]\n---\n", "front_matter", "mapping"),
    ("---\na: [\n---\n", "front_matter", "not valid YAML"),
    (_front(updated="2001-13-01"), "front_matter", "value YAML cannot read"),  # a date with month 13
    (_front(updated="2001-01-01 25:00:00"), "front_matter", "value YAML cannot read"),
    (_front(**{"? [a]": "1"}), "front_matter", "not a scalar"),
    ("# no front matter\n", "front_matter", "start with YAML front matter"),
    ('---\naid: "x.aid.test"\n', "front_matter", "not closed"),
    (_front().rstrip("\n"), "payload", "newline"),
    (_front(description='"x"') + "x" * 4096 + "\n", "payload", "larger than 4096"),
])
def test_bad_front_matter_and_payloads_are_refused_naming_the_field(text, field, words):
    with pytest.raises(agent_md.AgentMdError, match=re.escape(words)) as caught:
        agent_md.validate(text, aid=AID, require_signature=False)
    assert caught.value.field == field
    assert caught.value.code == (agent_md.TOO_LARGE if "larger" in words else agent_md.INVALID)
    key, cert = _identity()
    with pytest.raises(agent_md.AgentMdError, match=re.escape(words)):  # sign refuses the same
        agent_md.sign(text, key, cert)


def test_unknown_front_matter_keys_are_kept():
    text, _, cert = _signed(_front(skills='["chat", "search"]', homepage='"https://example.invalid"'))
    assert agent_md.validate(text, aid=AID, cert=cert).front["skills"] == ["chat", "search"]


def _swap(text: str, name: str, value: str) -> str:
    return re.sub(rf"^{name}: .*$", f"{name}: {value}", text, count=1, flags=re.M)


def test_signature_blocks_are_parsed_strictly_and_verified_with_the_current_cert():
    text, key, cert = _signed()
    payload, _, block = text.partition(agent_md.MARKER)
    block = agent_md.MARKER + block
    other_key, _ = _identity()
    cases = [
        (payload.replace("# card-1234", "# card-9999") + block, "signature.signature", "does not verify"),
        (payload + block + "\n" + block, "signature", "exactly one"),
        (payload.rstrip("\n") + block, "signature", "new line"),  # also: the payload lacks its newline
        (payload + block.replace("-->", ""), "signature", "malformed"),
        (payload + block.replace("-->", "\n" + "x: " + "y" * 2100 + "\n-->"), "signature", "larger than 2048"),
        (payload + _swap(block, "signature", "!!notbase64"), "signature.signature", "strict base64"),
        (payload + _swap(block, "timestamp", "0"), "signature.timestamp", "unix seconds"),
        (payload + _swap(block, "timestamp", str(int(time.time()) + 3600)), "signature.timestamp", "future"),
        (payload + _swap(block, "cert_fingerprint", "sha256:" + "0" * 64), "signature.cert_fingerprint",
         "current certificate"),
        (payload + _swap(block, "cert_fingerprint", "abc"), "signature.cert_fingerprint", "64 lower-case hex"),
        (payload + _swap(block, "public_key_fingerprint", pki.spki_fingerprint(other_key.public_key())),
         "signature.public_key_fingerprint", "name"),
        (payload + block.replace("timestamp:", "signer_aid: x.aid.test\ntimestamp:"), "signature.signer_aid",
         "unknown signature field"),
        (payload + block.replace("timestamp:", "cert_fingerprint: x\ntimestamp:"), "signature.cert_fingerprint",
         "twice"),
        (payload + re.sub(r"^signature: .*\n", "", block, flags=re.M), "signature.signature", "lacks signature"),
        (payload, "signature", "no AUN-SIGNATURE"),
    ]
    for bad, field, words in cases:
        with pytest.raises(agent_md.AgentMdError, match=re.escape(words)) as caught:
            agent_md.validate(bad, aid=AID, cert=cert)
        assert caught.value.field == field, (words, caught.value)
    with pytest.raises(agent_md.AgentMdError, match="current certificate"):  # a renewed cert: sign again
        agent_md.validate(text, aid=AID, cert=make_cert(AID, key, ca=False))
    with pytest.raises(agent_md.AgentMdError, match="not card-1234.aid.test's"):
        agent_md.validate(text, aid=AID, cert=make_cert("other-1.aid.test", key, ca=False))
    with pytest.raises(agent_md.AgentMdError, match="expired"):
        agent_md.validate(text, aid=AID, cert=cert, now=time.time() + 60 * 86400)
    with pytest.raises(agent_md.AgentMdError, match="outside the certificate's validity"):
        agent_md.validate(agent_md.sign(text, key, cert, now=int(time.time()) - 30 * 86400), aid=AID, cert=cert)
    with pytest.raises(agent_md.AgentMdError, match="at most 6144"):
        agent_md.validate(b"x" * 6145, aid=AID)
    with pytest.raises(agent_md.AgentMdError, match="not UTF-8"):
        agent_md.validate(b"---\n\xff\n", aid=AID)


def test_random_mutations_never_raise_anything_but_agent_md_error():
    """Fuzz: bytes flipped, cut, duplicated and inserted anywhere in a valid card; validate either
    accepts the result or raises AgentMdError, never anything else (and never hangs)."""
    text, _, cert = _signed(_front(description='"d"', tags='["a", "b"]', avatar='"https://x.invalid/a.png"'))
    data = text.encode()
    rng = random.Random(1234)
    pieces = [b"---", b"\n", b":", b"-->", agent_md.MARKER.encode(), b"&a", b"*a", b"!!python/object", b"[", b"{",
              b"\xff", b"\r", b"\x00", b"'", b'"', b"- ", b"? ", b"\t", "é".encode(), b"=" * 3]
    lines = [b"when: 2001-13-01\n", b"at: 2001-01-01 25:61:00\n", b"n: 1e99999\n", b"? [k]\n: v\n", b"t: !!set {}\n",
             b"x: *a\n", b"d: {a: [1, {b: 2}]}\n", b"description: 3\n", b"tags: [1]\n", b"---\n", b"aid: x\n"]
    accepted = 0
    for _ in range(1500):
        mutated = bytearray(data)
        for _ in range(rng.randint(1, 4)):
            at = rng.randrange(len(mutated) + 1)
            choice = rng.random()
            if choice < 0.3 and mutated:
                mutated[at % len(mutated)] = rng.randrange(256)
            elif choice < 0.5:
                mutated[at:at] = rng.choice(pieces)
            elif choice < 0.6:
                del mutated[at:at + rng.randint(1, 40)]
            elif choice < 0.8:  # a whole line, at the start of a line (mostly in the front matter)
                starts = [i + 1 for i, c in enumerate(mutated[:200]) if c == 0x0A]
                line_at = rng.choice(starts) if starts else 0
                mutated[line_at:line_at] = rng.choice(lines)
            else:
                start = rng.randrange(len(mutated) + 1)
                mutated[at:at] = mutated[start:start + rng.randint(1, 200)]
        try:
            agent_md.validate(bytes(mutated), aid=AID, cert=cert)
            accepted += 1
        except agent_md.AgentMdError as exc:
            assert str(exc) and exc.code in (agent_md.INVALID, agent_md.TOO_LARGE)
    assert accepted < 1500  # the mutations do break documents (and some, e.g. in the body's blank lines, may not)


# --- a group's card as aund signs it: the group key's block first, naming the owner and certificate ------
GROUP_AID = "team-1.aid.test"


def _group_identity():
    key = pki.generate_key()
    return key, make_cert(GROUP_AID, key, ca=False)


def test_a_group_card_signed_by_aund_passes_the_name_services_check():
    key, cert = _group_identity()
    text = agent_md.group_document(GROUP_AID, owner="alice.aid.test", entity_cert_fingerprint=pki.cert_fingerprint(cert),
                                   name="Team", description="the  team\n", avatar="https://x.invalid/a.png")
    signed = agent_md.sign(text, key, cert, entity=True)
    checked = agent_md.validate_entity(signed, aid=GROUP_AID, owner="alice.aid.test", entity_cert=cert,
                                       owner_cert=lambda fingerprint: None)
    assert checked.front["type"] == "group" and checked.front["owner"] == "alice.aid.test"
    assert checked.front["description"] == "the team" and checked.front["avatar"] == "https://x.invalid/a.png"
    assert checked.signature["signer_aid"] == GROUP_AID  # the SDK's entity block names its signer
    with pytest.raises(agent_md.AgentMdError, match="not the group's current owner"):
        agent_md.validate_entity(signed, aid=GROUP_AID, owner="mallory.aid.test", entity_cert=cert,
                                 owner_cert=lambda fingerprint: None)
    _, old_cert = _group_identity()  # a card naming an older group certificate is refused (renewal republishes)
    stale = agent_md.group_document(GROUP_AID, owner="alice.aid.test", entity_cert_fingerprint=pki.cert_fingerprint(old_cert))
    with pytest.raises(agent_md.AgentMdError, match="current certificate") as caught:
        agent_md.sign(stale, key, cert, entity=True)
    assert caught.value.field == "entity_cert_fingerprint" and caught.value.code == agent_md.GENERATION
    with pytest.raises(agent_md.AgentMdError, match="not supported"):  # never as an AID's own card
        agent_md.sign(text, key, cert)
