"""agent.md signing: the AUN-SIGNATURE block over the payload bytes, with the AID key; bad input refused.
(fastaun's own verification of what aund publishes is tests/system/test_public_shape.py.)"""
from __future__ import annotations

import re

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
