"""AUN layer: which AUN roots aund trusts, and the checks of a certificate against them.

Trust roots are the union of
- the public "AUN Root CA" shipped with aund (the same certificate the official SDK bundles;
  `aund/certs/aun-root-ca.pem`), so the public network works with nothing configured;
- every PEM file named by `root_ca` in the configuration (a devnet's root, a private network);
- `{state_dir}/trust-roots.pem` when it exists (the operator's drop-in, like the SDK's
  `CA/root/trust-roots.pem`).
SIGHUP re-reads them (`GatewayTrust.replace_roots`), which also forgets every cached chain and
revocation answer.

`GatewayTrust.verify` checks a certificate as the SDK does: validity, chain from the gateway's
`/pki/chain` up to a trusted root (issuer first, root last), then revocation by the issuer's
signed CRL (`/pki/crl.json`, cached at most an hour) and OCSP (`/pki/ocsp/{serial}`, DER,
signed by the issuer or a responder it certified). Only an explicit "revoked" is fatal
(`CertificateRevoked`); a revocation service that cannot answer is logged and the check goes on,
as the SDK degrades.
"""
from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import structlog
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519
from cryptography.x509 import ocsp

from aund.aun import jsonrpc as rpc
from aund.aun.http import http_base, http_get
from aund.errors import AuthError, GatewayUnavailable, InvalidParams
from aund.identity import pki

log = structlog.get_logger("aund.trust")

CHAIN_TTL = 3600.0
REVOCATION_MAX_TTL = 3600.0      # never trust a CRL or OCSP answer longer than this (the SDK's cap)
REVOCATION_DEFAULT_TTL = 300.0   # when the answer names no next update
OCSP_CLOCK_SKEW = 300.0
STATE_TRUST_FILE = "trust-roots.pem"
BUNDLED_ROOT = "aun-root-ca.pem"


class CertificateRevoked(AuthError):
    """The issuer says this certificate is revoked (CRL or OCSP): nothing signed by it is trusted."""


def bundled_roots() -> list[x509.Certificate]:
    """The public AUN root(s) shipped as package data."""
    text = resources.files("aund").joinpath("certs", BUNDLED_ROOT).read_text("ascii")
    return pki.split_pem_bundle(text)


def read_root_file(path: Path) -> list[x509.Certificate]:
    """The certificates of one PEM file; InvalidParams naming the file when it cannot be used."""
    try:
        text = path.read_text("utf-8")
    except FileNotFoundError:
        raise InvalidParams(f"trusted root file {path} does not exist: fix root_ca or create it") from None
    except OSError as exc:
        raise InvalidParams(f"trusted root file {path} cannot be read: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise InvalidParams(f"trusted root file {path} is not PEM text") from None
    try:
        certs = pki.split_pem_bundle(text)
    except pki.PKIError as exc:
        raise InvalidParams(f"trusted root file {path}: {exc}") from None
    if not certs:
        raise InvalidParams(f"trusted root file {path} holds no certificate")
    return certs


@dataclass(frozen=True)
class TrustRoots:
    certs: tuple[x509.Certificate, ...]
    sources: tuple[str, ...]  # where they came from, for `aund status` and logs

    @classmethod
    def load(cls, root_ca: tuple[Path, ...] | list[Path] = (), state_dir: Path | None = None) -> "TrustRoots":
        certs = list(bundled_roots())
        sources = [f"bundled:{BUNDLED_ROOT}"]
        files = list(root_ca)
        if state_dir is not None and (state_dir / STATE_TRUST_FILE).exists():
            files.append(state_dir / STATE_TRUST_FILE)
        for path in files:
            certs.extend(read_root_file(path))
            sources.append(str(path))
        unique: dict[bytes, x509.Certificate] = {}
        for cert in certs:
            unique.setdefault(cert.public_bytes(serialization.Encoding.DER), cert)
        return cls(tuple(unique.values()), tuple(sources))

    def names(self) -> list[str]:
        return [c.subject.rfc4514_string() for c in self.certs]


def _key_bits(public_key: Any) -> bytes:
    """The subjectPublicKey BIT STRING contents (what OCSP's issuerKeyHash hashes)."""
    if isinstance(public_key, ec.EllipticCurvePublicKey):
        return public_key.public_bytes(serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint)
    if isinstance(public_key, (ed25519.Ed25519PublicKey, ed448.Ed448PublicKey)):
        return public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return public_key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.PKCS1)


def _serial_hex(cert: x509.Certificate) -> str:
    return format(cert.serial_number, "x")


def _ttl(next_update: Any, now: float) -> float:
    until = next_update.timestamp() if next_update is not None else now + REVOCATION_DEFAULT_TTL
    return min(until, now + REVOCATION_MAX_TTL)


def parse_crl(payload: bytes, issuer: x509.Certificate, now: float) -> tuple[set[int], float]:
    """(revoked serials, valid until) from a `/pki/crl.json` body; AuthError when it cannot be used."""
    try:
        doc = rpc.loads(payload.decode("utf-8"))
        crl = x509.load_pem_x509_crl(str(doc["crl_pem"]).encode("ascii"))
    except (rpc.FrameError, UnicodeError, KeyError, TypeError, ValueError) as exc:
        raise AuthError(f"malformed CRL: {exc}") from None
    if crl.issuer != issuer.subject:
        raise AuthError("CRL is not issued by the certificate's issuer")
    if not pki.verify_signature(issuer.public_key(), crl.signature, crl.tbs_certlist_bytes):
        raise AuthError("CRL signature does not verify with the issuer key")
    if crl.next_update_utc is not None and now > crl.next_update_utc.timestamp():
        raise AuthError("CRL has expired")
    return {r.serial_number for r in crl}, _ttl(crl.next_update_utc, now)


def parse_ocsp(payload: bytes, cert: x509.Certificate, issuer: x509.Certificate, now: float) -> tuple[str, float]:
    """("good" | "revoked" | "unknown", valid until) from a `/pki/ocsp/{serial}` body; AuthError when
    the DER answer cannot be trusted (the JSON `status` alone is never believed)."""
    try:
        doc = rpc.loads(payload.decode("utf-8"))
        der = pki.b64d(str(doc["ocsp_response"]))
        response = ocsp.load_der_ocsp_response(der)
    except (rpc.FrameError, UnicodeError, KeyError, TypeError, ValueError, pki.PKIError) as exc:
        raise AuthError(f"malformed OCSP answer: {exc}") from None
    if response.response_status is not ocsp.OCSPResponseStatus.SUCCESSFUL:
        raise AuthError(f"OCSP responder says {response.response_status.name.lower()}")
    if response.serial_number != cert.serial_number:
        raise AuthError("OCSP answer is about another certificate")
    algorithm = response.hash_algorithm.name
    if algorithm not in ("sha1", "sha256", "sha384", "sha512"):
        raise AuthError(f"OCSP answer uses an unsupported hash {algorithm}")
    if (response.issuer_name_hash != hashlib.new(algorithm, issuer.subject.public_bytes()).digest()
            or response.issuer_key_hash != hashlib.new(algorithm, _key_bits(issuer.public_key())).digest()):
        raise AuthError("OCSP answer names another issuer")
    signer = issuer
    if response.certificates:  # a delegated responder: certified by the issuer for OCSP signing
        signer = response.certificates[0]
        try:
            signer.verify_directly_issued_by(issuer)
            eku = signer.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        except (ValueError, TypeError, InvalidSignature, x509.ExtensionNotFound) as exc:
            raise AuthError(f"OCSP responder is not certified by the issuer: {exc or type(exc).__name__}") from None
        if x509.oid.ExtendedKeyUsageOID.OCSP_SIGNING not in eku:
            raise AuthError("OCSP responder certificate lacks the OCSP signing usage")
    if not pki.verify_signature(signer.public_key(), response.signature, response.tbs_response_bytes):
        raise AuthError("OCSP signature does not verify")
    if response.this_update_utc is not None and now < response.this_update_utc.timestamp() - OCSP_CLOCK_SKEW:
        raise AuthError("OCSP answer is not yet valid")
    if response.next_update_utc is not None and now > response.next_update_utc.timestamp():
        raise AuthError("OCSP answer has expired")
    status = {ocsp.OCSPCertStatus.GOOD: "good", ocsp.OCSPCertStatus.REVOKED: "revoked"}.get(
        response.certificate_status, "unknown")
    return status, _ttl(response.next_update_utc, now)


class GatewayTrust:
    """Trusted roots plus caches (by gateway HTTP base) of CA chains, CRLs and OCSP answers."""

    def __init__(self, roots: TrustRoots | list[x509.Certificate]) -> None:
        self._chains: dict[str, tuple[list[x509.Certificate], float]] = {}
        self._crls: dict[str, tuple[set[int], float]] = {}
        self._ocsp: dict[tuple[str, int], tuple[str, float]] = {}
        self.replace_roots(roots)

    @classmethod
    def from_files(cls, paths: list[Path] | tuple[Path, ...], state_dir: Path | None = None) -> "GatewayTrust":
        """The bundled root plus the given PEM files (and the state dir's drop-in file)."""
        return cls(TrustRoots.load(tuple(paths), state_dir))

    def replace_roots(self, roots: TrustRoots | list[x509.Certificate]) -> None:
        """New trust roots (SIGHUP); every cached chain and revocation answer is forgotten."""
        self.roots = roots if isinstance(roots, TrustRoots) else TrustRoots(tuple(roots), ("given",))
        self._chains.clear()
        self._crls.clear()
        self._ocsp.clear()

    def statistics(self) -> dict[str, Any]:
        return {"roots": self.roots.names(), "sources": list(self.roots.sources),
                "cached_chains": len(self._chains), "cached_crls": len(self._crls)}

    async def chain(self, gateway_url: str) -> list[x509.Certificate]:
        base = http_base(gateway_url)
        cached = self._chains.get(base)
        if cached and cached[1] > time.time():
            return cached[0]
        status, body = await http_get(base + "/pki/chain")
        if status != 200:
            raise AuthError(f"cannot fetch the CA chain of {base} (HTTP {status})")
        try:
            chain = pki.split_pem_bundle(body.decode("utf-8"))
        except (pki.PKIError, UnicodeDecodeError) as exc:
            raise AuthError(f"malformed CA chain from {base}: {exc}") from None
        if not chain:
            raise AuthError(f"{base} serves an empty CA chain")
        expires = min([time.time() + CHAIN_TTL, *(c.not_valid_after_utc.timestamp() for c in chain)])
        self._chains[base] = (chain, expires)
        return chain

    async def check_anchor(self, gateway_url: str) -> None:
        """Before registering on a gateway: its CA chain must be well formed and end at a root we
        trust, so an AID is never claimed on a network whose login would then be refused."""
        chain = await self.chain(gateway_url)
        for child, parent in zip(chain, chain[1:]):
            try:
                child.verify_directly_issued_by(parent)
            except (ValueError, TypeError, InvalidSignature):
                raise AuthError(f"the CA chain of {http_base(gateway_url)} is broken at "
                                f"{child.subject.rfc4514_string()!r}", data={"reason": "untrusted_chain"}) from None
        root_der = chain[-1].public_bytes(serialization.Encoding.DER)
        if not any(r.public_bytes(serialization.Encoding.DER) == root_der for r in self.roots.certs):
            raise self._untrusted_root(f"not registering on {http_base(gateway_url)}", chain)

    def _untrusted_root(self, what: str, chain: list[x509.Certificate]) -> AuthError:
        return AuthError(
            f"{what}: its CA chain ends at {chain[-1].subject.rfc4514_string()!r}, which is not a trusted AUN "
            f"root (trusted: {'; '.join(self.roots.names())}); add that root with --root-ca / root_ca, or to "
            f"{STATE_TRUST_FILE} in the state dir, then reload (SIGHUP)", data={"reason": "untrusted_root"})

    async def verify(self, gateway_url: str, cert: x509.Certificate, expected_cn: str | None = None, *,
                     check_revocation: bool = True) -> None:
        """Raise AuthError unless `cert` chains to a trusted root through the gateway's CA chain
        (and, when `expected_cn` is given, names that AID); CertificateRevoked when its issuer
        says it is revoked."""
        chain = await self.chain(gateway_url)
        try:
            pki.verify_chain(cert, chain, self.roots.certs)
        except pki.PKIError as exc:
            if "not anchored" in str(exc):
                raise self._untrusted_root("certificate not trusted", chain) from None
            raise AuthError(f"certificate not trusted: {exc}", data={"reason": "untrusted_chain"}) from None
        if expected_cn is not None and pki.cert_aid(cert) != expected_cn:
            raise AuthError(f"certificate CN {pki.cert_aid(cert)!r} is not {expected_cn!r}",
                            data={"reason": "cn_mismatch"})
        if check_revocation:
            await self.check_revocation(gateway_url, cert, chain[0])

    async def check_revocation(self, gateway_url: str, cert: x509.Certificate, issuer: x509.Certificate) -> None:
        """CRL, then OCSP, as the SDK does: explicit "revoked" raises CertificateRevoked; a service
        that cannot answer (down, malformed, badly signed) is logged and skipped."""
        base = http_base(gateway_url)
        who = pki.cert_aid(cert) or cert.subject.rfc4514_string()
        now = time.time()
        crl = await self._answer("crl", self._crls, base, f"{base}/pki/crl.json", who,
                                 lambda body: parse_crl(body, issuer, now), now)
        ocsp_status = await self._answer("ocsp", self._ocsp, (base, cert.serial_number),
                                         f"{base}/pki/ocsp/{_serial_hex(cert)}", who,
                                         lambda body: parse_ocsp(body, cert, issuer, now), now)
        for source, revoked in (("crl", crl is not None and cert.serial_number in crl),
                                ("ocsp", ocsp_status == "revoked")):
            if revoked:
                raise CertificateRevoked(
                    f"the certificate of {who} (serial {_serial_hex(cert)}) is revoked: its issuer's "
                    f"{source.upper()} says so", data={"reason": "certificate_revoked", "aid": who, "source": source})

    async def _answer(self, kind: str, cache: dict, key: Any, url: str, who: str, parse, now: float) -> Any:
        """A revocation service's answer (cached until it expires), or None when it cannot give one."""
        cached = cache.get(key)
        if cached is not None and cached[1] > now:
            return cached[0]
        try:
            status, body = await http_get(url)
            if status != 200:
                raise AuthError(f"HTTP {status}")
            cache[key] = parse(body)
        except (AuthError, GatewayUnavailable) as exc:
            log.warning(f"pki.{kind}_unavailable", url=url, subject=who, error=str(exc),
                        note="degrading gracefully: only an explicit revocation is fatal")
            return None
        return cache[key][0]
