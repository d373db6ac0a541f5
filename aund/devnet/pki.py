"""devnet: the devnet's certificate authority, in one of two shapes (`aund devnet --pki`).

- `dev` (the default): root -> issuer CA -> AID and gateway certs, all P-256 / ECDSA-SHA256.
- `production`: the AUN PKI's shape (protocol doc 02, and the public root that fastaun bundles):
  root CA P-384 (self-signed, pathlen 2) -> registry CA P-384 (pathlen 1) -> issuer CA P-384
  (pathlen 0, CN = the issuer domain) -> the auth service certificate `auth.{issuer}` P-384. AID
  certificates keep the AID's own P-256 key and are issued by the issuer CA. Every signature uses
  the digest that fits the signing key (`pki.hash_for_key`): ECDSA-SHA384 under a P-384 CA.

Created on first start under `{state_dir}/pki/` and reloaded afterwards, so that clients which
trusted the root once keep trusting it across restarts. The shape is recorded in `pki/mode`; a
state dir made in one mode is refused in the other (`PKIModeMismatch`). The root and registry
keys are used once, at creation, and not kept (the real ones live offline). This is a
*development* CA: its keys are stored unencrypted (mode 0600) and it must never be trusted
outside tests and local use.
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
MODES = ("dev", "production")


class PKIModeMismatch(ValueError):
    """The state dir holds a CA of the other mode; the message says which and what to do."""


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
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(signing_key.public_key()),
                           critical=False)
            .sign(signing_key, pki.hash_for_key(signing_key)))


def check_mode(directory: Path, mode: str) -> None:
    """Raise PKIModeMismatch (one line naming both modes) if `directory` holds a CA of another mode."""
    stored = DevCA.stored_mode(directory)
    if stored is not None and stored != mode:
        raise PKIModeMismatch(f"{directory.parent} holds a --pki {stored} devnet; start it with --pki {stored} "
                              f"or use another --state-dir for --pki {mode}")


@dataclass
class DevCA:
    """The devnet's PKI: the CA chain, the issuer key, the gateway's auth certificate, CRL and OCSP."""

    directory: Path
    mode: str
    ca_chain: list[x509.Certificate]  # issuer CA first, self-signed root last
    issuer_key: ec.EllipticCurvePrivateKey
    gateway_cert: x509.Certificate
    gateway_key: ec.EllipticCurvePrivateKey

    @property
    def root_cert(self) -> x509.Certificate:
        return self.ca_chain[-1]

    @property
    def issuer_cert(self) -> x509.Certificate:
        return self.ca_chain[0]

    @property
    def root_cert_path(self) -> Path:
        return self.directory / "root.crt"

    @property
    def auth_curve(self) -> str:
        return "P-384" if isinstance(self.gateway_key.curve, ec.SECP384R1) else "P-256"

    @property
    def leaf_days(self) -> int:
        return 730 if self.mode == "production" else 365

    @staticmethod
    def stored_mode(directory: Path) -> str | None:
        """The mode of the CA in `directory`: its `mode` file, "dev" for a CA made before modes
        existed, None when there is no CA yet."""
        mode_file = directory / "mode"
        if mode_file.exists():
            return mode_file.read_text().strip()
        return "dev" if (directory / "root.crt").exists() else None

    @classmethod
    def open(cls, directory: Path, issuer: str, mode: str = "dev") -> "DevCA":
        """Load the CA from `directory`, creating it in `mode` on first use.

        Raises PKIModeMismatch when the directory already holds a CA of another mode."""
        if mode not in MODES:
            raise ValueError(f"unknown PKI mode {mode!r} (one of {', '.join(MODES)})")
        check_mode(directory, mode)
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        ca_names = ["issuer.crt", "registry.crt", "root.crt"] if mode == "production" else ["issuer.crt", "root.crt"]
        files = {n: directory / n for n in (*ca_names, "issuer.key", "gateway.crt", "gateway.key")}
        if not all(p.exists() for p in files.values()):
            cls._create(directory, files, issuer, mode)
        load = lambda n: pki.load_cert_pem(files[n].read_bytes())  # noqa: E731
        return cls(directory=directory, mode=mode, ca_chain=[load(n) for n in ca_names],
                   issuer_key=pki.load_private_key_pem(files["issuer.key"].read_bytes()),
                   gateway_cert=load("gateway.crt"),
                   gateway_key=pki.load_private_key_pem(files["gateway.key"].read_bytes()))

    @staticmethod
    def _create(directory: Path, files: dict[str, Path], issuer: str, mode: str) -> None:
        certs: dict[str, x509.Certificate] = {}
        if mode == "production":
            p384 = ec.SECP384R1()
            root_key, registry_key, issuer_key, gateway_key = (pki.generate_key(p384) for _ in range(4))
            root_name = _name(f"aund devnet Root CA ({issuer})")
            registry_name = _name(f"aund devnet Registry CA ({issuer})")
            certs["root.crt"] = _ca_cert(root_name, root_name, root_key.public_key(), root_key,
                                         path_length=2, days=30 * 365)
            certs["registry.crt"] = _ca_cert(registry_name, root_name, registry_key.public_key(), root_key,
                                             path_length=1, days=10 * 365)
            inter = _ca_cert(_name(issuer), registry_name, issuer_key.public_key(), registry_key,
                             path_length=0, days=10 * 365)
            gateway = _leaf(f"auth.{issuer}", gateway_key.public_key(), inter, issuer_key, days=730)
        else:
            root_key, issuer_key, gateway_key = pki.generate_key(), pki.generate_key(), pki.generate_key()
            root_name, issuer_name = _name(f"aund devnet root ({issuer})"), _name(f"aund devnet issuer {issuer}")
            certs["root.crt"] = _ca_cert(root_name, root_name, root_key.public_key(), root_key, path_length=1,
                                         days=3650)
            inter = _ca_cert(issuer_name, root_name, issuer_key.public_key(), root_key, path_length=0, days=3650)
            gateway = _leaf(f"gateway.{issuer}", gateway_key.public_key(), inter, issuer_key, days=3650)
        certs["issuer.crt"], certs["gateway.crt"] = inter, gateway
        _write_private(directory / "mode", mode.encode() + b"\n")
        _write_private(files["issuer.key"], pki.private_key_pem(issuer_key))
        _write_private(files["gateway.key"], pki.private_key_pem(gateway_key))
        for name in sorted(certs, key=lambda n: n == "root.crt"):  # the root last: it marks a complete CA
            _write_private(files[name], pki.cert_pem(certs[name]).encode())

    def chain_pem(self) -> str:
        """Issuer CA first, self-signed root last (the /pki/chain body)."""
        return "".join(pki.cert_pem(c) for c in self.ca_chain)

    def issue(self, aid: str, public_key: ec.EllipticCurvePublicKey, *, ttl: float = 0.0) -> x509.Certificate:
        """An AID certificate: CN = AID, key = the AID's own public key; valid `leaf_days`, or
        `ttl` seconds from now when given (the devnet's `--cert-ttl`, to test renewal)."""
        return _leaf(aid, public_key, self.issuer_cert, self.issuer_key, days=self.leaf_days, ttl=ttl)

    def crl_pem(self, revoked: list[tuple[int, float]]) -> str:
        """The CRL signed by the issuer CA over (serial, revoked_at unix seconds) entries."""
        now = dt.datetime.now(dt.timezone.utc)
        builder = (x509.CertificateRevocationListBuilder().issuer_name(self.issuer_cert.subject)
                   .last_update(now - dt.timedelta(minutes=5)).next_update(now + dt.timedelta(hours=1)))
        for serial, revoked_at in revoked:
            builder = builder.add_revoked_certificate(
                x509.RevokedCertificateBuilder().serial_number(serial)
                .revocation_date(dt.datetime.fromtimestamp(revoked_at, dt.timezone.utc)).build())
        crl = builder.sign(self.issuer_key, pki.hash_for_key(self.issuer_key))
        return crl.public_bytes(serialization.Encoding.PEM).decode("ascii")

    def ocsp_response(self, cert: x509.Certificate | None, revoked_at: float | None) -> tuple[str, bytes]:
        """(status, DER OCSP response signed by the issuer CA) for a certificate it issued; None (an
        unknown serial) gets UNAUTHORIZED. The CertID hashes are SHA-256, as the SDK checks them."""
        if cert is None:
            return "unknown", ocsp.OCSPResponseBuilder.build_unsuccessful(
                ocsp.OCSPResponseStatus.UNAUTHORIZED).public_bytes(serialization.Encoding.DER)
        now = dt.datetime.now(dt.timezone.utc)
        revoked = revoked_at is not None
        status = ocsp.OCSPCertStatus.REVOKED if revoked else ocsp.OCSPCertStatus.GOOD
        builder = ocsp.OCSPResponseBuilder().add_response(
            cert=cert, issuer=self.issuer_cert, algorithm=hashes.SHA256(), cert_status=status,
            # made on each request: ThisUpdate is now (the SDK's strict ownership check wants it within 30 s)
            this_update=now - dt.timedelta(seconds=1), next_update=now + dt.timedelta(hours=1),
            revocation_time=dt.datetime.fromtimestamp(revoked_at, dt.timezone.utc) if revoked else None,
            revocation_reason=None,
        ).responder_id(ocsp.OCSPResponderEncoding.HASH, self.issuer_cert)
        resp = builder.sign(self.issuer_key, pki.hash_for_key(self.issuer_key))
        return ("revoked" if revoked else "good"), resp.public_bytes(serialization.Encoding.DER)


def _leaf(cn: str, public_key, issuer_cert: x509.Certificate, issuer_key, *, days: int,
          ttl: float = 0.0) -> x509.Certificate:
    now = dt.datetime.now(dt.timezone.utc)
    if ttl > 0:  # a short-lived certificate: valid from a second ago for `ttl` seconds
        not_before, not_after = now - dt.timedelta(seconds=1), now + dt.timedelta(seconds=ttl)
    else:
        not_before, not_after = now - _DAY, now + days * _DAY
    return (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
            .issuer_name(issuer_cert.subject).public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(not_before).not_valid_after(not_after)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False,
                                         key_encipherment=False, data_encipherment=False,
                                         key_agreement=True, key_cert_sign=False, crl_sign=False,
                                         encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_cert.public_key()),
                           critical=False)
            .sign(issuer_key, pki.hash_for_key(issuer_key)))


def serial_hex(cert: x509.Certificate) -> str:
    return format(cert.serial_number, "x")


def der_sha256_hex(cert: x509.Certificate) -> str:
    return hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest()
