"""What a caller may do, as the FHIR engine sees it: SMART v2 letters per resource type.

`Permissions` is built once per request (or per job chunk) from the caller's scopes and handed
to the engine in its `Context`; the engine asks it about every interaction and every search it
runs for that caller (conditions, conditional references, search entries). It is pure data: no
Flask, no database. `UNRESTRICTED` is what callers without authentication (`FHIRQ_AUTH=off`)
and the server's own in-process work hold.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from core.auth.scopes import ALL, Requirement, parse_scopes, scope_hint

__all__ = ["UNRESTRICTED", "Permissions", "denial"]

_NONE: frozenset[str] = frozenset()


@dataclass(frozen=True, slots=True)
class Permissions:
    """Letters (c r u d s) granted on every type (`on_any`) and on named types (`by_type`)."""

    on_any: frozenset[str] = _NONE
    by_type: Mapping[str, frozenset[str]] = field(
        default_factory=lambda: MappingProxyType({})
    )

    @classmethod
    def of(cls, scopes: Iterable[str]) -> Permissions:
        """The permissions of a token's scopes (strings that grant nothing are ignored)."""
        on_any: set[str] = set()
        by_type: dict[str, set[str]] = {}
        for grant in parse_scopes(scopes):
            if grant.resource_type == "*":
                on_any |= grant.letters
            else:
                by_type.setdefault(grant.resource_type, set()).update(grant.letters)
        return cls(
            frozenset(on_any),
            MappingProxyType({t: frozenset(ls) for t, ls in by_type.items()}),
        )

    def allows(self, resource_type: str, letter: str) -> bool:
        """True when `letter` is granted on `resource_type`."""
        return letter in self.on_any or letter in self.by_type.get(resource_type, _NONE)

    @property
    def unrestricted(self) -> bool:
        return self.on_any >= ALL


UNRESTRICTED = Permissions(ALL)


def denial(resource_type: str, letter: str, what: str) -> str:
    """The diagnostics of a refusal: what was asked, and the scope it needs."""
    return (
        f"{what}: that needs {scope_hint(Requirement.of(resource_type, letter))}, "
        "which the token's scopes do not grant"
    )
