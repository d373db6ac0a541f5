"""Trust roots, signature hashes, chains, CRLs and OCSP answers, checked on certificates made here.

These prove the pure checks of `aund.aun.trust` and `aund.identity.pki` (no network): which roots
aund trusts, that every signature is verified with the hash its key calls for (P-256/SHA-256,
P-384/SHA-384, Ed25519), and that a CRL or OCSP answer counts only when the issuer really signed it.
"""
from __future__ import annotations

import datetime as dt
import hashlib

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509 import ocsp
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from aund.aun import jsonrpc as rpc
from aund.aun.trust import TrustRoots, bundled_roots, parse_crl, parse_ocsp
from aund.errors import AuthError, InvalidParams
from aund.identity import pki

# The public "AUN Root CA" as fastaun 0.5.25 ships it (aun_core/certs/root.crt), SHA-256 of its DER.
AUN_ROOT_SHA256 = "dd09e9fd316c42dc7df35c989c2c763aa188d84c9cc9fcd42ea310a2621ec545"
NOW = dt.datetime.now(dt.timezone.utc)
DAY = dt.timedelta(days=1)


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _hash(key) -> hashes.HashAlgorithm | None:
    return pki.hash_for_key(key.public_key())


def make_cert(cn: str, key, issuer_cert=None, issuer_key=None, *, ca: bool, path_length=None,
              extra=(), eku=None) -> x509.Certificate:
    issuer_key = issuer_key or key
    builder = (x509.CertificateBuilder().subject_name(_name(cn))
               .issuer_name(issuer_cert.subject if issuer_cert is not None else _name(cn))
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(NOW - DAY).not_valid_after(NOW + 30 * DAY)
               .add_extension(x509.BasicConstraints(ca=ca, path_length=path_length if ca else None), critical=True)
               .add_extension(x509.KeyUsage(digital_signature=not ca, content_commitment=False, key_encipherment=False,
                                            data_encipherment=False, key_agreement=False, key_cert_sign=ca,
                                            crl_sign=ca, encipher_only=False, decipher_only=False), critical=True))
    if eku is not None:
        builder = builder.add_extension(x509.ExtendedKeyUsage(eku), critical=False)
    for ext, critical in extra:
        builder = builder.add_extension(ext, critical=critical)
    return builder.sign(issuer_key, _hash(issuer_key))


@pytest.fixture(scope="module")
def production_pki():
    """Root P-384 -> registry P-384 -> issuer P-384 -> an AID leaf P-256, as the AUN docs draw it."""
    root_key, reg_key, iss_key = (ec.generate_private_key(ec.SECP384R1()) for _ in range(3))
    root = make_cert("Test Root", root_key, ca=True, path_length=2)
    registry = make_cert("Test Registry", reg_key, root, root_key, ca=True, path_length=1)
    issuer = make_cert("Test Issuer", iss_key, registry, reg_key, ca=True, path_length=0)
    leaf_key = ec.generate_private_key(ec.SECP256R1())
    leaf = make_cert("alice.aid.test", leaf_key, issuer, iss_key, ca=False)
    return {"root": root, "registry": registry, "issuer": issuer, "issuer_key": iss_key, "leaf": leaf,
            "root_key": root_key, "reg_key": reg_key}


# --- roots -----------------------------------------------------------------------------------------
def test_the_public_aun_root_ships_with_aund():
    (root,) = bundled_roots()
    assert hashlib.sha256(root.public_bytes(serialization.Encoding.DER)).hexdigest() == AUN_ROOT_SHA256
    assert root.subject.rfc4514_string() == "O=AgentUnion,CN=AUN Root CA"
    assert isinstance(root.public_key().curve, ec.SECP384R1)
    assert root.not_valid_after_utc.year == 2056
    assert TrustRoots.load().certs == (root,)  # nothing configured: the public network is trusted


def test_configured_roots_and_the_state_dir_file_add_to_the_bundled_one(tmp_path, production_pki):
    extra = tmp_path / "devnet-root.pem"
    extra.write_text(pki.cert_pem(production_pki["root"]))
    state = tmp_path / "state"
    state.mkdir()
    other_key = ec.generate_private_key(ec.SECP256R1())
    dropped = make_cert("Dropped Root", other_key, ca=True, path_length=1)
    (state / "trust-roots.pem").write_text(pki.cert_pem(dropped) + pki.cert_pem(production_pki["root"]))
    roots = TrustRoots.load((extra,), state)
    assert [c.subject.rfc4514_string() for c in roots.certs] == [
        "O=AgentUnion,CN=AUN Root CA", "CN=Test Root", "CN=Dropped Root"]  # the duplicate counted once
    assert roots.sources[1:] == (str(extra), str(state / "trust-roots.pem"))


@pytest.mark.parametrize("content, words", [(None, "does not exist"), ("not a cert", "holds no certificate"),
                                            ("-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
                                             "invalid certificate")])
def test_a_bad_root_file_is_named_in_one_line(tmp_path, content, words):
    path = tmp_path / "root.pem"
    if content is not None:
        path.write_text(content)
    with pytest.raises(InvalidParams) as info:
        TrustRoots.load((path,))
    assert str(path) in str(info.value) and words in str(info.value)
    assert "\n" not in str(info.value)


# --- chains ----------------------------------------------------------------------------------------
def test_a_four_level_p384_chain_verifies(production_pki):
    p = production_pki
    pki.verify_chain(p["leaf"], [p["issuer"], p["registry"], p["root"]], [p["root"]])
    with pytest.raises(pki.PKIError, match="not anchored"):
        pki.verify_chain(p["leaf"], [p["issuer"], p["registry"], p["root"]], bundled_roots())


def test_path_length_is_enforced(production_pki):
    p = production_pki
    # an issuer with pathlen 0 cannot sign another CA that then signs a leaf
    sub_key = ec.generate_private_key(ec.SECP256R1())
    sub = make_cert("Sub CA", sub_key, p["issuer"], p["issuer_key"], ca=True, path_length=0)
    leaf = make_cert("bob.aid.test", ec.generate_private_key(ec.SECP256R1()), sub, sub_key, ca=False)
    with pytest.raises(pki.PKIError, match="allows 0 intermediate CAs"):
        pki.verify_chain(leaf, [sub, p["issuer"], p["registry"], p["root"]], [p["root"]])


def test_an_unknown_critical_extension_is_refused(production_pki):
    p = production_pki
    odd = x509.UnrecognizedExtension(x509.ObjectIdentifier("1.3.6.1.4.1.99999.1"), b"\x05\x00")
    leaf = make_cert("eve.aid.test", ec.generate_private_key(ec.SECP256R1()), p["issuer"], p["issuer_key"],
                     ca=False, extra=[(odd, True)])
    with pytest.raises(pki.PKIError, match="unknown critical extension"):
        pki.verify_chain(leaf, [p["issuer"], p["registry"], p["root"]], [p["root"]])


# --- CRL -------------------------------------------------------------------------------------------
def crl_body(issuer, key, serials, *, next_update=NOW + dt.timedelta(hours=2)) -> bytes:
    builder = (x509.CertificateRevocationListBuilder().issuer_name(issuer.subject)
               .last_update(NOW - dt.timedelta(minutes=5)).next_update(next_update))
    for serial in serials:
        builder = builder.add_revoked_certificate(
            x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(NOW).build())
    crl = builder.sign(key, pki.hash_for_key(key.public_key()))
    return rpc.dumps({"crl_pem": crl.public_bytes(serialization.Encoding.PEM).decode()}).encode()


def test_a_crl_signed_by_a_p384_issuer_lists_its_revoked_serials(production_pki):
    p = production_pki
    serials, until = parse_crl(crl_body(p["issuer"], p["issuer_key"], [p["leaf"].serial_number]), p["issuer"],
                               NOW.timestamp())
    assert serials == {p["leaf"].serial_number}
    assert until <= NOW.timestamp() + 3600 + 1  # never cached past an hour


def test_a_crl_not_signed_by_the_issuer_or_expired_is_not_believed(production_pki):
    p = production_pki
    forged = crl_body(p["issuer"], ec.generate_private_key(ec.SECP384R1()), [])
    with pytest.raises(AuthError, match="signature does not verify"):
        parse_crl(forged, p["issuer"], NOW.timestamp())
    with pytest.raises(AuthError, match="not issued by"):
        parse_crl(crl_body(p["registry"], p["reg_key"], []), p["issuer"], NOW.timestamp())
    stale = crl_body(p["issuer"], p["issuer_key"], [], next_update=NOW - dt.timedelta(minutes=1))
    with pytest.raises(AuthError, match="expired"):
        parse_crl(stale, p["issuer"], NOW.timestamp())
    with pytest.raises(AuthError, match="malformed"):
        parse_crl(b'{"crl_pem": 5}', p["issuer"], NOW.timestamp())


# --- OCSP ------------------------------------------------------------------------------------------
def ocsp_body(cert, issuer, signer_key, status, *, json_status=None, responder=None, serial_of=None) -> bytes:
    builder = ocsp.OCSPResponseBuilder().add_response(
        cert=serial_of or cert, issuer=issuer, algorithm=hashes.SHA256(), cert_status=status,
        this_update=NOW - dt.timedelta(minutes=1), next_update=NOW + dt.timedelta(hours=1),
        revocation_time=NOW if status == ocsp.OCSPCertStatus.REVOKED else None, revocation_reason=None)
    builder = builder.responder_id(ocsp.OCSPResponderEncoding.HASH, responder or issuer)
    if responder is not None:
        builder = builder.certificates([responder])
    der = builder.sign(signer_key, pki.hash_for_key(signer_key.public_key())).public_bytes(serialization.Encoding.DER)
    return rpc.dumps({"status": json_status or "good", "ocsp_response": pki.b64e(der)}).encode()


@pytest.mark.parametrize("status, word", [(ocsp.OCSPCertStatus.GOOD, "good"),
                                          (ocsp.OCSPCertStatus.REVOKED, "revoked"),
                                          (ocsp.OCSPCertStatus.UNKNOWN, "unknown")])
def test_ocsp_status_comes_from_the_signed_answer_not_the_json(production_pki, status, word):
    p = production_pki
    body = ocsp_body(p["leaf"], p["issuer"], p["issuer_key"], status, json_status="good")
    assert parse_ocsp(body, p["leaf"], p["issuer"], NOW.timestamp())[0] == word


def test_ocsp_answers_that_cannot_be_trusted_are_refused(production_pki):
    p = production_pki
    good = ocsp.OCSPCertStatus.GOOD
    doc = rpc.loads(ocsp_body(p["leaf"], p["issuer"], p["issuer_key"], good).decode())
    der = bytearray(pki.b64d(doc["ocsp_response"]))
    der[-1] ^= 0x01  # the last byte of the signature's s value
    tampered = rpc.dumps(dict(doc, ocsp_response=pki.b64e(bytes(der)))).encode()
    with pytest.raises(AuthError, match="signature does not verify"):
        parse_ocsp(tampered, p["leaf"], p["issuer"], NOW.timestamp())
    other = make_cert("carol.aid.test", ec.generate_private_key(ec.SECP256R1()), p["issuer"], p["issuer_key"],
                      ca=False)
    with pytest.raises(AuthError, match="another certificate"):
        parse_ocsp(ocsp_body(p["leaf"], p["issuer"], p["issuer_key"], good, serial_of=other),
                   p["leaf"], p["issuer"], NOW.timestamp())
    with pytest.raises(AuthError, match="another issuer"):
        parse_ocsp(ocsp_body(p["leaf"], p["registry"], p["reg_key"], good), p["leaf"], p["issuer"], NOW.timestamp())
    with pytest.raises(AuthError, match="malformed"):
        parse_ocsp(b'{"status": "good"}', p["leaf"], p["issuer"], NOW.timestamp())
    unsuccessful = ocsp.OCSPResponseBuilder.build_unsuccessful(ocsp.OCSPResponseStatus.UNAUTHORIZED)
    body = rpc.dumps({"status": "unknown",
                      "ocsp_response": pki.b64e(unsuccessful.public_bytes(serialization.Encoding.DER))}).encode()
    with pytest.raises(AuthError, match="unauthorized"):
        parse_ocsp(body, p["leaf"], p["issuer"], NOW.timestamp())


def test_a_delegated_ocsp_responder_needs_the_issuers_certificate_and_the_ocsp_usage(production_pki):
    p = production_pki
    responder_key = ec.generate_private_key(ec.SECP256R1())
    delegated = make_cert("OCSP responder", responder_key, p["issuer"], p["issuer_key"], ca=False,
                          eku=[ExtendedKeyUsageOID.OCSP_SIGNING])
    body = ocsp_body(p["leaf"], p["issuer"], responder_key, ocsp.OCSPCertStatus.REVOKED, responder=delegated)
    assert parse_ocsp(body, p["leaf"], p["issuer"], NOW.timestamp())[0] == "revoked"
    no_usage = make_cert("not a responder", responder_key, p["issuer"], p["issuer_key"], ca=False,
                         eku=[ExtendedKeyUsageOID.CLIENT_AUTH])
    with pytest.raises(AuthError, match="OCSP signing usage"):
        parse_ocsp(ocsp_body(p["leaf"], p["issuer"], responder_key, ocsp.OCSPCertStatus.GOOD, responder=no_usage),
                   p["leaf"], p["issuer"], NOW.timestamp())
    self_made = make_cert("self-made responder", responder_key, ca=False, eku=[ExtendedKeyUsageOID.OCSP_SIGNING])
    with pytest.raises(AuthError, match="not certified by the issuer"):
        parse_ocsp(ocsp_body(p["leaf"], p["issuer"], responder_key, ocsp.OCSPCertStatus.GOOD, responder=self_made),
                   p["leaf"], p["issuer"], NOW.timestamp())
