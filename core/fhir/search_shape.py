"""Subsets of the matches a search returns: `_elements` and `_summary=true|text|data`.

search.html: a subset keeps `id`, `meta` and the resource's mandatory elements (min >= 1 in
its definition, from the generated R4 tables) besides what was asked, and is marked by the
`SUBSETTED` tag in `meta.tag` so no one takes it for the whole resource. A primitive's `_name`
companion (its id and extensions) travels with it; a choice element `value[x]` is asked for as
`value` and keeps whichever `valueX` the resource has. `_summary=true` keeps the elements the
definition marks `isSummary` (core.fhir.r4.summary_elements).
"""

from __future__ import annotations

from functools import cache
from typing import Any

from core.fhir import r4

__all__ = ["SUBSETTED", "subset"]

SUBSETTED = {
    "system": "http://terminology.hl7.org/CodeSystem/v3-ObservationValue",
    "code": "SUBSETTED",
    "display": "subsetted",
}
_ALWAYS = ("resourceType", "id", "meta")


@cache
def _elements_of(resource_type: str) -> tuple[frozenset[str], frozenset[str], frozenset[str]]:
    """(required plain names, required choice names, every choice name) of the type's
    top-level elements; choice names without their `[x]`."""
    definition = r4.types().get(resource_type) or {}
    names: set[str] = set()
    required_choices: set[str] = set()
    choices: set[str] = set()
    for row in definition.get("elements", ()):
        name, minimum = row[0], row[1]
        if name.endswith("[x]"):
            choices.add(name[:-3])
            if minimum >= 1:
                required_choices.add(name[:-3])
        elif minimum >= 1:
            names.add(name)
    return frozenset(names), frozenset(required_choices), frozenset(choices)


def _choice_of(key: str, prefixes: frozenset[str]) -> bool:
    return any(key.startswith(p) and key[len(p) : len(p) + 1].isupper() for p in prefixes)


def subset(resource: dict[str, Any], *, elements: list[str] | None,
           summary: str | None) -> dict[str, Any]:
    """`resource` cut to what `_elements` / `_summary` keep (a new dict), tagged SUBSETTED;
    `resource` itself when neither asks for a subset."""
    if summary == "data":
        out = {k: v for k, v in resource.items() if k not in ("text", "_text")}
    elif summary in ("text", "true") or elements is not None:
        rtype = resource.get("resourceType", "")
        names, required_choices, choices = _elements_of(rtype)
        wanted = frozenset(elements or ())
        if summary == "text":
            wanted |= {"text"}
        elif summary == "true":
            wanted |= {n.removesuffix("[x]") for n in r4.summary_elements().get(rtype, ())}
        keep = names | wanted | frozenset(_ALWAYS)
        choose = required_choices | (wanted & choices)

        def kept(key: str) -> bool:
            bare = key[1:] if key.startswith("_") else key
            return bare in keep or _choice_of(bare, choose)

        out = {k: v for k, v in resource.items() if kept(k)}
    else:
        return resource
    meta = dict(out.get("meta") or {})
    meta["tag"] = [*(meta.get("tag") or ()), SUBSETTED]
    out["meta"] = meta
    return out
