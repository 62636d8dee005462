"""Authorization inside the engine: what a planned entry does must be allowed by the caller's
`Permissions` (core.auth.permissions), whatever route brought it in.

An entry needs the letters its REST call would need on its type (read / vread / instance
history `r`, search / type history `s`, create `c`, update `cu` — it may create —, patch `u`,
delete `d`), and `s` on the type its condition searches (`ifNoneExist`, a conditional
update / patch / delete). Conditional references inside resources are searches too; they are
checked where they are found (`core.fhir.execution`). Each distinct (type, letter) of a chunk is
asked once; entries are looked at one by one only when something is refused.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

from core.auth.permissions import Permissions, denial
from core.errors import Forbidden
from core.fhir.planning import PlannedEntry

__all__ = ["refused"]

_LETTERS = {"read": "r", "vread": "r", "history": "s", "search": "s", "create": "c",
            "update": "cu", "patch": "u", "delete": "d"}
_VERBS = {"c": "creates", "r": "reads", "u": "updates", "d": "deletes", "s": "searches"}


def _needs(e: PlannedEntry) -> Iterator[tuple[str, str, str, str]]:
    """(type, letter, expression, what) for everything entry `e` does."""
    # The history of one resource is a read of it; of a whole type, a search.
    letters = "r" if e.kind == "history" and e.id is not None else _LETTERS[e.kind]
    for letter in letters:
        yield e.resource_type, letter, f"{e.expr}.request.url", (
            f"This entry {_VERBS[letter]} {e.resource_type}"
        )
    if e.condition is not None:
        rtype = e.condition.resource_type
        yield rtype, "s", e.condition_at, f"The condition of this entry searches {rtype}"


def refused(entries: Sequence[PlannedEntry], permissions: Permissions) -> dict[int, Forbidden]:
    """Entry index → the 403 of each entry that does something `permissions` do not allow."""
    if permissions.unrestricted:
        return {}
    wanted = {(t, letter) for e in entries for t, letter, _, _ in _needs(e)}
    denied = {need for need in wanted if not permissions.allows(*need)}
    if not denied:
        return {}
    out: dict[int, Forbidden] = {}
    for e in entries:
        for t, letter, where, what in _needs(e):
            if (t, letter) in denied:
                out[e.index] = Forbidden(denial(t, letter, what), expression=where,
                                         index=e.index)
                break
    return out
