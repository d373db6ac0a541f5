"""A signed call is serialised once: the sorted compact JSON that `client_signature` hashes is the
text the frame carries (`jsonrpc.Encoded`, spliced by `jsonrpc.dumps`). The frame must parse to
exactly the params that were signed, verify, and carry the hashed bytes verbatim."""
from __future__ import annotations

import hashlib
import json

import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from hypothesis import given, settings
from hypothesis import strategies as st

from aund.aun import jsonrpc as rpc
from aund.aun import signing
from aund.identity import pki

pytestmark = pytest.mark.timeout(120)
KEY = ec.generate_private_key(ec.SECP256R1())
AID = "alice.aid.test"

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**53 - 1), 2**53 - 1)
    | st.floats(allow_nan=False, allow_infinity=False) | st.text(st.characters(blacklist_categories=("Cs",))),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=20)
params_st = st.dictionaries(st.text(min_size=1, max_size=10).filter(lambda k: not k.startswith("_")
                                                                    and k != "client_signature"),
                            json_values, max_size=6)


def _sign(method: str, params: dict) -> dict:
    return signing.sign_for_wire(method, params, aid=AID, key=KEY, cert_fingerprint="sha256:" + "0" * 64)


@settings(max_examples=300, deadline=None)
@given(params=params_st)
def test_the_frame_carries_the_hashed_bytes_and_parses_to_the_signed_params(params):
    signed = _sign("message.send", params)
    assert isinstance(signed, rpc.Encoded) and signed.text is not None
    frame = rpc.dumps(rpc.request("message.send", signed, "rpc-1"))
    parsed = rpc.parse_frame(frame)
    assert parsed["params"] == dict(signed)
    assert parsed["id"] == "rpc-1" and parsed["method"] == "message.send"
    # the hashed text is in the frame verbatim, and it is what params_hash names
    hashed = json.dumps(params, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    assert hashed[:-1] in frame
    assert hashlib.sha256(hashed.encode()).hexdigest() == signed["client_signature"]["params_hash"]
    assert signing.params_hash(parsed["params"]) == signed["client_signature"]["params_hash"]
    # the same frame as encoding the params again would make (same JSON value)
    assert json.loads(frame) == json.loads(rpc.dumps(rpc.request("message.send", dict(signed), "rpc-1")))


def test_a_spliced_signature_verifies():
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.x509.oid import NameOID
    import datetime as dt

    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, AID)])
    now = dt.datetime.now(dt.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(KEY.public_key())
            .serial_number(1).not_valid_before(now - dt.timedelta(days=1)).not_valid_after(now + dt.timedelta(days=1))
            .sign(KEY, hashes.SHA256()))
    params = {"to": "bob.aid.test", "payload": {"type": "text", "text": "héllo \u2028 \"q\""}, "message_id": "m-1"}
    signed = signing.sign_for_wire("message.send", params, aid=AID, key=KEY,
                                   cert_fingerprint=pki.cert_fingerprint(cert))
    parsed = rpc.parse_frame(rpc.dumps(rpc.request("message.send", signed)))
    signing.verify_params("message.send", parsed["params"], aid=AID, cert=cert)
    tampered = dict(parsed["params"], to="carol.aid.test")
    with pytest.raises(signing.SignatureError, match="params_hash"):
        signing.verify_params("message.send", tampered, aid=AID, cert=cert)


def test_empty_params_splice_without_a_stray_comma():
    frame = rpc.dumps(rpc.request("meta.status", _sign("message.send", {}), "rpc-2"))
    assert set(rpc.parse_frame(frame)["params"]) == {"client_signature"}


@pytest.mark.parametrize("mutate", [
    lambda d: d.__setitem__("x", 1), lambda d: d.pop("to"), lambda d: d.update(x=1), lambda d: d.setdefault("y", 2),
    lambda d: d.__delitem__("to"), lambda d: d.clear(), lambda d: d.popitem(), lambda d: d.__ior__({"z": 3}),
])
def test_a_changed_params_object_is_encoded_again(mutate):
    signed = _sign("message.send", {"to": "bob.aid.test", "payload": {"type": "text"}})
    mutate(signed)
    assert signed.text is None
    assert rpc.parse_frame(rpc.dumps(rpc.request("message.send", signed, "r")))["params"] == dict(signed)


@pytest.mark.parametrize("method,params", [
    ("message.send", {"to": "bob.aid.test", "_local": 1}),                       # `_` keys are not hashed
    ("message.send", {"to": "bob.aid.test", "x": float("nan")}),                 # JSON cannot carry NaN
    ("message.send", {"to": "bob.aid.test", "client_signature": {"old": 1}}),    # signed again
    ("org.get", {"org_id": "acme.aid.test", "aad": {"org_id": "acme.aid.test"}}),  # canonical hashing
])
def test_params_whose_hash_text_is_not_their_wire_form_stay_plain(method, params):
    signed = _sign(method, params)
    assert type(signed) is dict
    assert type(signing.sign_params(method, params, aid=AID, key=KEY, cert_fingerprint="f")) is dict
    assert signed["client_signature"]["params_hash"] == signing.params_hash(
        params, canonical=method.startswith("org."))
