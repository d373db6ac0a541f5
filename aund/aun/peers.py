"""AUN layer: the peer directory. Where a peer AID lives and which certificate is really its own.

A peer of our own issuer domain lives on the gateway our link already uses. A peer of another
issuer (`carol.other.test` seen from `alice.aid.test`) lives on its own domain's gateway, found by
the same discovery as our own AIDs (`https://{peer}/.well-known/aun-gateway`, then
`https://gateway.{issuer}/...`), remembered per issuer. Its certificate and CA chain come from
*that* gateway (`/pki/cert/{aid}`, `/pki/chain`), and so do its CRL and OCSP answers: a foreign
certificate is never judged by our home gateway's chain.

One directory serves the whole daemon (all AIDs, all links): verified certificates are cached per
(AID, fingerprint) for at most an hour (or until the certificate expires), so revocation is
re-checked at least that often, as the SDK does.
"""
from __future__ import annotations

import time
from collections import OrderedDict
from typing import Any

import structlog
import trio
from cryptography import x509

from aund.aun.http import http_base, http_get
from aund.aun.trust import GatewayTrust
from aund.errors import AuthError, E2EEError, GatewayUnavailable
from aund.identity import pki

log = structlog.get_logger("aund.peers")

GATEWAY_TTL = 3600.0          # a discovered foreign gateway is looked up again after this
DISCOVERY_RETRY = 30.0        # a failed discovery is not retried sooner (per issuer)
CERT_TTL = 3600.0
MAX_CACHED_CERTS = 4096


def issuer_of(aid: str) -> str:
    return aid.partition(".")[2].strip(".").lower()


class PeerDirectory:
    def __init__(self, trust: GatewayTrust, *, discovery_port: int | None = None) -> None:
        self.trust = trust
        self.discovery_port = discovery_port or None
        self._gateways: dict[str, tuple[str, float]] = {}        # issuer -> (gateway url, expires)
        self._failures: dict[str, tuple[str, float]] = {}        # issuer -> (error, retry after)
        self._locks: dict[str, trio.Lock] = {}
        self._certs: OrderedDict[tuple[str, str], tuple[x509.Certificate, str, float]] = OrderedDict()
        self.stats = {"discoveries": 0, "discovery_failures": 0, "cert_fetches": 0, "cert_hits": 0,
                      "revoked": 0}

    def forget(self) -> None:
        """Drop every cached gateway and certificate (trust roots changed)."""
        self._gateways.clear()
        self._failures.clear()
        self._certs.clear()

    def forget_peer(self, aid: str) -> None:
        """Drop the cached certificates of one AID (its certificate changed: renewal or rekey)."""
        aid = aid.strip().lower()
        for key in [k for k in self._certs if k[0] == aid]:
            del self._certs[key]

    def statistics(self) -> dict[str, Any]:
        return {**self.stats, "foreign_gateways": {k: v[0] for k, v in self._gateways.items()},
                "cached_certs": len(self._certs)}

    async def gateway_for(self, peer_aid: str, home_gateway: str, home_aid: str) -> str:
        """The gateway URL that serves `peer_aid`: ours for our own issuer, else discovered."""
        issuer = issuer_of(peer_aid)
        if not issuer or issuer == issuer_of(home_aid):
            return home_gateway
        now = time.monotonic()
        cached = self._gateways.get(issuer)
        if cached and cached[1] > now:
            return cached[0]
        async with self._locks.setdefault(issuer, trio.Lock()):
            cached = self._gateways.get(issuer)
            if cached and cached[1] > time.monotonic():
                return cached[0]
            failed = self._failures.get(issuer)
            if failed and failed[1] > time.monotonic():
                raise GatewayUnavailable(f"the gateway of {issuer} is unreachable: {failed[0]}")
            from aund.aun.auth import discover_gateways

            self.stats["discoveries"] += 1
            try:
                urls = await discover_gateways(peer_aid, port=self.discovery_port)
            except GatewayUnavailable as exc:
                self.stats["discovery_failures"] += 1
                self._failures[issuer] = (str(exc), time.monotonic() + DISCOVERY_RETRY)
                raise
            self._failures.pop(issuer, None)
            self._gateways[issuer] = (urls[0], time.monotonic() + GATEWAY_TTL)
            log.info("peers.gateway_discovered", issuer=issuer, gateway=urls[0], candidates=len(urls))
            return urls[0]

    async def certificate(self, peer_aid: str, *, home_gateway: str, home_aid: str,
                          fingerprint: str = "") -> x509.Certificate:
        """The peer's certificate (the one `fingerprint` names, else its current one), verified:
        chain from its own gateway to a trusted root, CN == AID, not revoked."""
        peer_aid = peer_aid.strip().lower()
        key = (peer_aid, fingerprint.strip().lower())
        cached = self._certs.get(key)
        if cached is not None and cached[2] > time.time():
            self._certs.move_to_end(key)
            self.stats["cert_hits"] += 1
            return cached[0]
        gateway = await self.gateway_for(peer_aid, home_gateway, home_aid)
        url = f"{http_base(gateway)}/pki/cert/{peer_aid}"
        if fingerprint:
            url += f"?cert_fingerprint={fingerprint}"
        self.stats["cert_fetches"] += 1
        status, body = await http_get(url)
        if status != 200:
            raise E2EEError(f"no certificate for {peer_aid} at {http_base(gateway)} (HTTP {status})",
                            data={"reason": "sender_key_unavailable", "peer": peer_aid})
        try:
            cert = pki.load_cert_pem(body)
        except pki.PKIError as exc:
            raise E2EEError(f"bad certificate for {peer_aid}: {exc}",
                            data={"reason": "sender_key_unavailable", "peer": peer_aid}) from None
        if fingerprint and not pki.cert_matches_fingerprint(cert, fingerprint):
            raise E2EEError(f"{http_base(gateway)} answered a certificate of {peer_aid} that is not {fingerprint}",
                            data={"reason": "sender_key_unavailable", "peer": peer_aid})
        try:
            await self.trust.verify(gateway, cert, expected_cn=peer_aid)
        except AuthError as exc:
            if exc.data.get("reason") == "certificate_revoked":
                self.stats["revoked"] += 1
                log.warning("peers.certificate_revoked", peer=peer_aid, serial=format(cert.serial_number, "x"),
                            source=exc.data.get("source"))
            raise
        expires = min(time.time() + CERT_TTL, cert.not_valid_after_utc.timestamp())
        self._certs[key] = (cert, gateway, expires)
        if len(self._certs) > MAX_CACHED_CERTS:
            self._certs.popitem(last=False)
        return cert
