"""The FHIR character rule for everything a client sends as text.

FHIR strings may not hold characters below U+0020 other than tab, CR and LF (datatypes.html#string),
and no FHIR element name, id, URL or search value needs one either. PostgreSQL cannot even store
U+0000 in text or jsonb. So a control character anywhere in a request — a resource, a patch, a
request URL, a search value, a header — is refused with a 400 whose `expression` names where it
was, before the value goes anywhere near the database.
"""

from __future__ import annotations

import re
from typing import Any

import orjson

from core.errors import BadRequest
from core.fhir.validation import fhirpath_of

__all__ = ["check_json_text", "check_text", "control_char", "plain_json_text"]

_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f]")
# How orjson writes those characters: \u00XX, or \b and \f. A document serialised without any of
# these byte strings holds no control character (the converse need not hold: "\\b" is a
# backslash followed by b), so the exact walk runs only when one of them shows up.
_ESCAPES = (b"\\u00", b"\\b", b"\\f")


def control_char(text: str) -> str | None:
    """The first forbidden control character of `text` as `U+0000`, or None."""
    found = _CONTROL.search(text)
    return f"U+{ord(found.group()):04X}" if found else None


def check_text(text: str, expression: str, what: str = "The value") -> None:
    """Raise a 400 (code `value`, at `expression`) if `text` holds a control character."""
    char = control_char(text)
    if char is not None:
        raise BadRequest(
            f"{what} contains the control character {char}; FHIR text may hold no characters "
            "below U+0020 other than tab, carriage return and line feed",
            code="value",
            expression=expression,
        )


def check_json_text(value: Any, root: str) -> None:
    """Check every string and element name of a parsed JSON value; the 400 names the element
    as a FHIRPath under `root` (e.g. `Bundle.entry[2].resource.name[0].family`)."""
    if isinstance(value, str):
        check_text(value, root)
        return
    if not isinstance(value, (dict, list)) or not _may_hold_control(value):
        return
    stack: list[tuple[Any, tuple[str | int, ...]]] = [(value, ())]
    while stack:
        node, path = stack.pop()
        items = node.items() if isinstance(node, dict) else enumerate(node)
        for key, child in items:
            if isinstance(key, str) and control_char(key):
                check_text(key, fhirpath_of(root, path) or root, "An element name")
            if isinstance(child, str):
                check_text(child, fhirpath_of(root, (*path, key)))
            elif isinstance(child, (dict, list)):
                stack.append((child, (*path, key)))


def plain_json_text(raw: str) -> bool:
    """True when JSON text `raw`, as a client sent it, cannot hold a forbidden control
    character: JSON writes one only as an escape (a raw one is not JSON, and the parser
    refuses it), `\\u00XX`, `\\b` or `\\f`. Lets a caller holding the text skip
    `check_json_text`'s serialisation of what it decodes."""
    if "\\" not in raw:  # one character: a memchr, a hundred times faster than the three
        return True
    return "\\u00" not in raw and "\\b" not in raw and "\\f" not in raw


def _may_hold_control(value: dict[str, Any] | list[Any]) -> bool:
    try:
        raw = orjson.dumps(value)
    except TypeError:  # e.g. an integer beyond 64 bits from a database JSON parser: walk it
        return True
    return b"\\" in raw and any(escape in raw for escape in _ESCAPES)
