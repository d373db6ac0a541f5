"""Broker layer: who may use which AID, decided from the peer's ``SO_PEERCRED`` uid/gid and its
supplementary groups (``SO_PEERGROUPS``). Pure (the stdlib only; ``pwd``/``grp`` are consulted
once, when a rule names a user or group).

Configuration shape (the ``[policy]`` table of the config file, or a dict)::

    {"alice.aid.test": {"uids": [1000]},
     "*.bots.aid.test": {"uids": ["botrunner"], "gids": ["aund-apps", 1002]}}

Keys are exact AIDs or ``fnmatch`` globs (``*`` also matches dots), lower-cased like AIDs: they
are matched against the normalised (lower-case) AID, which the caller passes. Every rule whose key
matches an AID grants its ``uids`` and ``gids``; a ``gids`` entry matches the peer's primary gid or
any of its supplementary groups. Rules only ever grant (their order does not matter). The
*owners* (by default the daemon's own uid and root) may use every AID and see everything in
``status``.
"""
from __future__ import annotations

import fnmatch
import grp
import os
import pwd
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Rule:
    pattern: str
    uids: frozenset[int]
    gids: frozenset[int]

    def matches(self, aid: str) -> bool:
        return self.pattern == aid or fnmatch.fnmatchcase(aid, self.pattern)


def _ids(values: Any, field: str, pattern: str, lookup) -> frozenset[int]:
    if values is None:
        return frozenset()
    if isinstance(values, (str, int)) or not isinstance(values, Iterable):
        raise ValueError(f"policy rule {pattern!r}: {field!r} must be a list of ids or names")
    out = set()
    for value in values:
        if isinstance(value, bool):
            raise ValueError(f"policy rule {pattern!r}: bad {field} entry {value!r}")
        if isinstance(value, int):
            if value < 0:
                raise ValueError(f"policy rule {pattern!r}: bad {field} entry {value!r}")
            out.add(value)
        elif isinstance(value, str):
            try:
                out.add(lookup(value))
            except KeyError:
                raise ValueError(f"policy rule {pattern!r}: unknown {field[:-1]} name {value!r}") from None
        else:
            raise ValueError(f"policy rule {pattern!r}: bad {field} entry {value!r}")
    return frozenset(out)


class Policy:
    """Decides ``allows(uid, gid, aid)``; immutable once built.

    ``rules``: the configuration mapping above (None: no rules). ``owners``: uids that may use
    every AID (default: the daemon's own effective uid and root).

    Errors (constructor): ``ValueError`` naming the rule for a malformed entry or an unknown
    user/group name.
    """

    def __init__(self, rules: Mapping[str, Mapping[str, Any]] | None = None, *,
                 owners: Iterable[int] | None = None) -> None:
        self.owners = frozenset({os.geteuid(), 0} if owners is None else owners)
        parsed = []
        for pattern, spec in (rules or {}).items():
            if not isinstance(pattern, str) or not pattern:
                raise ValueError(f"policy key must be an AID or glob, got {pattern!r}")
            if not isinstance(spec, Mapping):
                raise ValueError(f"policy rule {pattern!r} must be a table with uids/gids")
            unknown = set(spec) - {"uids", "gids"}
            if unknown:
                raise ValueError(f"policy rule {pattern!r}: unknown keys {sorted(unknown)}")
            parsed.append(Rule(pattern.lower(), _ids(spec.get("uids"), "uids", pattern, lambda n: pwd.getpwnam(n).pw_uid),
                               _ids(spec.get("gids"), "gids", pattern, lambda n: grp.getgrnam(n).gr_gid)))
        self.rules: tuple[Rule, ...] = tuple(parsed)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Policy):
            return NotImplemented
        return self.owners == other.owners and set(self.rules) == set(other.rules)

    __hash__ = None  # type: ignore[assignment]

    @classmethod
    def from_config(cls, mapping: Mapping[str, Mapping[str, Any]] | None, **kw: Any) -> "Policy":
        """Same as the constructor; reads as what it is at the call site."""
        return cls(mapping, **kw)

    def allows(self, uid: int, gid: int, aid: str, groups: Iterable[int] = ()) -> bool:
        """May a peer with this uid, primary gid and supplementary ``groups`` act as ``aid`` (the
        normalised AID)? Owners always may."""
        if uid in self.owners:
            return True
        gids = {gid, *groups}
        return any((uid in r.uids or not r.gids.isdisjoint(gids)) and r.matches(aid) for r in self.rules)

    def admits(self, uid: int, gid: int, groups: Iterable[int] = ()) -> bool:
        """May this peer connect at all (it is an owner or some rule names its uid or one of its
        groups)?"""
        gids = {gid, *groups}
        return uid in self.owners or any(uid in r.uids or not r.gids.isdisjoint(gids) for r in self.rules)

    def sees_all(self, uid: int) -> bool:
        """Does this uid see every AID and app in ``status`` (the owners do)?"""
        return uid in self.owners

    def __repr__(self) -> str:
        return f"<Policy owners={sorted(self.owners)} rules={len(self.rules)}>"
