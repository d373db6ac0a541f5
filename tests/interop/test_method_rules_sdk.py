"""Aund's method table (aund.aun.methods) says what the official SDK does, method by
method. The SDK's own lists and branches are read in a subprocess (sdk_method_rules.py); every
method where the two disagree is named in the failure."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from aund.aun import methods

pytestmark = [pytest.mark.interop, pytest.mark.timeout(60)]

READER = Path(__file__).with_name("sdk_method_rules.py")
#: aund's side of each column the reader prints
COLUMNS = {"signed": methods.SIGNED, "protected_headers": methods.PROTECTED_HEADERS,
           "non_idempotent": methods.NON_IDEMPOTENT, "internal_only": methods.INTERNAL_ONLY,
           "encrypts": methods.ENCRYPTS, "decrypts_result": methods.DECRYPTS_RESULT, "pull": methods.PULL}


def sdk_rules() -> dict:
    proc = subprocess.run([sys.executable, str(READER)], capture_output=True, text=True, timeout=45,
                          cwd="/")  # not the repo root: the SDK comes from the venv, not from a local tree
    assert proc.returncode == 0, f"the SDK reader failed: {proc.stderr[-2000:]}"
    return json.loads(proc.stdout)


def divergences(sdk: dict, ours: dict[str, frozenset[str]], families) -> list[str]:
    """One line per column where aund and the SDK differ, naming each method on either side."""
    out = []
    for column, mine in ours.items():
        theirs = set(sdk[column])
        if theirs - mine:
            out.append(f"{column}: the SDK has, aund lacks: {sorted(theirs - mine)}")
        if mine - theirs:
            out.append(f"{column}: aund has, the SDK lacks: {sorted(mine - theirs)}")
    mine = {name: list(rule.refused_params) for name, rule in methods.TABLE.items() if rule.refused_params}
    for name in sorted(set(mine) | set(sdk["refused_params"])):
        if mine.get(name) != sdk["refused_params"].get(name):
            out.append(f"refused_params of {name}: SDK {sdk['refused_params'].get(name)}, aund {mine.get(name)}")
    for column, attribute in (("family_signed", "signed"), ("family_org_aad", "org_aad")):
        mine = {prefix for prefix, rule in families.items() if getattr(rule, attribute)}
        if set(sdk[column]) != mine:
            out.append(f"{column}: SDK {sorted(sdk[column])}, aund {sorted(mine)}")
    return out


def test_aund_method_table_matches_the_sdk():
    sdk = sdk_rules()
    assert sdk["version"] == "0.5.25", f"the table was taken from fastaun 0.5.25; installed {sdk['version']}"
    problems = divergences(sdk, COLUMNS, methods.FAMILIES)
    assert not problems, "aund.aun.methods diverges from fastaun:\n" + "\n".join(problems)
    # the reader found each branch-derived column (an SDK refactor that hides one fails here, not silently)
    for column in ("encrypts", "decrypts_result", "pull", "family_signed"):
        assert sdk[column], f"no {column} found in the SDK's pipeline"


def test_a_divergence_names_the_method():
    """The comparison is not vacuous: a method dropped from (or added to) aund's side is named."""
    sdk = sdk_rules()
    dropped = dict(COLUMNS, signed=methods.SIGNED - {"storage.put_object"},
                   encrypts=methods.ENCRYPTS | {"message.thought.get"})
    problems = "\n".join(divergences(sdk, dropped, methods.FAMILIES))
    assert "the SDK has, aund lacks: ['storage.put_object']" in problems
    assert "aund has, the SDK lacks: ['message.thought.get']" in problems
    assert divergences(sdk, COLUMNS, {}) == ["family_signed: SDK ['org.'], aund []",
                                             "family_org_aad: SDK ['org.'], aund []"]


def test_rule_lookup():
    assert methods.rule("storage.put_object").signed and methods.rule("collab.tag.rm").signed
    org = methods.rule("org.member.list")
    assert org.signed and org.org_aad and org is methods.FAMILIES["org."]
    assert methods.rule("message.history").decrypts_result and methods.rule("message.history").route == "p2p"
    assert methods.rule("group.history").route == "group" and not methods.rule("group.history").signed
    assert methods.rule("meta.ping") == methods.MethodRule("meta.ping")
    assert methods.rule("message.v2.pull").managed and methods.rule("auth.connect").internal_only


ORG_CASES = [
    ("org.member.list", {"org_id": "acme.aid.pub", "page": 1}),
    ("org.member.invite", {"org_id": "acme.aid.pub", "aad": {"purpose": "invite"}, "note": "é ü ✓",
                           "score": 0.5, "n": 10.0, "nested": {"b": [1, 2, {"z": None}], "a": True}}),
    ("org.health", {}),
]
SDK_ORG = """
import hashlib, json, sys
from aun_core.org_protocol import _org_request_params
from aun_core.v2.crypto.canonical import canonical_json
out = []
for method, params in json.load(sys.stdin):
    bound = _org_request_params(method, params)
    body = {k: v for k, v in bound.items() if k != "client_signature" and not k.startswith("_")}
    out.append({"aad": bound["aad"], "params_hash": hashlib.sha256(canonical_json(body)).hexdigest()})
json.dump(out, sys.stdout)
"""


def test_org_requests_are_bound_and_hashed_as_the_sdk_does():
    """`org.*`: the same `aad` and the same params_hash (canonical JSON) as fastaun's own code."""
    from aund.aun import signing
    proc = subprocess.run([sys.executable, "-c", SDK_ORG], input=json.dumps(ORG_CASES), capture_output=True,
                          text=True, timeout=45, cwd="/")
    assert proc.returncode == 0, proc.stderr[-2000:]
    theirs = json.loads(proc.stdout)
    ours = []
    for method, params in ORG_CASES:
        bound = signing.org_request(method, params)
        ours.append({"aad": bound["aad"], "params_hash": signing.params_hash(bound, canonical=True)})
    assert ours == theirs
    for method, params, why in [("org.member.list", {}, "needs org_id"),
                                ("org.member.list", {"org_id": "no-dot"}, "full organization id"),
                                ("org.member.list", {"org_id": "a.b", "aad": {"org_id": "c.d"}}, "does not match"),
                                ("org.member.list", {"org_id": "a.b", "aad": "x"}, "aad must be an object")]:
        with pytest.raises(signing.BindingError, match=why):
            signing.org_request(method, params)
