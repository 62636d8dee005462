"""References inside resources: placeholder (`urn:uuid:` / `urn:oid:`) rewriting, conditional
references (`Patient?identifier=s|v`) and the literal references a write points to.

Walks are iterative so a deeply nested resource cannot exhaust the Python stack.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from typing import Any

__all__ = [
    "is_placeholder",
    "iter_references",
    "rewrite_references",
    "literal_target",
]

_LITERAL = re.compile(
    r"^([A-Z][A-Za-z]+)/([A-Za-z0-9\-.]{1,64})(?:/_history/[A-Za-z0-9\-.]{1,64})?$"
)


def is_placeholder(value: str) -> bool:
    return value.startswith(("urn:uuid:", "urn:oid:"))


def is_conditional_reference(value: str) -> bool:
    head, sep, _ = value.partition("?")
    return bool(sep) and "/" not in head and head[:1].isupper()


def iter_references(resource: Any) -> Iterator[str]:
    """Every `reference` string in the resource, at any depth."""
    stack = [resource]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            for key, value in node.items():
                if key == "reference" and isinstance(value, str):
                    yield value
                elif isinstance(value, dict | list):
                    stack.append(value)
        elif isinstance(node, list):
            stack.extend(v for v in node if isinstance(v, dict | list))


def rewrite_references(resource: Any, replace: Callable[[str], str | None]) -> int:
    """Rewrite in place every string that `replace` maps to something else.

    `replace` sees `reference` values and, for placeholders, any string equal to one (a
    placeholder can also sit in a uri field such as Attachment.url). Returns the count rewritten.
    """
    count = 0
    stack = [resource]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            items = node.items()
        elif isinstance(node, list):
            items = enumerate(node)  # type: ignore[assignment]
        else:
            continue
        for key, value in items:
            if isinstance(value, str):
                if key == "reference" or is_placeholder(value):
                    new = replace(value)
                    if new is not None and new != value:
                        node[key] = new  # type: ignore[index]
                        count += 1
            elif isinstance(value, dict | list):
                stack.append(value)
    return count


def literal_target(reference: str) -> tuple[str, str] | None:
    """`Patient/1` (or `Patient/1/_history/2`) → ("Patient", "1"); anything else → None."""
    m = _LITERAL.match(reference)
    return (m.group(1), m.group(2)) if m else None
