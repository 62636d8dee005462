"""References inside resources: placeholder (`urn:uuid:` / `urn:oid:`) rewriting, conditional
references (`Patient?identifier=s|v`) and the literal references a write points to.

References are found and rewritten in the resource's JSON text rather than by walking the
dict in Python: serialising, two regular-expression passes and parsing back cost a fraction of
a walk over a large resource (an ExplanationOfBenefit has hundreds of elements), and the text
form has no depth to exhaust the Python stack.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import orjson

from core.errors import BadRequest

__all__ = [
    "ReferenceScan",
    "is_placeholder",
    "is_conditional_reference",
    "scan_references",
    "rewrite_references",
    "literal_target",
]

_LITERAL = re.compile(
    r"^([A-Z][A-Za-z]+)/([A-Za-z0-9\-.]{1,64})(?:/_history/[A-Za-z0-9\-.]{1,64})?$"
)
# orjson writes compact JSON: `"reference":"…"` has no whitespace to allow for.
_REFERENCE = re.compile(rb'"reference":"((?:[^"\\]|\\.)*)"')
_PLACEHOLDER = re.compile(rb'"(urn:(?:uuid|oid):(?:[^"\\]|\\.)*)"')


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
    """A resource's JSON text and every `reference` value in it, in document order."""

    json: bytes
    references: list[str]


def _decode(raw: bytes) -> str:
    return orjson.loads(b'"' + raw + b'"') if b"\\" in raw else raw.decode()


def scan_references(resource: dict[str, Any], *, expression: str = "") -> ReferenceScan:
    try:
        data = orjson.dumps(resource)
    except orjson.JSONEncodeError as exc:  # e.g. nesting deeper than JSON encoders allow
        raise BadRequest(
            f"The resource cannot be processed: {exc}", expression=expression, code="too-costly"
        ) from exc
    if b'"reference"' not in data:
        return ReferenceScan(data, [])
    return ReferenceScan(data, [_decode(m) for m in _REFERENCE.findall(data)])


def rewrite_references(scan: ReferenceScan, mapping: Mapping[str, str]) -> dict[str, Any] | None:
    """The resource with every reference in `mapping` replaced, and every string that equals a
    placeholder in `mapping` (a placeholder may also sit in a uri such as Attachment.url).
    None when nothing changes."""
    if not mapping:
        return None
    changed = False

    def replacer(prefix: bytes) -> Callable[[re.Match[bytes]], bytes]:
        def replace(m: re.Match[bytes]) -> bytes:
            nonlocal changed
            new = mapping.get(_decode(m.group(1)))
            if new is None:
                return m.group(0)
            changed = True
            return prefix + orjson.dumps(new)

        return replace

    data = _REFERENCE.sub(replacer(b'"reference":'), scan.json) if scan.references else scan.json
    if b'"urn:' in data:
        data = _PLACEHOLDER.sub(replacer(b""), data)
    return orjson.loads(data) if changed else None
