"""Identity layer: an AID's agent.md, the signed public card the AUN name service serves at
`https://{aid}/agent.md` (and the production gateway requires before it serves a client that
declares `agent_md_validation_v1`).

The document is YAML front matter (`aid`, `name`, `type`, `version` required; `description` at
most 100 characters) and a markdown body, at most `MAX_PAYLOAD` bytes, ending with a newline,
followed by one signature block:

    <!-- AUN-SIGNATURE
    cert_fingerprint: sha256:<hex of the certificate DER>
    public_key_fingerprint: sha256:<hex of the SPKI DER>
    timestamp: <unix seconds>
    signature: <base64 DER ECDSA P-256 / SHA-256 over the payload bytes>
    -->

Pure functions (no I/O): the daemon publishes it (`aund.daemon`), the SDK verifies it.
"""
from __future__ import annotations

import json
import time

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from aund.identity import pki

MAX_PAYLOAD = 4096
MARKER = "<!-- AUN-SIGNATURE"


class AgentMdError(ValueError):
    """An agent.md that cannot be signed or published as given."""


def default_document(aid: str, *, document_type: str = "agent", name: str = "", description: str = "") -> str:
    """The card aund publishes for an AID that has none: its name, type and a one-line summary."""
    title = name.strip() or aid.split(".", 1)[0]
    summary = " ".join(description.split()) or f"AUN {document_type} {title}"
    front = {"aid": aid, "name": title, "type": document_type, "version": "1.0.0", "description": summary[:100]}
    lines = [f"{key}: {json.dumps(value, ensure_ascii=False)}" for key, value in front.items()]
    return "---\n" + "\n".join(lines) + "\n---\n\n" + f"# {title}\n"


def payload_of(document: str) -> str:
    """The document without its trailing signature block (if any)."""
    at = document.rfind(MARKER)
    return document[:at] if at >= 0 else document


def sign(document: str, key: ec.EllipticCurvePrivateKey, cert: x509.Certificate, *, now: int | None = None) -> str:
    """`document` (any old signature removed) signed with the AID key; AgentMdError when it cannot be."""
    payload = payload_of(document)
    if not payload.endswith("\n"):
        raise AgentMdError("agent.md must end with a newline before its signature")
    if len(payload.encode("utf-8")) > MAX_PAYLOAD:
        raise AgentMdError(f"agent.md is larger than {MAX_PAYLOAD} bytes")
    if pki.spki_der(key.public_key()) != pki.spki_der(cert.public_key()):
        raise AgentMdError("the signing key is not the certificate's")
    signature = pki.b64e(pki.sign_for_key(key, payload.encode("utf-8")))
    block = "\n".join([MARKER, f"cert_fingerprint: {pki.cert_fingerprint(cert)}",
                       f"public_key_fingerprint: {pki.spki_fingerprint(cert.public_key())}",
                       f"timestamp: {int(time.time()) if now is None else now}", f"signature: {signature}", "-->"])
    return payload + block
