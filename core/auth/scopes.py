"""SMART on FHIR system scopes: parsing them and deciding whether they cover a request.

fhirq serves systems (backend services, ETL jobs), not patients or users in a launch context,
so only `system/` scopes grant anything. Both spellings are understood:

    system/Patient.read   system/*.write   system/*.*        (SMART v1)
    system/Patient.rs     system/*.cud     system/*.cruds    (SMART v2 letters)

A request needs a set of v2 letters on a resource type (`*` = every type): c create,
r read / vread, u update / patch, d delete, s search / history. v1 `read` grants `rs`, `write`
grants `cud`, `*` grants all five. `patient/` and `user/` scopes, v2 scopes narrowed by a query
(`system/Observation.rs?category=laboratory`) and non-resource scopes (`openid`) grant nothing:
fhirq cannot enforce what they restrict, so it does not pretend to.

One scope is not about resources: `system/metrics.read` lets a scraper read `/metrics`, which
counts the jobs of every owner. No resource scope implies it (`system/*.*` included), and it
grants nothing else.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

__all__ = [
    "ALL",
    "METRICS",
    "READ",
    "WRITE",
    "Grant",
    "Requirement",
    "allows",
    "grants_metrics",
    "is_known_scope",
    "parse_scope",
    "parse_scopes",
    "scope_hint",
    "v1_scopes",
]

LETTERS = "cruds"
ALL = frozenset(LETTERS)
READ = frozenset("rs")
WRITE = frozenset("cud")
METRICS = "system/metrics.read"
_V1 = {"read": READ, "write": WRITE, "*": ALL}
_SCOPE = re.compile(r"system/(?P<type>\*|[A-Z][A-Za-z]*)\.(?P<access>read|write|\*|[cruds]+)")


@dataclass(frozen=True)
class Grant:
    """What one scope allows: `letters` on `resource_type` (`*`: on every type)."""

    resource_type: str
    letters: frozenset[str]


@dataclass(frozen=True)
class Requirement:
    """What one request needs: every letter of `letters` on `resource_type` (`*`: every type)."""

    resource_type: str
    letters: frozenset[str]

    @classmethod
    def of(cls, resource_type: str, letters: str) -> Requirement:
        return cls(resource_type, frozenset(letters))


def _in_order(access: str) -> bool:
    """SMART v2 letters appear at most once each, in the order c r u d s."""
    positions = [LETTERS.find(ch) for ch in access]
    return all(a < b for a, b in zip(positions, positions[1:], strict=False))


def parse_scope(scope: str) -> Grant | None:
    """The grant of one scope string, or None when it grants nothing here."""
    m = _SCOPE.fullmatch(scope.strip())
    if m is None:
        return None
    access = m["access"]
    letters = _V1.get(access)
    if letters is None:
        if not _in_order(access):
            return None
        letters = frozenset(access)
    return Grant(m["type"], letters)


def parse_scopes(scopes: Iterable[str]) -> tuple[Grant, ...]:
    return tuple(g for g in map(parse_scope, scopes) if g is not None)


def grants_metrics(scopes: Iterable[str]) -> bool:
    """True when `scopes` hold the scrape scope."""
    return any(s.strip() == METRICS for s in scopes)


def is_known_scope(scope: str) -> bool:
    """True for a scope that grants something here (a resource scope or the scrape scope)."""
    return scope.strip() == METRICS or parse_scope(scope) is not None


def allows(grants: Iterable[Grant], need: Requirement) -> bool:
    """True when the grants together give every needed letter on the needed type. A need on
    `*` (bundles, jobs: any type may be touched) is met only by grants on `*`."""
    have: set[str] = set()
    for g in grants:
        if g.resource_type == "*" or g.resource_type == need.resource_type:
            have |= g.letters
    return need.letters <= have


def v1_scopes(need: Requirement) -> list[str]:
    """SMART v1 scopes that together meet `need`: `["system/*.write"]`."""
    rtype = need.resource_type
    words = [w for w, letters in (("read", READ), ("write", WRITE)) if need.letters & letters]
    return [f"system/{rtype}.{w}" for w in words]


def scope_hint(need: Requirement) -> str:
    """The scopes to ask for, in words: `system/*.write (SMART v2: system/*.cud)`."""
    v2 = "".join(ch for ch in LETTERS if ch in need.letters)
    return f"{' and '.join(v1_scopes(need))} (SMART v2: system/{need.resource_type}.{v2})"
