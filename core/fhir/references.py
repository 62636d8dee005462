"""References inside resources: placeholder (`urn:uuid:` / `urn:oid:`) and fullUrl rewriting,
conditional references (`Patient?identifier=s|v`) and the literal references a write points to.

Links are found by FHIR type, not by the shape of the text: only `Reference.reference` and
elements of type uri, url, canonical, oid or uuid are links (http.html#trules), found along
the typed paths of `core.fhir.element_types`. A `urn:uuid:` in a string element such as
`Identifier.value` keeps its text; an absolute fullUrl in `Attachment.url` is rewritten.

Each write is walked once by `scan_references` (its references and uri values, no copies);
`rewrite_references` walks again only when one of those values is in the mapping, and copies
only the dicts and lists on the way to a changed value, so the caller's resource is never
modified. Conditional references are links of `Reference.reference` only.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import orjson

from core.errors import BadRequest
from core.fhir.element_types import LINK, REFERENCE, Links, resource_links
from core.fhir.validation import fhirpath_at

__all__ = [
    "ReferenceScan",
    "is_placeholder",
    "is_conditional_reference",
    "scan_references",
    "rewrite_references",
    "reference_expressions",
    "literal_target",
    "text_may_reference",
]

_LITERAL = re.compile(
    r"^([A-Z][A-Za-z]+)/([A-Za-z0-9\-.]{1,64})(?:/_history/[A-Za-z0-9\-.]{1,64})?$"
)


def is_placeholder(value: str) -> bool:
    return value.startswith(("urn:uuid:", "urn:oid:"))


def is_conditional_reference(value: str) -> bool:
    head, sep, _ = value.partition("?")
    return bool(sep) and "/" not in head and head[:1].isupper()


def literal_target(reference: str) -> tuple[str, str] | None:
    """`Patient/1` (or `Patient/1/_history/2`) → ("Patient", "1"); anything else → None."""
    m = _LITERAL.match(reference)
    return (m.group(1), m.group(2)) if m else None


@dataclass(slots=True)
class ReferenceScan:
    """A resource, every `Reference.reference` value in it (document order) and every value
    of its uri / url / canonical / oid / uuid elements."""

    resource: dict[str, Any]
    references: list[str]
    links: list[str]


def scan_references(resource: dict[str, Any], *, expression: str = "",
                    uris: bool = True, may_reference: bool = True) -> ReferenceScan:
    """The links of `resource`, found along its type's link tree (`expression`: where the
    resource sits, for the error of a resource too deep to walk). With `uris=False` (a batch:
    no placeholders to rewrite in uri elements) only `Reference.reference` values matter, and a
    resource whose JSON has no `"reference"` key at all is not walked (`may_reference=False`:
    the caller found none in its text already)."""
    refs: list[str] = []
    links: list[str] = []
    if not uris and not (may_reference and _may_reference(resource)):
        return ReferenceScan(resource, refs, links)
    try:
        _collect_resource(resource, refs, links)
    except RecursionError as exc:  # deeper than any limit of ours lets through
        raise BadRequest(
            "The resource is nested too deeply to be processed",
            expression=expression or None,
            code="too-costly",
        ) from exc
    return ReferenceScan(resource, refs, links)


def rewrite_references(scan: ReferenceScan, mapping: Mapping[str, str]) -> dict[str, Any] | None:
    """The resource with every link in `mapping` replaced: a `Reference.reference` by any
    entry, a uri-typed element by any entry but a conditional reference. None when nothing
    changes."""
    if not mapping:
        return None
    if not any(r in mapping for r in scan.references) and not any(
        u in mapping and not is_conditional_reference(u) for u in scan.links
    ):
        return None
    return _rewrite_resource(scan.resource, mapping)


def reference_expressions(resource: dict[str, Any], value: str, *, root: str) -> list[str]:
    """FHIRPaths of the `Reference.reference` elements of `resource` holding `value`, built on
    `root` (where the resource sits, e.g. `Bundle.entry[2].resource`); [root] if none does.
    For error messages only: it walks the resource keeping paths."""
    found: list[tuple[Any, ...]] = []
    _locate(resource, resource_links(str(resource.get("resourceType"))), value, (), found)
    return [fhirpath_at(root, resource, loc) for loc in found] or [root]


def text_may_reference(raw: str) -> bool:
    """False only when JSON text `raw` has no `reference` key: without a `\\u` escape
    (the only one that can spell a letter) a key is written as its letters, so its absence
    from the text is its absence from the value."""
    return '"reference"' in raw or "\\u" in raw


def _may_reference(resource: dict[str, Any]) -> bool:
    """False only when no `reference` key is anywhere in the resource: serializing it (in C)
    costs a fraction of the typed walk, which most resources of a load (Patients) do not need."""
    try:
        return b'"reference"' in orjson.dumps(resource)
    except (TypeError, orjson.JSONEncodeError):  # what orjson cannot write: walk it
        return True


# --------------------------------------------------------------------------- typed walks


def _collect_resource(resource: dict[str, Any], refs: list[str], links: list[str]) -> None:
    tree = resource_links(str(resource.get("resourceType")))
    if tree is None:
        _collect_untyped(resource, refs)
    else:
        _collect(resource, tree, refs, links)


def _collect(node: dict[str, Any], tree: Links, refs: list[str], links: list[str]) -> None:
    for key, value in node.items():
        kind = tree.get(key)
        if kind is None:
            continue
        if type(kind) is dict:
            if type(value) is dict:
                _collect(value, kind, refs, links)
            elif type(value) is list:
                for item in value:
                    if type(item) is dict:
                        _collect(item, kind, refs, links)
        elif kind is REFERENCE:
            if type(value) is str:
                refs.append(value)
        elif kind is LINK:
            if type(value) is str:
                links.append(value)
            elif type(value) is list:  # e.g. Meta.profile, instantiatesUri
                links.extend(v for v in value if type(v) is str)
        else:  # RESOURCE: a contained (or bundled) resource has the tree of its own type
            for item in value if type(value) is list else (value,):
                if type(item) is dict:
                    _collect_resource(item, refs, links)


def _collect_untyped(node: Any, refs: list[str]) -> None:
    """A type without an R4 definition: any `reference` string is taken as a Reference's
    (its uri elements are not known, so none is rewritten)."""
    if type(node) is dict:
        if type(node.get("resourceType")) is str and resource_links(node["resourceType"]):
            _collect_resource(node, refs, [])
            return
        for key, value in node.items():
            if key == "reference" and type(value) is str:
                refs.append(value)
            else:
                _collect_untyped(value, refs)
    elif type(node) is list:
        for item in node:
            _collect_untyped(item, refs)


def _rewrite_resource(
    resource: dict[str, Any], mapping: Mapping[str, str]
) -> dict[str, Any] | None:
    tree = resource_links(str(resource.get("resourceType")))
    if tree is None:
        return _rewrite_untyped(resource, mapping)
    return _rewrite(resource, tree, mapping)


def _rewrite(
    node: dict[str, Any], tree: Links, mapping: Mapping[str, str]
) -> dict[str, Any] | None:
    out: dict[str, Any] | None = None
    for key, value in node.items():
        kind = tree.get(key)
        if kind is None:
            continue
        if type(value) is list:
            new: Any = None
            for i, item in enumerate(value):
                changed = _rewrite_value(item, kind, mapping)
                if changed is not None:
                    if new is None:
                        new = list(value)
                    new[i] = changed
        else:
            new = _rewrite_value(value, kind, mapping)
        if new is not None:
            if out is None:
                out = dict(node)
            out[key] = new
    return out


def _rewrite_value(value: Any, kind: str | Links, mapping: Mapping[str, str]) -> Any:
    if type(kind) is dict:
        return _rewrite(value, kind, mapping) if type(value) is dict else None
    if type(value) is str:
        if kind is REFERENCE:
            return mapping.get(value)
        if kind is LINK and not is_conditional_reference(value):
            return mapping.get(value)
        return None
    if kind is not REFERENCE and kind is not LINK and type(value) is dict:  # RESOURCE
        return _rewrite_resource(value, mapping)
    return None


def _rewrite_untyped(node: Any, mapping: Mapping[str, str]) -> Any:
    if type(node) is dict:
        if type(node.get("resourceType")) is str and resource_links(node["resourceType"]):
            return _rewrite_resource(node, mapping)
        out: dict[str, Any] | None = None
        for key, value in node.items():
            if key == "reference" and type(value) is str:
                new = mapping.get(value)
            else:
                new = _rewrite_untyped(value, mapping)
            if new is not None:
                if out is None:
                    out = dict(node)
                out[key] = new
        return out
    if type(node) is list:
        copy: list[Any] | None = None
        for i, item in enumerate(node):
            new = _rewrite_untyped(item, mapping)
            if new is not None:
                if copy is None:
                    copy = list(node)
                copy[i] = new
        return copy
    return None


def _locate(
    node: Any, tree: Links | None, value: str, path: tuple[Any, ...], found: list[tuple[Any, ...]]
) -> None:
    if type(node) is list:
        for i, item in enumerate(node):
            _locate(item, tree, value, (*path, i), found)
        return
    if type(node) is not dict:
        return
    if tree is None and path and type(node.get("resourceType")) is str:
        tree = resource_links(node["resourceType"])  # a contained resource
    for key, child in node.items():
        kind: Any = tree.get(key) if tree is not None else None
        if (kind is REFERENCE or tree is None) and key == "reference" and child == value:
            found.append((*path, key))
        elif tree is None or type(kind) is dict:
            _locate(child, kind, value, (*path, key), found)
        elif kind is not None and kind is not REFERENCE and kind is not LINK:  # RESOURCE
            _locate(child, None, value, (*path, key), found)
