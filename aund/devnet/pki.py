"""devnet: the development certificate authority (root -> issuer -> AID and gateway certs).

Created on first start under `{state_dir}/pki/` and reloaded afterwards, so that clients which
trusted the root once keep trusting it across restarts. This is a *development* CA: its keys
are stored unencrypted (mode 0600), and it must never be trusted outside tests and local use.
"""
from __future__ import annotations

import datetime as dt
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509 import ocsp
from cryptography.x509.oid import NameOID

from aund.identity import pki

_DAY = dt.timedelta(days=1)


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "aund devnet"),
                      x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _write_private(path: Path, data: bytes) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _ca_cert(subject: x509.Name, issuer: x509.Name, public_key, signing_key, *, path_length: int | None,
             days: int) -> x509.Certificate:
    now = dt.datetime.now(dt.timezone.utc)
    return (x509.CertificateBuilder()
            .subject_name(subject).issuer_name(issuer).public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - _DAY).not_valid_after(now + days * _DAY)
            .add_extension(x509.BasicConstraints(ca=True, path_length=path_length), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False,
                                         encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
            .sign(signing_key, hashes.SHA256()))


@dataclass
class DevCA:
    """The devnet's PKI: root and issuer CA, the gateway's auth certificate, CRL and OCSP."""

    directory: Path
    root_cert: x509.Certificate
    issuer_cert: x509.Certificate
    issuer_key: ec.EllipticCurvePrivateKey
    gateway_cert: x509.Certificate
    gateway_key: ec.EllipticCurvePrivateKey

    @property
    def root_cert_path(self) -> Path:
        return self.directory / "root.crt"

    @classmethod
    def open(cls, directory: Path, issuer: str) -> "DevCA":
        """Load the CA from `directory`, creating it on first use."""
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        files = {n: directory / n for n in ("root.crt", "issuer.crt", "issuer.key", "gateway.crt", "gateway.key")}
        if not all(p.exists() for p in files.values()):
            cls._create(files, issuer)
        load = lambda n: pki.load_cert_pem(files[n].read_bytes())  # noqa: E731
        return cls(directory=directory, root_cert=load("root.crt"), issuer_cert=load("issuer.crt"),
                   issuer_key=pki.load_private_key_pem(files["issuer.key"].read_bytes()),
                   gateway_cert=load("gateway.crt"),
                   gateway_key=pki.load_private_key_pem(files["gateway.key"].read_bytes()))

    @staticmethod
    def _create(files: dict[str, Path], issuer: str) -> None:
        root_key, issuer_key = pki.generate_key(), pki.generate_key()
        root_name, issuer_name = _name(f"aund devnet root ({issuer})"), _name(f"aund devnet issuer {issuer}")
        root = _ca_cert(root_name, root_name, root_key.public_key(), root_key, path_length=1, days=3650)
        inter = _ca_cert(issuer_name, root_name, issuer_key.public_key(), root_key, path_length=0, days=3650)
        gateway_key = pki.generate_key()
        gateway = _leaf(f"gateway.{issuer}", gateway_key.public_key(), inter, issuer_key, days=3650)
        # The root last: its presence marks a complete CA.
        _write_private(files["issuer.key"], pki.private_key_pem(issuer_key))
        _write_private(files["gateway.key"], pki.private_key_pem(gateway_key))
        _write_private(files["issuer.crt"], pki.cert_pem(inter).encode())
        _write_private(files["gateway.crt"], pki.cert_pem(gateway).encode())
        _write_private(files["root.crt"], pki.cert_pem(root).encode())

    def chain_pem(self) -> str:
        """Issuer CA first, self-signed root last (the /pki/chain body)."""
        return pki.cert_pem(self.issuer_cert) + pki.cert_pem(self.root_cert)

    def issue(self, aid: str, public_key: ec.EllipticCurvePublicKey, *, days: int = 365) -> x509.Certificate:
        """An AID certificate: CN = AID, key = the AID's own public key."""
        return _leaf(aid, public_key, self.issuer_cert, self.issuer_key, days=days)

    def crl_pem(self, revoked_serials: list[int]) -> str:
        now = dt.datetime.now(dt.timezone.utc)
        builder = (x509.CertificateRevocationListBuilder().issuer_name(self.issuer_cert.subject)
                   .last_update(now - dt.timedelta(minutes=5)).next_update(now + dt.timedelta(hours=1)))
        for serial in revoked_serials:
            builder = builder.add_revoked_certificate(
                x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(now).build())
        crl = builder.sign(self.issuer_key, hashes.SHA256())
        return crl.public_bytes(serialization.Encoding.PEM).decode("ascii")

    def ocsp_response(self, cert: x509.Certificate | None, serial: int, revoked: bool) -> tuple[str, bytes]:
        """(status, DER OCSP response signed by the issuer) for a serial; unknown serials get UNAUTHORIZED."""
        if cert is None:
            return "unknown", ocsp.OCSPResponseBuilder.build_unsuccessful(
                ocsp.OCSPResponseStatus.UNAUTHORIZED).public_bytes(serialization.Encoding.DER)
        now = dt.datetime.now(dt.timezone.utc)
        status = ocsp.OCSPCertStatus.REVOKED if revoked else ocsp.OCSPCertStatus.GOOD
        builder = ocsp.OCSPResponseBuilder().add_response(
            cert=cert, issuer=self.issuer_cert, algorithm=hashes.SHA256(), cert_status=status,
            this_update=now - dt.timedelta(minutes=1), next_update=now + dt.timedelta(hours=1),
            revocation_time=now if revoked else None, revocation_reason=None,
        ).responder_id(ocsp.OCSPResponderEncoding.HASH, self.issuer_cert)
        resp = builder.sign(self.issuer_key, hashes.SHA256())
        return ("revoked" if revoked else "good"), resp.public_bytes(serialization.Encoding.DER)


def _leaf(cn: str, public_key, issuer_cert: x509.Certificate, issuer_key, *, days: int) -> x509.Certificate:
    now = dt.datetime.now(dt.timezone.utc)
    return (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
            .issuer_name(issuer_cert.subject).public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - _DAY).not_valid_after(now + days * _DAY)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False,
                                         key_encipherment=False, data_encipherment=False,
                                         key_agreement=True, key_cert_sign=False, crl_sign=False,
                                         encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_cert.public_key()),
                           critical=False)
            .sign(issuer_key, hashes.SHA256()))


def serial_hex(cert: x509.Certificate) -> str:
    return format(cert.serial_number, "x")


def der_sha256_hex(cert: x509.Certificate) -> str:
    return hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest()
