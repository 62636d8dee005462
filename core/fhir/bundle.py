"""The Bundle envelope and the batch-upsert array: checks before any entry is looked at."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from core.errors import BadRequest, FhirError, TooLarge
from core.fhir.references import text_may_reference
from core.fhir.strings import check_json_text, plain_json_text
from core.fhir.validation import is_valid_id, known_resource_type

__all__ = [
    "NOT_SCREENED",
    "Screening",
    "check_bundle",
    "check_entry",
    "screen_entries",
    "upsert_entry",
    "upsert_outcome",
]


@dataclass(frozen=True, slots=True)
class Screening:
    """What the entries' JSON text showed before it was decoded, by entry index, so that no
    stage serialises an entry again to look for the same bytes: `plain` entries hold no
    control character (`check_entry` skips that walk), `unreferenced` ones no `reference` key
    (a batch write is not scanned for references)."""

    plain: frozenset[int] = frozenset()
    unreferenced: frozenset[int] = frozenset()


NOT_SCREENED = Screening()


def screen_entries(texts: Iterable[tuple[int, str | None]]) -> Screening:
    """The screening of (index, entry JSON text) pairs: substring tests on the text a job
    holds, in C, instead of a serialisation of each decoded entry."""
    plain: list[int] = []
    unreferenced: list[int] = []
    for index, raw in texts:
        if raw is None:
            continue
        if plain_json_text(raw):
            plain.append(index)
        if not text_may_reference(raw):
            unreferenced.append(index)
    return Screening(frozenset(plain), frozenset(unreferenced))

BUNDLE_KINDS = ("batch", "transaction")


def check_bundle(body: Any, *, max_entries: int | None = None) -> tuple[str, list[Any]]:
    """Return (type, entries) of a batch/transaction Bundle, or raise a 400 saying where."""
    if not isinstance(body, dict):
        raise BadRequest("The body must be a JSON object (a Bundle)", expression="Bundle")
    if body.get("resourceType") != "Bundle":
        raise BadRequest(
            f"Expected a Bundle, got resourceType '{body.get('resourceType')}'",
            expression="Bundle.resourceType",
        )
    kind = body.get("type")
    if kind not in BUNDLE_KINDS:
        raise BadRequest(
            f"Bundle.type must be 'batch' or 'transaction', not '{kind}'",
            expression="Bundle.type",
            code="value",
        )
    entries = body.get("entry", [])
    if not isinstance(entries, list):
        raise BadRequest("Bundle.entry must be an array", expression="Bundle.entry")
    if max_entries is not None and len(entries) > max_entries:
        raise TooLarge(
            f"This bundle has {len(entries)} entries; synchronous processing takes at most "
            f"{max_entries}. Send it again with the header 'Prefer: respond-async' to run it "
            "as a job.",
            expression="Bundle.entry",
        )
    return kind, entries


# Bundle.entry.request's elements and their JSON types (bundle.html#resource): all strings.
_REQUEST_STRINGS = ("method", "url", "ifNoneMatch", "ifModifiedSince", "ifMatch", "ifNoneExist")


def check_entry(entry: Any, expr: str, *, plain: bool = False) -> None:
    """The JSON shape of one Bundle.entry (object members of the right JSON type) and the FHIR
    character rule over all of it (unless its text was found `plain` already); 400 at the
    element, e.g. `Bundle.entry[2].request.method`."""
    if not isinstance(entry, dict):
        raise BadRequest("Bundle entry must be an object", expression=expr, code="structure")
    for name, kind, what in (
        ("fullUrl", str, "a string"),
        ("resource", dict, "a resource (JSON object)"),
        ("request", dict, "an object"),
    ):
        value = entry.get(name)
        if value is not None and not isinstance(value, kind):
            raise BadRequest(
                f"{name} must be {what}", expression=f"{expr}.{name}", code="structure"
            )
    request = entry.get("request")
    for name in _REQUEST_STRINGS if request else ():
        value = request.get(name)
        if value is not None and not isinstance(value, str):
            raise BadRequest(
                f"request.{name} must be a string",
                expression=f"{expr}.request.{name}",
                code="structure",
            )
    if not plain:
        check_json_text(entry, expr)


def upsert_entry(element: Any, index: int) -> dict[str, Any]:
    """One element of a batch-upsert array → the PUT batch entry that creates-or-updates it.

    Raises FhirError (index set, expression `[i].field`) for an element that can't be upserted.
    """
    try:
        if not isinstance(element, dict):
            raise BadRequest("Each element must be a resource object", expression=f"[{index}]")
        rtype, rid = element.get("resourceType"), element.get("id")
        if not isinstance(rtype, str) or not known_resource_type(rtype):
            raise BadRequest(
                f"Unknown or missing resourceType '{rtype}'",
                expression=f"[{index}].resourceType",
                code="required" if rtype is None else "value",
            )
        if not isinstance(rid, str) or not is_valid_id(rid):
            raise BadRequest(
                "Batch upsert needs a valid id on every resource "
                "(FHIR id: 1-64 of A-Z a-z 0-9 - .)",
                expression=f"[{index}].id",
                code="required" if rid is None else "value",
            )
    except FhirError as err:
        err.index = index
        raise
    return {"resource": element, "request": {"method": "PUT", "url": f"{rtype}/{rid}"}}


def upsert_outcome(body: dict[str, Any], index: int) -> dict[str, Any]:
    """An upsert element is `[i]`, not `Bundle.entry[i].resource`: say so in expressions."""
    for issue in body.get("issue", []):
        if "expression" in issue:
            issue["expression"] = [
                e.replace(f"Bundle.entry[{index}].resource", f"[{index}]")
                .replace(f"Bundle.entry[{index}]", f"[{index}]")
                for e in issue["expression"]
            ]
    return body
