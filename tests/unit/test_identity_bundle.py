"""The identity bundle (`aund aid export` / `import --from BUNDLE`): what it carries across stores,
what it refuses, and that nothing already stored is replaced or lost."""
from __future__ import annotations

import json

import pytest

from aund.identity import bundle, pki
from aund.identity.errors import CorruptIdentity, IdentityConflict, InvalidIdentity
from aund.identity.store import IdentityStore
from tests.integration.test_aid_ops import stored_identity

AID = "bundled-1.aid.test"
PASS = b"correct horse battery staple"


def _store(tmp_path, name: str, seed: str) -> IdentityStore:
    return IdentityStore(tmp_path / name, seed)


def test_everything_of_the_identity_moves_and_nothing_is_dropped(tmp_path):
    stored_identity(tmp_path / "a", "seed-a", AID)
    a = _store(tmp_path, "a", "seed-a")
    old_key = a.load(AID).private_key
    a.rekey_pending(AID)  # a past key, as after a rekey: kept in keys/
    new_key = a.rekey_pending(AID)
    a.commit_rekey(AID, new_key, _self_signed(new_key))
    a.save_prekeys(AID, [{"spk_id": "p1", "private_pem": "x"}, {"spk_id": "p2", "private_pem": "y"}])
    a.save_tokens(AID, {"access_token": "never-moved"})
    a.update_meta(AID, gateway_urls=["ws://127.0.0.1:1/aun"], disabled={"at": 1, "by_uid": 0})
    path = tmp_path / "b.aundid"
    path.write_bytes(bundle.seal(AID, a.export_content(AID), PASS))
    assert b"private_pem" not in path.read_bytes() and b"PRIVATE" not in path.read_bytes()  # all sealed

    b = _store(tmp_path, "b", "seed-b")
    opened = bundle.open_bundle(path, PASS)
    assert "never-moved" not in json.dumps(opened.content)  # tokens stay behind
    identity = b.import_content(opened.content, meta={"imported_from": {"bundle": str(path)}})
    assert identity.cert_fingerprint == a.load(AID).cert_fingerprint
    assert [pki.spki_der(k.public_key()) for k in b.past_keys(AID)] == [pki.spki_der(old_key.public_key())]
    assert [r["spk_id"] for r in b.load_prekeys(AID)] == ["p1", "p2"]
    assert b.load_tokens(AID) is None
    meta = b.load_meta(AID)
    assert "disabled" not in meta and meta["gateway_urls"] == ["ws://127.0.0.1:1/aun"]
    assert sorted(p.name for p in (tmp_path / "b/AIDs" / AID / "certs").iterdir()) == \
        sorted(p.name for p in (tmp_path / "a/AIDs" / AID / "certs").iterdir())

    b.save_prekeys(AID, b.load_prekeys(AID) + [{"spk_id": "p3", "private_pem": "z"}])
    b.import_content(opened.content)  # again: a no-op that keeps what the store added since
    assert [r["spk_id"] for r in b.load_prekeys(AID)] == ["p1", "p2", "p3"]


def test_another_key_for_the_aid_is_refused(tmp_path):
    stored_identity(tmp_path / "a", "s", AID)
    stored_identity(tmp_path / "b", "s", AID)
    content = _store(tmp_path, "a", "s").export_content(AID)
    b = _store(tmp_path, "b", "s")
    before = (tmp_path / "b/AIDs" / AID / "key.enc.json").read_bytes()
    with pytest.raises(IdentityConflict, match="different key"):
        b.import_content(content)
    assert (tmp_path / "b/AIDs" / AID / "key.enc.json").read_bytes() == before


def test_a_wrong_passphrase_an_edited_header_or_a_foreign_file_is_refused(tmp_path):
    stored_identity(tmp_path / "a", "s", AID)
    path = tmp_path / "x.aundid"
    path.write_bytes(bundle.seal(AID, _store(tmp_path, "a", "s").export_content(AID), PASS))
    with pytest.raises(bundle.BundlePassphraseWrong, match="does not open"):
        bundle.open_bundle(path, b"not it")
    record = json.loads(path.read_text())
    record["aid"] = "other-1.aid.test"  # bound by the aad
    path.write_text(json.dumps(record))
    with pytest.raises(bundle.BundlePassphraseWrong):
        bundle.open_bundle(path, PASS)
    record["kdf"]["n"] = 2**24  # a memory bomb is refused before any work
    path.write_text(json.dumps(record))
    with pytest.raises(CorruptIdentity, match="unsupported"):
        bundle.open_bundle(path, PASS)
    path.write_text('{"format": "aund.enc"}')
    with pytest.raises(CorruptIdentity, match="not an aund identity bundle"):
        bundle.open_bundle(path, PASS)


def test_the_passphrase_never_comes_from_the_command_line(tmp_path):
    from aund.cli.aid import PASSPHRASE_ENV  # the CLI names it in its help without importing the crypto

    assert PASSPHRASE_ENV == bundle.PASSPHRASE_ENV
    with pytest.raises(InvalidIdentity, match="AUND_EXPORT_PASSPHRASE"):
        bundle.read_passphrase(None, env={})
    with pytest.raises(InvalidIdentity, match="shorter than 12"):
        bundle.read_passphrase(None, env={"AUND_EXPORT_PASSPHRASE": "short"}, new=True)
    f = tmp_path / "p"
    f.write_bytes(b"from a file, long enough\n")
    assert bundle.read_passphrase(f, env={"AUND_EXPORT_PASSPHRASE": "ignored"}) == b"from a file, long enough"


def _self_signed(key) -> str:
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.x509.oid import NameOID

    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, AID)])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(seconds=5))
            .not_valid_after(now + datetime.timedelta(days=30)).sign(key, hashes.SHA256()))
    return pki.cert_pem(cert)
