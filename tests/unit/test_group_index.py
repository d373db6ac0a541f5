"""aund/aun/group_index.py: the signed group.index aund builds for indexed group settings."""
from __future__ import annotations

import hashlib

import pytest

from aund.aun import group_index
from aund.aun.e2ee.canonical import canonical_json
from aund.identity import pki


def test_build_merges_on_the_base_and_signs_meta_and_entries():
    key = pki.generate_key()
    first = group_index.build("g-abc1234.aid.test", "alice.aid.test", key, {"announcement.content": "hi"}, now_ms=1)
    second = group_index.build("g-abc1234.aid.test", "alice.aid.test", key,
                               {"rules.content": "be kind", "announcement.content": "hello"}, base=first, now_ms=2)
    meta, entries = group_index.parse(second)
    assert [e["key"] for e in entries] == ["announcement.content", "rules.content"]
    assert {e["key"]: e["etag"] for e in entries}["announcement.content"] == \
        '"sha256:' + hashlib.sha256(canonical_json("hello")).hexdigest() + '"'
    lines = second["body"].splitlines()
    body = "".join(line + "\n" for line in lines[1:]).encode()
    assert meta["body_hash"] == "sha256:" + hashlib.sha256(body).hexdigest() and meta["etag"] == f'"{meta["body_hash"]}"'
    assert (meta["group_aid"], meta["signed_by"], meta["schema"]) == ("g-abc1234.aid.test", "alice.aid.test",
                                                                     "aun.group.index.v1")
    unsigned = canonical_json({k: v for k, v in meta.items() if k != "signature"})
    assert pki.verify_signature(key.public_key(), pki.b64d(meta["signature"]), unsigned + b"\n" + body)
    assert not pki.verify_signature(pki.generate_key().public_key(), pki.b64d(meta["signature"]), unsigned + b"\n" + body)


def test_indexed_keys_and_bad_indexes():
    assert all(group_index.is_indexed(k) for k in ("announcement.content", "rules.attachments", "join.mode",
                                                    "faq.content"))
    assert not any(group_index.is_indexed(k) for k in ("mention_mode", "name", "join.colour", "1x.content"))
    for bad in (None, {}, {"body": ""}, {"body": "not json"}, {"body": '{"type": "entry"}\n'}, {"body": "[1]\n"}):
        with pytest.raises(ValueError):
            group_index.parse(bad)
