"""Identity layer: an AID's agent.md, the signed public card the AUN name service serves at
`https://{aid}/agent.md` (and the production gateway requires before it serves a client that
declares `agent_md_validation_v1`).

The document is YAML front matter and a markdown body (the payload: at most `MAX_PAYLOAD` bytes,
ending with a newline), followed by one signature block (at most `MAX_SIGNATURE_BLOCK` bytes):

    <!-- AUN-SIGNATURE
    cert_fingerprint: sha256:<hex of the certificate DER>
    public_key_fingerprint: sha256:<hex of the SPKI DER>
    timestamp: <unix seconds>
    signature: <base64 DER ECDSA P-256 / SHA-256 over the payload bytes>
    -->

Front matter: `aid`, `name`, `type`, `version` (MAJOR.MINOR.PATCH) required; `description` at
most 100 characters, `avatar` at most 256, `tags` a list of strings, `exttype` a string; other keys
are kept as they are. No YAML tags, anchors, aliases or duplicate keys.

`validate` is the one check, for the daemon before it uploads and for the devnet when it receives
(as the name service on `PUT /agent.md`). `validate_entity` checks a group's card (`type: "group"`,
the multi-v1 signature format): front matter `owner` (the group's current owner) and
`entity_cert_fingerprint` (its current group certificate), the first block signed by the group key
with `signer_aid: {group aid}`, any further block by the owner (`signer_aid: {owner}`) over
everything before it. Pure functions (no I/O).
"""
from __future__ import annotations

import base64
import json
import re
import time
from dataclasses import dataclass
from typing import Any, Callable

import yaml
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from aund.identity import pki

MAX_PAYLOAD = 4096
MAX_SIGNATURE_BLOCK = 2048
MAX_BODY = MAX_PAYLOAD + MAX_SIGNATURE_BLOCK  # what a name service reads of a PUT at most
MAX_FUTURE_SECONDS = 300  # a signature timestamp may be this far ahead of the verifier's clock
MARKER = "<!-- AUN-SIGNATURE"
INVALID, TOO_LARGE = "invalid_agent_md", "agent_md_too_large"  # the name service's error codes
GENERATION = "entity_generation_conflict"  # a group card naming another owner or certificate (HTTP 409)
_ENTITY_FORBIDDEN = ("ownership", "ownership_proof", "ownership_release")

_AID_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_-]*(?:\.[A-Za-z0-9_][A-Za-z0-9_-]*)+")
_SEMVER_RE = re.compile(r"\d+\.\d+\.\d+")
_FINGERPRINT_RE = re.compile(r"sha256:[0-9a-f]{64}")
_BLOCK_RE = re.compile(r"<!-- AUN-SIGNATURE(?:-[A-Z0-9-]+)?(?:\r\n|\n|\r)(?P<body>.*?)(?:\r\n|\n|\r)-->\s*", re.S)
_SIGNATURE_FIELDS = ("cert_fingerprint", "public_key_fingerprint", "timestamp", "signature", "signer_aid")
_MAX_UNIX_SECONDS = 2**53 - 1


class AgentMdError(ValueError):
    """An agent.md that cannot be signed, published or accepted as given. `field` names the part
    at fault (a front matter key, "payload", "signature", ...); `code` is the name service's
    (`invalid_agent_md`, or `agent_md_too_large` for a payload or body over the limits)."""

    def __init__(self, message: str, *, field: str = "", code: str = INVALID) -> None:
        super().__init__(message)
        self.field, self.code = field, code


@dataclass(frozen=True)
class Checked:
    """A document that passed `validate`: its payload, front matter and signature fields."""

    payload: str
    front: dict[str, Any]
    signature: dict[str, str] | None


def default_document(aid: str, *, document_type: str = "agent", name: str = "", description: str = "") -> str:
    """The card aund publishes for an AID that has none: its name, type and a one-line summary."""
    title = name.strip() or aid.split(".", 1)[0]
    summary = " ".join(description.split()) or f"AUN {document_type} {title}"
    front = {"aid": aid, "name": title, "type": document_type, "version": "1.0.0", "description": summary[:100]}
    lines = [f"{key}: {json.dumps(value, ensure_ascii=False)}" for key, value in front.items()]
    return "---\n" + "\n".join(lines) + "\n---\n\n" + f"# {title}\n"


def payload_of(document: str) -> str:
    """The document without its signature block(s): everything before the first marker."""
    at = document.find(MARKER)
    return document[:at] if at >= 0 else document


def group_document(group_aid: str, *, owner: str, entity_cert_fingerprint: str, name: str = "",
                   description: str = "", avatar: str = "") -> str:
    """The card of a group AID: type "group", its `owner` AID and the fingerprint of the group
    certificate it is signed with (a new card follows every new group certificate)."""
    title = name.strip() or group_aid
    summary = " ".join(description.split()) or f"AUN group {title}"
    front = {"aid": group_aid, "name": title, "type": "group", "owner": owner,
             "entity_cert_fingerprint": entity_cert_fingerprint, "version": "1.0.0", "description": summary[:100]}
    if avatar.strip():
        front["avatar"] = avatar.strip()[:256]
    lines = [f"{key}: {json.dumps(value, ensure_ascii=False)}" for key, value in front.items()]
    return "---\n" + "\n".join(lines) + "\n---\n\n" + f"# {title}\n"


def sign(document: str, key: ec.EllipticCurvePrivateKey, cert: x509.Certificate, *, now: int | None = None,
         entity: bool = False) -> str:
    """`document` (any old signature removed) signed with the AID key; AgentMdError when it cannot
    be, or when its payload would not validate for the certificate's AID. `entity`: a group's
    card, signed with the group key (its block names the group as `signer_aid`, the first block of
    the multi-v1 format) and naming that key's certificate."""
    payload = payload_of(document)
    if pki.spki_der(key.public_key()) != pki.spki_der(cert.public_key()):
        raise AgentMdError("the signing key is not the certificate's", field="signature")
    aid = pki.cert_aid(cert)
    front = _check_payload(payload, aid=aid, entity=entity)
    if entity and front["entity_cert_fingerprint"] != pki.cert_fingerprint(cert):
        raise AgentMdError("entity_cert_fingerprint does not name the group's current certificate",
                           field="entity_cert_fingerprint", code=GENERATION)
    signature = pki.b64e(pki.sign_for_key(key, payload.encode("utf-8")))
    block = [MARKER, f"cert_fingerprint: {pki.cert_fingerprint(cert)}",
             f"public_key_fingerprint: {pki.spki_fingerprint(cert.public_key())}"]
    if entity:
        block.append(f"signer_aid: {aid}")
    block += [f"timestamp: {int(time.time()) if now is None else now}", f"signature: {signature}", "-->"]
    return payload + "\n".join(block)


def validate(document: str | bytes, *, aid: str, cert: x509.Certificate | None = None, now: float | None = None,
             require_signature: bool = True) -> Checked:
    """Check `document` as the name service does on upload; AgentMdError (naming the field) if not.

    With `cert` (the AID's current certificate) the signature is verified: the fingerprints name
    that certificate, the timestamp lies within its validity and not in the future, and the
    ECDSA P-256 signature over the payload bytes holds. Without it, only the form is checked."""
    document = _decoded(document)
    payload, fields = _split(document)
    front = _check_payload(payload, aid=aid)
    if fields is None:
        if require_signature:
            raise AgentMdError("agent.md has no AUN-SIGNATURE block", field="signature")
        return Checked(payload, front, None)
    if cert is not None:
        _verify(payload, fields, aid=aid, cert=cert, now=time.time() if now is None else now)
    return Checked(payload, front, fields)


def validate_entity(document: str | bytes, *, aid: str, owner: str, entity_cert: x509.Certificate,
                    owner_cert: Callable[[str], x509.Certificate | None], now: float | None = None) -> Checked:
    """Check a group's card as the name service does on upload (see the module docstring).

    `owner` and `entity_cert` are the group's current owner and certificate as the service records
    them; a card naming others fails with code GENERATION. `owner_cert(fingerprint)` finds the
    owner's certificate for an owner signature block (None: unknown)."""
    document = _decoded(document)
    payload, blocks = _blocks(document)
    front = _check_payload(payload, aid=aid, entity=True)
    if not blocks:
        raise AgentMdError("a group card must be signed with the group key", field="signature")
    if front["owner"].lower() != owner.lower():
        raise AgentMdError(f"owner {front['owner']!r} is not the group's current owner", field="owner",
                           code=GENERATION)
    if front["entity_cert_fingerprint"] != pki.cert_fingerprint(entity_cert):
        raise AgentMdError("entity_cert_fingerprint does not name the group's current certificate",
                           field="entity_cert_fingerprint", code=GENERATION)
    at = time.time() if now is None else now
    for index, (signed, fields) in enumerate(blocks):
        signer = fields.get("signer_aid", "").lower()
        if index == 0:
            if signer != aid.strip().lower():
                raise AgentMdError("the first signature block must be the group's (signer_aid: the group aid)",
                                   field="signature.signer_aid")
            _verify(signed, fields, aid=aid, cert=entity_cert, now=at)
            continue
        if signer != owner.lower():
            raise AgentMdError("an additional signature block must be the owner's (signer_aid: the owner)",
                               field="signature.signer_aid")
        cert = owner_cert(fields["cert_fingerprint"])
        if cert is None:
            raise AgentMdError(f"cert_fingerprint does not name a certificate of {owner}",
                               field="signature.cert_fingerprint")
        _verify(signed, fields, aid=owner, cert=cert, now=at)
    return Checked(payload, front, blocks[0][1])


def _decoded(document: str | bytes) -> str:
    if isinstance(document, bytes):
        if len(document) > MAX_BODY:
            raise AgentMdError(f"agent.md is {len(document)} bytes; at most {MAX_BODY} are accepted",
                               field="document", code=TOO_LARGE)
        try:
            document = document.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise AgentMdError(f"agent.md is not UTF-8 (byte {exc.start})", field="document") from None
    if not isinstance(document, str) or not document.strip():
        raise AgentMdError("agent.md is empty", field="document")
    return document


def _split(document: str) -> tuple[str, dict[str, str] | None]:
    """(payload, signature fields or None) of an AID's card: one block at most, no signer_aid."""
    payload, blocks = _blocks(document)
    if len(blocks) > 1:
        raise AgentMdError("agent.md must carry exactly one AUN-SIGNATURE block", field="signature")
    if blocks and "signer_aid" in blocks[0][1]:
        raise AgentMdError("unknown signature field 'signer_aid' in an AID's card (group cards only)",
                           field="signature.signer_aid")
    return payload, blocks[0][1] if blocks else None


def _blocks(document: str) -> tuple[str, list[tuple[str, dict[str, str]]]]:
    """(payload, [(the text the block signs, its fields)]) in document order; AgentMdError for a
    malformed block or blocks larger than MAX_SIGNATURE_BLOCK together."""
    starts = [m.start() for m in re.finditer(re.escape(MARKER), document)]
    if not starts:
        return document, []
    payload = document[:starts[0]]
    if len(document[starts[0]:].encode("utf-8")) > MAX_SIGNATURE_BLOCK:
        raise AgentMdError(f"the AUN-SIGNATURE block is larger than {MAX_SIGNATURE_BLOCK} bytes", field="signature")
    blocks = []
    for index, at in enumerate(starts):
        end = starts[index + 1] if index + 1 < len(starts) else len(document)
        if at > 0 and document[at - 1] not in "\r\n":
            raise AgentMdError("the AUN-SIGNATURE block must start on a new line", field="signature")
        blocks.append((document[:at], _block_fields(document[at:end])))
    return payload, blocks


def _block_fields(tail: str) -> dict[str, str]:
    match = _BLOCK_RE.fullmatch(tail)
    if match is None:
        raise AgentMdError("the AUN-SIGNATURE block is malformed (it must end with '-->')", field="signature")
    fields: dict[str, str] = {}
    for line in match.group("body").splitlines():
        if not line.strip():
            continue
        name, colon, value = line.strip().partition(":")
        name = name.strip().lower()
        if not colon:
            raise AgentMdError(f"signature line {line.strip()[:40]!r} is not 'name: value'", field="signature")
        if name not in _SIGNATURE_FIELDS:
            raise AgentMdError(f"unknown signature field {name[:40]!r}", field=f"signature.{name[:40]}")
        if name in fields:
            raise AgentMdError(f"signature field {name} appears twice", field=f"signature.{name}")
        fields[name] = value.strip()
    for name in ("cert_fingerprint", "timestamp", "signature"):
        if not fields.get(name):
            raise AgentMdError(f"the signature block lacks {name}", field=f"signature.{name}")
    for name in ("cert_fingerprint", "public_key_fingerprint"):
        if name in fields and not _FINGERPRINT_RE.fullmatch(fields[name]):
            raise AgentMdError(f"{name} must be sha256:<64 lower-case hex>", field=f"signature.{name}")
    if "signer_aid" in fields and not _AID_RE.fullmatch(fields["signer_aid"]):
        raise AgentMdError("signer_aid is not an AID", field="signature.signer_aid")
    stamp = fields["timestamp"]
    if not re.fullmatch(r"[1-9][0-9]{0,15}", stamp) or int(stamp) > _MAX_UNIX_SECONDS:
        raise AgentMdError("the signature timestamp must be unix seconds", field="signature.timestamp")
    try:
        if base64.b64encode(base64.b64decode(fields["signature"], validate=True)).decode() != fields["signature"]:
            raise ValueError
    except ValueError:
        raise AgentMdError("the signature is not strict base64", field="signature.signature") from None
    return fields


def _check_payload(payload: str, *, aid: str, entity: bool = False) -> dict[str, Any]:
    size = len(payload.encode("utf-8"))
    if size > MAX_PAYLOAD:
        raise AgentMdError(f"agent.md is larger than {MAX_PAYLOAD} bytes ({size}) before its signature",
                           field="payload", code=TOO_LARGE)
    if not payload.endswith(("\n", "\r")):
        raise AgentMdError("agent.md must end with a newline before its signature", field="payload")
    front = _front_matter(payload)
    for key in ("aid", "name", "type", "version"):
        if key not in front:
            raise AgentMdError(f"the front matter lacks {key}", field=key)
    if not isinstance(front["aid"], str) or len(front["aid"]) > 255 or not _AID_RE.fullmatch(front["aid"]):
        raise AgentMdError("the front matter aid is not an AID (name.issuer)", field="aid")
    if front["aid"].lower() != aid.strip().lower():
        raise AgentMdError(f"the front matter aid {front['aid']!r} is not {aid}", field="aid")
    for key in ("name", "type"):
        if not isinstance(front[key], str) or not front[key].strip():
            raise AgentMdError(f"the front matter {key} must be a non-empty string", field=key)
    if entity:
        _check_entity_front(front)
    elif front["type"] in ("group", "org"):
        raise AgentMdError(f"type {front['type']!r} cards (signed by the entity and its owner) are not "
                           "supported here; an AID's card has another type (e.g. agent)", field="type")
    if not isinstance(front["version"], str) or not _SEMVER_RE.fullmatch(front["version"]):
        raise AgentMdError('the front matter version must be a quoted "MAJOR.MINOR.PATCH"', field="version")
    for key, limit in (("description", 100), ("avatar", 256)):
        if key in front:
            if not isinstance(front[key], str):
                raise AgentMdError(f"the front matter {key} must be a string", field=key)
            if len(front[key]) > limit:
                raise AgentMdError(f"the front matter {key} has {len(front[key])} characters; at most {limit}",
                                   field=key)
    if "tags" in front and (not isinstance(front["tags"], list) or not all(isinstance(t, str) for t in front["tags"])):
        raise AgentMdError("the front matter tags must be a list of strings", field="tags")
    if "exttype" in front and not isinstance(front["exttype"], str):
        raise AgentMdError("the front matter exttype must be a string", field="exttype")
    return front


def _check_entity_front(front: dict[str, Any]) -> None:
    """A group card's own fields: type group, its owner and its certificate generation, no Ownership."""
    if front["type"] != "group":
        raise AgentMdError(f"a group's card has type \"group\", not {front['type']!r}", field="type")
    owner = front.get("owner")
    if not isinstance(owner, str) or len(owner) > 255 or not _AID_RE.fullmatch(owner):
        raise AgentMdError("a group card names its owner AID (owner)", field="owner")
    fingerprint = front.get("entity_cert_fingerprint")
    if not isinstance(fingerprint, str) or not _FINGERPRINT_RE.fullmatch(fingerprint):
        raise AgentMdError("a group card names its certificate (entity_cert_fingerprint: sha256:<64 hex>)",
                           field="entity_cert_fingerprint")
    for key in _ENTITY_FORBIDDEN:
        if key in front:
            raise AgentMdError(f"a group card may not declare {key} (Ownership does not apply)", field=key)


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate mapping keys."""


def _mapping(loader: _StrictLoader, node: yaml.MappingNode) -> dict[Any, Any]:
    out: dict[Any, Any] = {}
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node, deep=True)
        try:
            if key in out:
                raise AgentMdError(f"the front matter key {str(key)[:40]!r} appears twice", field=str(key)[:40])
        except TypeError:  # an unhashable key (a list or map as key)
            raise AgentMdError("the front matter has a key that is not a scalar", field="front_matter") from None
        out[key] = loader.construct_object(value_node, deep=True)
    return out


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping)


def _front_matter(payload: str) -> dict[str, Any]:
    lines = payload.lstrip("\ufeff").splitlines()
    if not lines or lines[0].strip() != "---":
        raise AgentMdError("agent.md must start with YAML front matter ('---' on the first line)",
                           field="front_matter")
    end = next((i for i in range(1, len(lines)) if lines[i].strip() == "---"), None)
    if end is None:
        raise AgentMdError("the front matter is not closed by a '---' line", field="front_matter")
    text = "\n".join(lines[1:end])
    try:
        if any(isinstance(t, (yaml.AnchorToken, yaml.AliasToken, yaml.TagToken)) for t in yaml.scan(text)):
            raise AgentMdError("YAML tags, anchors and aliases are not allowed in the front matter",
                               field="front_matter")
        front = yaml.load(text, Loader=_StrictLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as exc:
        raise AgentMdError(f"the front matter is not valid YAML: {' '.join(str(exc).split())[:200]}",
                           field="front_matter") from None
    except AgentMdError:
        raise
    except RecursionError:
        raise AgentMdError("the front matter is nested too deeply", field="front_matter") from None
    except (ValueError, OverflowError) as exc:  # a scalar YAML cannot build, e.g. the date 2001-13-01
        raise AgentMdError(f"the front matter holds a value YAML cannot read: {str(exc)[:100]}",
                           field="front_matter") from None
    if front is None:
        front = {}
    if not isinstance(front, dict):
        raise AgentMdError("the front matter must be a mapping of names to values", field="front_matter")
    return front


def _verify(payload: str, fields: dict[str, str], *, aid: str, cert: x509.Certificate, now: float) -> None:
    public_key = cert.public_key()
    if not isinstance(public_key, ec.EllipticCurvePublicKey) or not isinstance(public_key.curve, ec.SECP256R1):
        raise AgentMdError("agent.md must be signed with an ECDSA P-256 key", field="signature")
    if pki.cert_aid(cert).lower() != aid.strip().lower():
        raise AgentMdError(f"the certificate is not {aid}'s", field="signature")
    if fields["cert_fingerprint"] != pki.cert_fingerprint(cert):
        raise AgentMdError(f"cert_fingerprint does not name {aid}'s current certificate",
                           field="signature.cert_fingerprint")
    if "public_key_fingerprint" in fields and fields["public_key_fingerprint"] != pki.spki_fingerprint(public_key):
        raise AgentMdError(f"public_key_fingerprint does not name {aid}'s key", field="signature.public_key_fingerprint")
    stamp = int(fields["timestamp"])
    not_before, not_after = cert.not_valid_before_utc.timestamp(), cert.not_valid_after_utc.timestamp()
    if stamp > now + MAX_FUTURE_SECONDS:
        raise AgentMdError("the signature timestamp is in the future", field="signature.timestamp")
    if not not_before <= now <= not_after:
        raise AgentMdError(f"{aid}'s certificate is expired or not yet valid", field="signature")
    if not not_before <= stamp <= not_after:
        raise AgentMdError("the signature timestamp lies outside the certificate's validity",
                           field="signature.timestamp")
    if not pki.verify_signature(public_key, base64.b64decode(fields["signature"]), payload.encode("utf-8")):
        raise AgentMdError(f"the signature does not verify with {aid}'s key (was the document changed "
                           "after signing?)", field="signature.signature")

