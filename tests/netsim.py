"""A loopback copy of the public AUN network's shape, for tests.

No name lookup leaves the box: spawned processes run in a private mount namespace whose
/etc/hosts maps the simulated names to random loopback addresses, /etc/nsswitch.conf says
`hosts: files` and /etc/resolv.conf points at 127.0.0.1, so an unknown name fails at once.

API:
    net = NetSim(tmp_path, ["aid.test", "other.test"])   # or net = NetSim.create(...)
    net.skip_reason            # None, or why this machine cannot run it (not root, no unshare)
    net.address("aid.test")    # "127.R.S.1" (the order of the issuers list), port 443
    net.add_host(name, issuer) # resolve an AID's own host name (https://{aid}/agent.md) too
    net.cert_files("aid.test") # (cert.pem, key.pem) for gateway.aid.test and *.aid.test
    net.ca_file                # the throw-away "Web PKI" CA bundle (system trust stand-in)
    net.wrap(argv)             # argv run inside the namespace
    net.env(base=None)         # os.environ copy + SSL_CERT_FILE=net.ca_file
    subprocess.Popen(net.wrap(["python", "-m", "aund", "run", ...]), env=net.env())
"""
from __future__ import annotations

import datetime
import os
import random
import shutil
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

_WRAP = ('mount --bind "$1" /etc/hosts && mount --bind "$2" /etc/nsswitch.conf && '
         'mount --bind "$3" /etc/resolv.conf && shift 3 && exec "$@"')


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _pem_key(key) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


class NetSim:
    def __init__(self, root: Path, issuers: list[str]):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.issuers = list(issuers)
        self.skip_reason = None
        if os.geteuid() != 0:
            self.skip_reason = "netsim needs root (private mount namespace for /etc/hosts)"
        elif shutil.which("unshare") is None:
            self.skip_reason = "netsim needs util-linux unshare"
        r, s = random.randint(1, 254), random.randint(1, 254)
        self._addr = {d: f"127.{r}.{s}.{i + 1}" for i, d in enumerate(self.issuers)}
        now = datetime.datetime.now(datetime.timezone.utc)
        self._nb, self._na = now - datetime.timedelta(hours=1), now + datetime.timedelta(days=2)
        self._ca_key = ec.generate_private_key(ec.SECP256R1())
        self._ca = (x509.CertificateBuilder().subject_name(_name("netsim test Web PKI"))
                    .issuer_name(_name("netsim test Web PKI")).public_key(self._ca_key.public_key())
                    .serial_number(x509.random_serial_number())
                    .not_valid_before(self._nb).not_valid_after(self._na)
                    .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
                    .sign(self._ca_key, hashes.SHA256()))
        self.ca_file = self.root / "webpki-ca.pem"
        self.ca_file.write_bytes(self._ca.public_bytes(serialization.Encoding.PEM))
        self._certs = {d: self._server_cert(d) for d in self.issuers}
        self.hosts_file = self.root / "hosts"
        lines = ["127.0.0.1 localhost"]
        lines += [f"{self._addr[d]} gateway.{d} {d}" for d in self.issuers]
        self.hosts_file.write_text("\n".join(lines) + "\n")
        self.nsswitch_file = self.root / "nsswitch.conf"
        self.nsswitch_file.write_text("hosts: files\n")
        self.resolv_file = self.root / "resolv.conf"
        self.resolv_file.write_text("nameserver 127.0.0.1\n")

    def _server_cert(self, issuer: str) -> tuple[Path, Path]:
        key = ec.generate_private_key(ec.SECP256R1())
        names = [x509.DNSName(f"gateway.{issuer}"), x509.DNSName(f"*.{issuer}"),
                 x509.DNSName(issuer)]
        cert = (x509.CertificateBuilder().subject_name(_name(f"gateway.{issuer}"))
                .issuer_name(self._ca.subject).public_key(key.public_key())
                .serial_number(x509.random_serial_number())
                .not_valid_before(self._nb).not_valid_after(self._na)
                .add_extension(x509.SubjectAlternativeName(names), critical=False)
                .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                .sign(self._ca_key, hashes.SHA256()))
        cert_f, key_f = self.root / f"{issuer}.crt", self.root / f"{issuer}.key"
        cert_f.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        key_f.write_bytes(_pem_key(key))
        key_f.chmod(0o600)
        return cert_f, key_f

    def add_host(self, name: str, issuer: str) -> None:
        """Resolve `name` (an AID's own host, as the name service's DNS does) to the issuer's address.
        The hosts file is appended in place, so processes already in their namespace see it too."""
        with self.hosts_file.open("a") as f:
            f.write(f"{self._addr[issuer]} {name}\n")

    def address(self, issuer: str) -> str:
        return self._addr[issuer]

    def cert_files(self, issuer: str) -> tuple[Path, Path]:
        return self._certs[issuer]

    def wrap(self, argv: list[str]) -> list[str]:
        return ["unshare", "-m", "sh", "-c", _WRAP, "sh", str(self.hosts_file),
                str(self.nsswitch_file), str(self.resolv_file), *map(str, argv)]

    def env(self, base: dict | None = None) -> dict:
        e = dict(os.environ if base is None else base)
        e["SSL_CERT_FILE"] = str(self.ca_file)
        return e
