"""AUN identifiers, defined once: AIDs, device ids, slot ids and the slot isolation key.

An AID is `{name}.{issuer}`, compared lower-case: name 4-64 of [a-z0-9_-], not starting with `-`
or `guest`; issuer a domain name (labels of [a-z0-9-], at least one dot). Pure; no I/O.
"""
from __future__ import annotations

import re
from typing import Any

AID_NAME_RE = re.compile(r"^[a-z0-9_][a-z0-9_-]{3,63}$")
ISSUER_RE = re.compile(r"^(?=.{3,253}$)[a-z0-9](?:[a-z0-9-]{0,62}[a-z0-9])?(?:\.[a-z0-9](?:[a-z0-9-]{0,62}[a-z0-9])?)+$")
DEVICE_RE = re.compile(r"^[A-Za-z0-9._-]{1,128}$")
SLOT_RE = re.compile(r"^[A-Za-z0-9._-][A-Za-z0-9._/ :-]{0,127}$")


def aid_problem(value: Any) -> str | None:
    """Why `value` is not an AID (None when it is one, after lower-casing and stripping)."""
    if not isinstance(value, str) or not value.strip():
        return "an AID must be a non-empty string"
    name, dot, issuer = value.strip().lower().partition(".")
    if not dot:
        return f"{value!r} is not of the form name.issuer"
    if not AID_NAME_RE.match(name):
        return f"{value!r}: the name must be 4-64 of a-z, 0-9, _ and -, not starting with -"
    if name.startswith("guest"):
        return f"{value!r}: names starting with 'guest' are reserved"
    if not ISSUER_RE.match(issuer):
        return f"{value!r}: the issuer must be a domain name"
    return None


def normalize_aid(value: Any) -> str:
    """The canonical (lower-case, stripped) AID; raises ValueError with the reason."""
    problem = aid_problem(value)
    if problem is not None:
        raise ValueError(problem)
    return value.strip().lower()


def slot_isolation_key(slot_id: str) -> str:
    """Slots share a gateway isolation slot up to the first `/`, `:` or space (`svc/a` ~ `svc:b`)."""
    return re.split(r"[/: ]", slot_id, maxsplit=1)[0]
