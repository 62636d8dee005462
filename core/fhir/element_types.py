"""Where the links of a resource can sit: for each resource type, a compact tree of the JSON
paths whose FHIR type is `Reference.reference` or uri / url / canonical / oid / uuid.

Derived once per type from the R4 definitions that validation already reads (the generated
tables of `core.fhir.r4`, through `core.fhir.validation.model_elements`), so nested datatypes,
backbone elements, choice elements (`valueUri`, `valueReference`), extensions on elements and
on primitives (`_birthDate`) and contained resources are all covered, and a plain string
(`identifier.value`) never is.

A tree is a dict from JSON name to what sits there: `REFERENCE` (a Reference's `reference`),
`LINK` (a uri-like primitive), `RESOURCE` (any resource: `contained`, `Bundle.entry.resource`,
`Parameters.parameter.resource`; look its type up again) or the tree of a complex element.
Recursive types (Extension inside Extension, Identifier.assigner → Reference → Identifier)
share one dict, so the trees are graphs and stay small: one dict per datatype or backbone
element, a few hundred in all.
"""

from __future__ import annotations

import threading
from functools import cache
from typing import Union

from core.fhir.validation import Model, is_resource_model, model_elements, resource_model

__all__ = ["LINK", "LINK_TYPES", "REFERENCE", "RESOURCE", "Links", "resource_links"]

REFERENCE = "Reference.reference"
LINK = "uri"
RESOURCE = "Resource"
# FHIR primitives whose values are links (datatypes.html): a bundle's fullUrls are rewritten
# in these, as in Reference.reference (http.html#trules).
LINK_TYPES = frozenset({"uri", "url", "canonical", "oid", "uuid"})

Links = dict[str, Union[str, "Links"]]


@cache
def resource_links(resource_type: str) -> Links | None:
    """The link tree of `resource_type`; None for unknown (and R4B-only) types."""
    model = resource_model(resource_type)
    if model is None:
        return None
    with _BUILDING:  # a tree is shared only once it is complete
        done: dict[Model, Links] = {}
        tree = _model_links(model, done)
        for part, links in done.items():
            if not is_resource_model(part):  # datatypes and backbone elements
                _SHARED.setdefault(part, links)
    return tree


def _model_links(model: Model, done: dict[Model, Links]) -> Links:
    found = done.get(model)  # may still be empty: it is being built further up
    if found is None:
        found = _SHARED.get(model)
    if found is not None:
        return found
    out: Links = {}
    done[model] = out  # before recursing: recursive types point back at this dict
    is_reference = model == "Reference"
    for e in model_elements(model):
        if e.any_resource:
            out[e.key] = RESOURCE
        elif e.model is not None:
            out[e.key] = _model_links(e.model, done)
        elif e.primitive in LINK_TYPES:
            out[e.key] = LINK
        elif is_reference and e.key == "reference":  # a string by type, a link by meaning
            out[e.key] = REFERENCE
    return out


# One tree per datatype and backbone element, for every resource type that uses it.
_SHARED: dict[Model, Links] = {}
_BUILDING = threading.Lock()

